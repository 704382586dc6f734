"""Waking a vLLM from sleep level 2.

Level 2 discards the weights (vLLM's CuMemBackend.suspend offloads only "runtime" and
"cudagraph" at level 2; CuMemBackend.resume and Executor.wake_up only re-map memory).
A plain ``POST /wake_up`` therefore leaves uninitialised weights: vLLM's documented
level-2 wake is ``/wake_up?tags=weights``, ``POST /collective_rpc
{"method": "reload_weights"}``, ``/wake_up?tags=kv_cache``. The fake vLLM below adds
just that to ``tests/fakes/fake_vllm.py``: after a level-2 sleep it answers garbage
until ``reload_weights`` has run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import FAKE_VLLM, StartDaemon
from daemon import wait_for

LEVEL2_FAKE = f"""
import importlib.util
import json
import sys

from aiohttp import web

spec = importlib.util.spec_from_file_location("fake_vllm", {str(FAKE_VLLM)!r})
fake_vllm = importlib.util.module_from_spec(spec)
sys.modules["fake_vllm"] = fake_vllm  # dataclasses look their module up
spec.loader.exec_module(fake_vllm)


class Level2(fake_vllm.FakeVllm):
    weights_lost = False

    async def sleep(self, request):
        answer = await super().sleep(request)
        if request.query.get("level") == "2":
            self.weights_lost = True  # discarded, not offloaded
        return answer

    async def collective_rpc(self, request):
        if json.loads(await request.read()).get("method") == "reload_weights":
            self.weights_lost = False
        return web.Response(status=200)

    async def chat(self, request):
        answer = await super().chat(request)
        if self.weights_lost:
            return web.json_response(
                {{"choices": [{{"index": 0, "message": {{"role": "assistant",
                  "content": "<uninitialised weights>"}}, "finish_reason": "stop"}}]}}
            )
        return answer

    def app(self):
        app = super().app()
        if "/sleep" in {{r.resource.canonical for r in app.router.routes()}}:
            app.router.add_post("/collective_rpc", self.collective_rpc)
        return app


fake_vllm.FakeVllm = Level2
fake_vllm.main()
"""


def test_a_vllm_woken_from_sleep_level_2_serves_its_model(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """sleep: 2, TTL demotes it, the next request wakes it: the answer must be the model's."""
    script = tmp_path / "level2_vllm.py"
    script.write_text(LEVEL2_FAKE)
    binary = tmp_path / "bin" / "vllm"
    binary.parent.mkdir()
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    binary.chmod(0o755)
    model = tmp_path / "m"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"\0" * 1024)
    d = start_daemon(
        {
            "v": {
                "backend": "vllm",
                "model": str(model),
                "binary": str(binary),
                "sleep": 2,
                "ttl": "1s",
            }
        }
    )
    status, body = d.chat("v", "before")
    assert status == 200, body
    assert (status, body["choices"][0]["message"]["content"]) == (200, "v: before")
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    assert [e["sleep_level"] for e in d.events("model.sleep")] == [2]
    status, body = d.chat("v", "after")
    assert status == 200, body
    assert [e["how"] for e in d.events("model.load.done")] == ["start", "wake"]
    assert body["choices"][0]["message"]["content"] == "v: after"


def test_a_level_2_wake_without_collective_rpc_fails_once_then_the_model_goes_to_disk(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """sleep: 2 on a vLLM whose /collective_rpc answers 404 (a build without it).

    Its /sleep works, so the missing endpoint shows only at the wake: that wake fails
    (the process is ended). As for a missing /sleep, the launch then starts without sleep
    mode and its demotions stop it to disk; before, each TTL put it to sleep again and
    each next request's wake failed with 502 the same way.
    """
    model = tmp_path / "m"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"\0" * 1024)
    preset = {"backend": "vllm", "model": str(model), "binary": vllm_binary, "sleep": 2}
    d = start_daemon({"v": {**preset, "ttl": "1s"}})
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    status, body = d.chat("v")
    assert status == 502, body
    assert "/collective_rpc: HTTP 404" in body["error"]["message"]
    [missing] = d.events("model.sleep.missing")
    assert "HTTP 404" in missing["reason"]

    wait_for(lambda: d.model("v")["state"] == "failed")  # the backoff is over
    assert d.chat("v")[0] == 200  # started afresh, without sleep mode
    assert "sleep API is missing" in d.model("v")["sleep"]["note"]
    assert d.model("v")["sleep"]["level"] == 0
    wait_for(lambda: d.model("v")["state"] in ("stopped", "asleep"), timeout=40)  # the TTL
    assert d.model("v")["state"] == "stopped"
    assert d.chat("v")[0] == 200
    assert len(d.events("model.sleep.missing")) == 1
