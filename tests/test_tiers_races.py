"""The ram tier's edge cases: locked pages' ram_ttl, a sleeper that dies, a wake that never ends."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import FAKE_VLLM, StartDaemon
from daemon import fake_preset, hook_env, queue_behind, wait_for
from test_tiers import vllm_preset

MIB = 1024**2


@pytest.mark.llama
def test_ram_ttl_drops_a_llama_servers_locked_pages(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """ttl puts a llama-server's pages in the ram tier; ram_ttl must move them to disk."""
    d = start_daemon(
        {"t": {"backend": "llama-server", "model": str(tiny_gguf), "ttl": "1s", "ram_ttl": "2s"}}
    )
    assert d.chat("t")[0] == 200
    wait_for(lambda: d.model("t")["state"] == "stopped", timeout=40)
    assert d.model("t")["tier"] == "ram"
    wait_for(lambda: d.model("t")["tier"] == "disk", timeout=30)  # ram_ttl is 2 s
    model = d.model("t")
    assert (model["tier"], model["pages"], model["memory"]["ram"]) == ("disk", None, 0), model
    assert [e["model"] for e in d.events("model.ram_ttl.expire")] == ["t"]


def test_a_sleeper_that_dies_while_its_wake_is_queued_is_noticed(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """The sleeping vLLM dies while its wake waits behind a busy model; the wake is refused.

    As a death while asleep is, it is noticed: the model leaves the ram tier and the next
    request starts it afresh (before, it stayed "asleep" with a dead pid, and the next
    request's wake failed with 502).
    """
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m"), "c": fake_preset("C")},
        {"max_running": 1, "queue_timeout": "3s", "max_wait": "60s"},
    )
    assert d.chat("v")[0] == 200
    assert d.chat("c")[0] == 200  # v sleeps to make room
    assert d.model("v")["state"] == "asleep"
    pid = d.model("v")["pid"]
    with ThreadPoolExecutor(2) as pool:
        busy, wake = queue_behind(d, pool, "c", "v", 6)
        psutil.Process(pid).kill()  # the sleeping process dies while its wake is queued
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
        assert wake.result()[0] == 503  # queue_timeout
        assert busy.result()[0] == 200
    wait_for(lambda: d.model("v")["state"] == "stopped")
    assert d.get("/swapd/status")[1]["tiers"]["ram"]["bytes"] == 0
    status, body = d.chat("v")
    assert status == 200, body


# Loaded by every interpreter the daemon starts (swapd and the fake vLLM): in the fake,
# after its first /wake_up call, /is_sleeping keeps saying true (a wake that never ends).
STUCK_WAKE = """
import os, sys
if sys.argv and sys.argv[0].endswith("fake_vllm.py"):
    sys.path.insert(0, {tests!r})
    from aiohttp import web
    from fakes import upstream

    async def is_sleeping(self, _request):
        return web.json_response({{"is_sleeping": True}})

    upstream.Fake.is_sleeping = is_sleeping
"""


def test_a_wake_that_never_confirms_is_bounded_by_start_timeout(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """/is_sleeping keeps saying true after /wake_up: the wake fails by start_timeout.

    A wake is a load, bounded by start_timeout as a start is (before, only by a fixed
    120 s for /wake_up and 120 s more for /is_sleeping).
    """
    tests = str(Path(__file__).resolve().parent)
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s", start_timeout="3s")},
        {"queue_timeout": "3s"},
        env=hook_env(tmp_path / "hook", STUCK_WAKE.format(tests=tests)),
    )
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    began = time.monotonic()
    try:
        status, body = d.request(
            "POST",
            "/v1/chat/completions",
            {"model": "v", "messages": [{"role": "user", "content": "x"}]},
            timeout=30,
        )
    except OSError as exc:  # urllib's timeout
        pytest.fail(
            f"no answer {time.monotonic() - began:.0f}s into a wake "
            f"(start_timeout 3s); state {d.model('v')['state']}: {exc!r}"
        )
    assert status in (502, 503), body


