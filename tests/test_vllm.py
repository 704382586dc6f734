"""End to end against a real ``vllm serve`` (the CPU build) and a tiny locally made Llama."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon, build_cache, wait_for, wait_for_gone

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="session")
def vllm_setup() -> tuple[Path, Path]:
    """The vLLM venv's ``vllm`` and the tiny model that scripts/vllm-env prepared."""
    cache = build_cache()
    binary, model = cache / "vllm-venv" / "bin" / "vllm", cache / "tiny-hf"
    if not binary.exists() or not (model / "config.json").exists():
        pytest.skip(f"vLLM not prepared in {cache} (run scripts/vllm-env)")
    return binary, model


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR for vLLM with a short path, removed after the test.

    vLLM puts ZMQ unix sockets in TMPDIR; their paths must stay under 108 bytes, which
    pytest's own temporary folders can pass.
    """
    path = Path(tempfile.mkdtemp(prefix="swapd-vllm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def vllm_preset(
    setup: tuple[Path, Path], root: Path, short_tmp: Path, **keys: Any
) -> dict[str, Any]:
    """The lean CPU launch: one engine process, eager mode, a small KV cache."""
    binary, model = setup
    return {
        "backend": "vllm",
        "binary": str(binary),
        "model": str(model),
        "args": [
            "--max-model-len",
            "256",
            "--enforce-eager",
            "--distributed-executor-backend",
            "uni",
            "--kv-cache-memory-bytes",
            "67108864",
        ],
        "env": {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CACHE_ROOT": str(root.parent / "vllm-cache"),
            "TMPDIR": str(short_tmp),
        },
        "memory": "2GiB",
        "start_timeout": "5m",
        "stop_timeout": "5s",
        **keys,
    }


def test_vllm_serves_through_swapd_and_stops_cleanly(
    start_daemon: StartDaemon,
    vllm_setup: tuple[Path, Path],
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """Swapd starts vllm serve on demand, proxies a completion and a chat, and unloads it."""
    d = start_daemon(
        {"tiny": vllm_preset(vllm_setup, tmp_path / "a", short_tmp, aliases=["tiny-llama"])}
    )
    body = {"model": "tiny-llama", "prompt": "hello world", "max_tokens": 8, "temperature": 0}
    status, first = d.request("POST", "/v1/completions", body, timeout=400)
    assert status == 200, first
    assert first["model"] == "tiny"  # vLLM answers with the first served name: the preset
    assert isinstance(first["choices"][0]["text"], str)
    status, again = d.request("POST", "/v1/completions", body)
    assert (status, again["choices"][0]["text"]) == (200, first["choices"][0]["text"])
    status, chat = d.chat("tiny", "hello", max_tokens=4)
    assert status == 200, chat
    pid = d.model("tiny")["pid"]
    status, unloaded = d.request("POST", "/swapd/models/tiny/unload")
    assert (status, unloaded["state"]) == (200, "stopped")
    assert not [p for p in d.leftovers() if p.pid == pid]
    exits = [e for e in d.events("backend.exit") if e["model"] == "tiny"]
    assert len(exits) == 1


def test_stopping_vllm_while_it_starts_leaves_nothing_behind(
    start_daemon: StartDaemon,
    vllm_setup: tuple[Path, Path],
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """A shutdown while vLLM starts ends its whole group, whatever phase it is in.

    Early in its start vLLM turns SIGTERM into an interrupt; in some later phases it
    ignores it, and the stop escalates to SIGKILL after stop_timeout. Either way the
    drain answers the waiting load at once and nothing is left.
    """
    d: Daemon = start_daemon(
        {"tiny": vllm_preset(vllm_setup, tmp_path / "b", short_tmp, stop_timeout="2s")},
        {"shutdown_timeout": "10s"},  # the drain's bound, well inside the wait below
    )

    def load() -> None:
        # The daemon exits mid-load on purpose: the request is expected to be cut.
        with contextlib.suppress(OSError):
            d.request("POST", "/swapd/models/tiny/load", timeout=400)

    threading.Thread(target=load, daemon=True).start()
    wait_for(lambda: d.model("tiny")["state"] == "starting", timeout=30)
    # Let vLLM get well into its start (imports, engine set-up) before stopping swapd.
    wait_for(lambda: len(d.leftovers()) >= 1, timeout=30)
    wait_for(lambda: any("vllm" in line.lower() for line in _backend_output(d)), timeout=120)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=60) == 0
    assert wait_for_gone(d) == []
    assert [e["model"] for e in d.events("backend.exit")] == ["tiny"]
    assert len(d.events("backend.kill")) <= 1


def _backend_output(d: Daemon) -> list[str]:
    status, body = d.get("/swapd/models/tiny/logs")
    return list(body["lines"]) if status == 200 else []


@pytest.mark.parametrize("level", [1, 2])
def test_real_vllm_refused_sleep_flag_then_sleeps_wakes_and_serves(
    start_daemon: StartDaemon,
    vllm_setup: tuple[Path, Path],
    tmp_path: Path,
    short_tmp: Path,
    level: int,
) -> None:
    """The CPU build refuses --enable-sleep-mode: swapd starts it again without the flag.

    With VLLM_SERVER_DEV_MODE=1 the real /sleep, /wake_up and /is_sleeping still answer,
    so the TTL puts it to sleep (same process) and the next request wakes it and is served.
    Without sleep mode its sleep only paused it, at level 2 too: no weights are reloaded.
    """
    d = start_daemon(
        {"tiny": vllm_preset(vllm_setup, tmp_path / "c", short_tmp, sleep=level, ttl="3s")}
    )
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 8, "temperature": 0}
    status, first = d.request("POST", "/v1/completions", body, timeout=600)
    assert status == 200, first
    spawns = d.events("backend.spawn")
    assert len(spawns) == 2
    assert "--enable-sleep-mode" in spawns[0]["argv"]
    assert "--enable-sleep-mode" not in spawns[1]["argv"]
    [refused] = d.events("model.sleep.refused")
    assert "sleep mode" in refused["line"].lower()
    model = d.model("tiny")
    assert "refused --enable-sleep-mode" in model["sleep"]["note"]
    pid, port = model["pid"], model["port"]
    wait_for(lambda: d.model("tiny")["state"] == "asleep", timeout=60)
    assert _is_sleeping(port) is True
    assert d.model("tiny")["tier"] == "ram"
    status, again = d.request("POST", "/v1/completions", body, timeout=120)
    assert (status, again["choices"][0]["text"]) == (200, first["choices"][0]["text"])
    assert d.model("tiny")["pid"] == pid
    assert _is_sleeping(port) is False
    assert len(d.events("backend.spawn")) == 2
    assert [e["model"] for e in d.events("model.wake")] == ["tiny"]
    assert not [line for line in _backend_output(d) if "Reloading" in line]


def _is_sleeping(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/is_sleeping", timeout=10) as resp:
        return bool(json.load(resp)["is_sleeping"])
