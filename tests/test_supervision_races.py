"""Supervision's edge cases: forced unloads during a failed start's stop, recycled pids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from conftest import StartDaemon
from daemon import Daemon, fake_preset, hook_env, wait_for

STUBBORN = ("--start-delay", "600", "--ignore-sigterm")


def _logged(d: Daemon, text: str) -> bool:
    lines: list[str] = d.get("/swapd/models/a/logs")[1]["lines"]
    return any(text in line for line in lines)


def test_a_forced_unload_during_a_failed_starts_stop_leaves_the_model_stopped(
    start_daemon: StartDaemon,
) -> None:
    """A forced unload while a failed start's group is stopped answers; the model is stopped.

    The start misses start_timeout; its backend ignores SIGTERM, so its stop takes
    stop_timeout. The model ends with no pid, and loads again (before: the unload never
    answered, and the model stayed ``failed`` with a dead pid, every later request
    waiting for good).
    """
    preset = fake_preset("A", *STUBBORN, start_timeout="1s", stop_timeout="8s")
    d = start_daemon({"a": preset})
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(d.chat, "a")
        wait_for(lambda: _logged(d, "(start_timeout)"))  # its stop has begun: 8 s of grace
        status, body = d.request("POST", "/swapd/models/a/unload?force=true", timeout=30)
        assert status == 200, body
        assert waiting.result()[0] in (502, 503)
    model = d.model("a")
    assert (model["state"], model["pid"]) == ("stopped", None), model
    d.presets = {"a": fake_preset("A")}
    d.write()
    assert d.request("POST", "/swapd/reload")[0] == 200
    assert d.chat("a")[0] == 200


def test_two_forced_unloads_of_a_start_leave_no_pid_and_no_record(
    start_daemon: StartDaemon,
) -> None:
    """Two forced unloads of a start leave a stopped model with no pid and no record.

    They come a second apart, while the start's group (ignoring SIGTERM) is stopped.
    """
    d = start_daemon({"a": fake_preset("A", *STUBBORN, start_timeout="600s", stop_timeout="8s")})
    with ThreadPoolExecutor(3) as pool:
        waiting = pool.submit(d.chat, "a")
        wait_for(lambda: _logged(d, "listening"))
        first = pool.submit(d.request, "POST", "/swapd/models/a/unload?force=true")
        time.sleep(1)  # the first cut start is stopping: SIGTERM ignored, 8 s of grace
        assert d.request("POST", "/swapd/models/a/unload?force=true", timeout=30)[0] == 200
        assert first.result()[0] == 200
        assert waiting.result()[0] == 503
    model = d.model("a")
    assert (model["state"], model["pid"]) == ("stopped", None), model
    assert list((d.root / "state" / "children").glob("*.json")) == []


def test_a_recycled_pid_that_leads_its_own_group_is_not_killed_at_start(
    start_daemon: StartDaemon,
) -> None:
    """A leftover record whose pid now belongs to an unrelated group leader kills nothing.

    An earlier run's record names pid P started at T; P now belongs to an unrelated
    process, started later and leading its own group (before, swapd SIGKILLed that group
    at start).
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.stop() == 0
    innocent = subprocess.Popen(  # not ours: its own session and group
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        started = psutil.Process(innocent.pid).create_time()
        children = d.root / "state" / "children"
        children.mkdir(parents=True, exist_ok=True)
        record = {"pid": innocent.pid, "model": "a", "create_time": started - 3600, "owner": 1}
        (children / f"{innocent.pid}.json").write_text(json.dumps(record))
        d.start()
        assert d.events("leftover.kill") == []
        assert innocent.poll() is None
    finally:
        innocent.kill()
        innocent.wait()


# Every crash counts as one after a good run (no backoff): the next request restarts it.
PROVEN_AT_ONCE = """
import swapd.manager
swapd.manager.STABLE_AFTER = 0.0
"""


def test_requests_queued_at_a_crash_wait_for_the_restart(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A proven backend dies while one request runs and three wait behind concurrency 1.

    The one in flight gets 502 backend_gone. The three that never reached the backend
    wait for the restart and are served (before, they were leased to the dead process the
    moment the first one ended, before swapd had seen the exit, and got 502 too).
    """
    d = start_daemon(
        {"q": fake_preset("Q", concurrency=1)}, env=hook_env(tmp_path / "hook", PROVEN_AT_ONCE)
    )
    assert d.chat("q")[0] == 200
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(d.chat, "q", "x", fake_delay=30)
        wait_for(lambda: d.model("q")["in_flight"] == 1)
        queued = [pool.submit(d.chat, "q", "y") for _ in range(3)]
        wait_for(lambda: d.model("q")["waiting"] == 3)
        os.kill(d.model("q")["pid"], signal.SIGKILL)
        assert running.result()[0] == 502
        answers = [f.result() for f in queued]
    assert [status for status, _ in answers] == [200, 200, 200], answers
    assert len(d.events("backend.spawn")) == 2