def test_a_ram_budget_lowered_while_a_wake_waits_holds_once_the_wake_is_refused(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """A reload sets ram_budget 0 while v's wake is queued; the wake is refused (503).

    Back in the ram tier, v no longer fits its budget of 0 and goes down to disk (before,
    it stayed: the budget was fitted while v was queued, and never again).
    """
    presets = {"v": vllm_preset(vllm_binary, tmp_path / "m"), "c": fake_preset("C")}
    d = start_daemon(presets, {"max_running": 1, "queue_timeout": "4s", "max_wait": "60s"})
    assert d.chat("v")[0] == 200
    assert d.chat("c")[0] == 200  # v sleeps
    assert d.model("v")["state"] == "asleep"
    with ThreadPoolExecutor(2) as pool:
        busy, wake = queue_behind(d, pool, "c", "v", 8)
        d.settings = {**d.settings, "ram_budget": 0}
        d.write()
        assert d.request("POST", "/swapd/reload")[0] == 200
        assert wake.result()[0] == 503
        assert busy.result()[0] == 200
    wait_for(lambda: d.model("v")["state"] == "stopped")
    _, status = d.get("/swapd/status")
    v = next(m for m in status["models"] if m["name"] == "v")
    assert status["tiers"]["ram"]["budget"] == 0
    assert (v["state"], v["tier"], status["tiers"]["ram"]["bytes"]) == ("stopped", "disk", 0), (
        v["state"],
        v["tier"],
        status["tiers"]["ram"],
    )


# Loaded by every interpreter the daemon starts: in the fake vLLM, /wake_up kills the
# backend's leader (the shell that runs it), answers once swapd has seen that exit, and the
# fake itself exits just after: a backend that dies as its wake is answered.
LEADER_DIES_IN_WAKE = """
import sys
if sys.argv and sys.argv[0].endswith("fake_vllm.py"):
    sys.path.insert(0, {tests!r})
    import asyncio, os, signal
    from fakes import upstream

    _wake_up = upstream.Fake.wake_up

    async def wake_up(self, request):
        os.kill(os.getppid(), signal.SIGKILL)
        await asyncio.sleep(2.5)  # past the output's grace: swapd has seen the exit
        answer = await _wake_up(self, request)
        asyncio.get_running_loop().call_later(0.5, os._exit, 0)
        return answer

    upstream.Fake.wake_up = wake_up
"""


def test_a_backend_that_dies_as_its_wake_is_answered_is_noticed(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The backend's process exits while its wake is under way, and the wake still succeeds.

    Its exit is noticed once the wake ends, and the next request starts it afresh: the
    model is not left ready with a dead process (before, the exit seen while waking was
    dropped, so every request for it got 502 until something else stopped it, which for a
    model without a TTL never happened).
    """
    tests = str(Path(__file__).resolve().parent)
    binary = tmp_path / "bin" / "vllm"
    binary.parent.mkdir()
    binary.write_text(f'#!/bin/sh\n{sys.executable} {FAKE_VLLM} "$@" &\nwait\n')
    binary.chmod(0o755)
    d = start_daemon(
        {"v": vllm_preset(str(binary), tmp_path / "m"), "c": fake_preset("C")},
        {"max_running": 1},
        env=hook_env(tmp_path / "hook", LEADER_DIES_IN_WAKE.format(tests=tests)),
    )
    assert d.chat("v")[0] == 200
    assert d.chat("c")[0] == 200  # v sleeps to make room
    assert d.model("v")["state"] == "asleep"
    pid = d.model("v")["pid"]
    # The wake answers, its leader gone meanwhile: the crash is seen as the wake ends. So
    # soon after its start it counts as a failed start, which backs off (503).
    status, body = d.chat("v")
    assert status == 503, body
    [crash] = d.events("backend.crash")
    assert crash["model"] == "v"
    assert d.model("v")["pid"] is None
    wait_for(lambda: d.model("v")["state"] == "failed")  # the backoff is over
    status, body = d.chat("v")
    assert status == 200, body
    assert d.model("v")["pid"] != pid


# Loaded by every interpreter the daemon starts: the fake vLLM's /sleep leaves a mark; in
# swapd, the first host memory reading after that mark fails (a read of /proc that failed).
READ_FAILS_AFTER_SLEEP = """
import pathlib
import sys
if sys.argv and sys.argv[0].endswith("fake_vllm.py"):
    sys.path.insert(0, {tests!r})
    from fakes import upstream

    _sleep = upstream.Fake.sleep

    async def sleep(self, request):
        pathlib.Path({slept!r}).touch()
        return await _sleep(self, request)

    upstream.Fake.sleep = sleep
elif "serve" in sys.argv and "--config" in sys.argv:
    from swapd.probe import _host

    _read = _host.HostRamProbe.read

    def read(self, pids=()):
        if pathlib.Path({slept!r}).exists() and not pathlib.Path({failed!r}).exists():
            pathlib.Path({failed!r}).touch()
            raise OSError(5, "Input/output error", "/proc/meminfo")
        return _read(self, pids)

    _host.HostRamProbe.read = read
"""


def test_a_sleepers_cost_that_cannot_be_read_still_enters_the_ram_tier(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """The memory reading taken once a CPU vLLM sleeps fails: it is counted as measured.

    It enters the ram tier all the same, with what it was measured at, and ram_ttl takes it
    down to disk (before, the failed reading ended the sleep's bookkeeping: asleep with 0
    bytes counted, no ram_ttl, for good).
    """
    tests = str(Path(__file__).resolve().parent)
    slept, failed = tmp_path / "slept", tmp_path / "read-failed"
    hook = READ_FAILS_AFTER_SLEEP.format(tests=tests, slept=str(slept), failed=str(failed))
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="2s", ram_ttl="3s")},
        env=hook_env(tmp_path / "hook", hook),
    )
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    wait_for(failed.exists)
    [sleep] = wait_for(lambda: d.events("model.sleep"))
    assert sleep["model"] == "v"
    assert d.model("v")["memory"]["ram"] > 0
    wait_for(lambda: d.model("v")["state"] == "stopped", timeout=30)  # ram_ttl
    assert [e["model"] for e in d.events("model.ram_ttl.expire")] == ["v"]
