"""Issue 11's routes and reload against a real llama-server (the tiny random GGUF)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import wait_for

pytestmark = pytest.mark.llama


def tiny(model: Path, *args: str) -> dict[str, Any]:
    """A llama-server preset of the tiny GGUF."""
    return {"backend": "llama-server", "model": str(model), "args": ["-c", "256", *args]}


def test_llama_servers_own_routes_answer_through_swapd(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """/tokenize by the model in the body, /upstream/ for the rest, count_tokens: real answers.

    swapd sends the backend's own key on each, so llama-server's guard lets them in.
    """
    d = start_daemon({"tiny": tiny(tiny_gguf)})
    status, body = d.request("POST", "/tokenize", {"model": "tiny", "content": "hello"})
    assert status == 200, body
    tokens = body["tokens"]
    assert tokens
    assert all(isinstance(t, int) for t in tokens)
    status, body = d.request("POST", "/upstream/tiny/detokenize", {"tokens": tokens})
    assert status == 200, body
    assert "hello" in body["content"]  # the tiny vocabulary keeps its space marker
    messages = [{"role": "user", "content": "hello there"}]
    status, body = d.request(
        "POST", "/v1/messages/count_tokens", {"model": "tiny", "messages": messages}
    )
    assert status == 200, body
    assert body["input_tokens"] > 0
    status, body = d.get("/upstream/tiny/props")
    assert status == 200, body
    assert "default_generation_settings" in body


def test_a_reload_restarts_only_the_llama_server_whose_args_changed(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """Two llama-servers serve; one preset's -c changes: only it gets a new process."""
    d = start_daemon({"a": tiny(tiny_gguf), "b": tiny(tiny_gguf)}, {"max_running": 2})
    assert d.chat("a", max_tokens=2)[0] == 200
    assert d.chat("b", max_tokens=2)[0] == 200
    a_pid, b_pid = d.model("a")["pid"], d.model("b")["pid"]
    d.presets = {"a": tiny(tiny_gguf), "b": {**tiny(tiny_gguf), "args": ["-c", "512"]}}
    d.write()
    status, plan = d.request("POST", "/swapd/reload")
    assert status == 200, plan
    assert (plan["restarted"], plan["unchanged"]) == (["b"], ["a"])
    wait_for(lambda: d.model("b")["state"] == "ready" and d.model("b")["pid"] != b_pid, 60)
    assert d.model("a")["pid"] == a_pid
    assert d.chat("b", max_tokens=2)[0] == 200
