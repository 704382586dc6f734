"""Shutdown (Manager.close) meeting a start in progress or a start already cancelled.

Each case ends swapd with SIGTERM and checks: exit 0, no error escaped a task, no
backend outlived swapd, and every spawned group was stopped and reaped by swapd itself
(``backend.exit`` logged for its pid), not left to the reaper.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for, wait_for_gone

STUBBORN = ("--start-delay", "600", "--ignore-sigterm")
ERRORS = ("task.fail", "model.load.error", "model.reload.fail")


def _logged(d: Daemon, text: str) -> bool:
    lines: list[str] = d.get("/swapd/models/a/logs")[1]["lines"]
    return any(text in line for line in lines)


def _sigterm(d: Daemon) -> tuple[int, float]:
    assert d.proc is not None
    began = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    return d.proc.wait(timeout=60), time.monotonic() - began


def _check_clean(d: Daemon, code: int) -> None:
    assert code == 0, d.log_path.read_text()[-3000:]
    assert wait_for_gone(d, timeout=5) == []
    for name in ERRORS:
        assert d.events(name) == [], (name, d.events(name))
    log = d.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "exception was never retrieved" not in log, log[-3000:]
    spawned = {e["pid"] for e in d.events("backend.spawn")}
    exited = {e["pid"] for e in d.events("backend.exit")}
    assert spawned
    assert spawned <= exited, (spawned, exited)


def test_sigterm_during_a_start(start_daemon: StartDaemon) -> None:
    """A request waits on a start whose group ignores SIGTERM; swapd gets SIGTERM."""
    d = start_daemon({"a": fake_preset("A", *STUBBORN, stop_timeout="4s")})
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(d.chat, "a")
        wait_for(lambda: _logged(d, "listening"))
        code, _ = _sigterm(d)
        assert waiting.result()[0] == 503
    _check_clean(d, code)


@pytest.mark.parametrize("unloads", [1, 2])
def test_sigterm_while_a_forced_unload_stops_a_cut_start(
    start_daemon: StartDaemon, unloads: int
) -> None:
    """The cut start's group ignores SIGTERM (stop_timeout 8 s) when shutdown begins.

    With two forced unloads, the shutdown's own cancels are the third and fourth.
    """
    d = start_daemon({"a": fake_preset("A", *STUBBORN, start_timeout="600s", stop_timeout="8s")})
    with ThreadPoolExecutor(4) as pool:
        waiting = pool.submit(d.chat, "a")
        wait_for(lambda: _logged(d, "listening"))
        cuts = []
        for _ in range(unloads):
            cuts.append(pool.submit(d.request, "POST", "/swapd/models/a/unload?force=true"))
            time.sleep(0.5)
        # One unload: its cut start's stop is in its grace. Two: the second cancel has
        # SIGKILLed the group already (Child.stop), so the shutdown meets a stopped model.
        assert d.model("a")["state"] == ("starting" if unloads == 1 else "stopped")
        code, _ = _sigterm(d)
        assert waiting.result()[0] == 503
        assert [c.result()[0] for c in cuts] == [200] * unloads
    _check_clean(d, code)


def test_sigterm_while_a_reload_removes_a_starting_model(start_daemon: StartDaemon) -> None:
    """A reload removes a mid-start (its retirement cancels the load); then SIGTERM."""
    d = start_daemon({"a": fake_preset("A", *STUBBORN, stop_timeout="8s"), "b": fake_preset("B")})
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(d.chat, "a")
        wait_for(lambda: _logged(d, "listening"))
        d.presets = {"b": fake_preset("B")}
        (d.root / "presets" / "a.yaml").unlink()
        assert d.request("POST", "/swapd/reload")[1]["removed"] == ["a"]
        time.sleep(0.5)  # the retirement's stop of the cut start is in its grace
        code, _ = _sigterm(d)
        assert waiting.result()[0] in (404, 503)  # 503: the load ended once closing
    _check_clean(d, code)


# A backend that never becomes ready and, on SIGTERM, takes a moment to exit cleanly.
SLOW_TERM = """
import signal, sys, time
from pathlib import Path

marks = Path(sys.argv[1])


def term(*_):
    (marks / "term").touch()
    time.sleep(3.0)  # its cleanup: well within stop_timeout
    (marks / "clean-exit").touch()
    sys.exit(0)


signal.signal(signal.SIGTERM, term)
(marks / "started").touch()
while True:
    time.sleep(1)
"""


def test_a_cut_start_keeps_its_stop_timeout_while_the_drain_waits(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """SIGTERM while a's preload starts and b serves a request: a still gets its grace.

    begin_shutdown cancels a's load: SIGTERM to its group, then up to stop_timeout (20 s).
    Its backend needs 3 s to exit cleanly. The drain waits for b's request (about 1.5 s);
    then close() cancels a's load again, and Child.stop turns that second cancellation
    into an immediate SIGKILL: a is killed in the middle of its SIGTERM handling.
    """
    script = tmp_path / "slow_term.py"
    script.write_text(SLOW_TERM)
    marks = tmp_path / "marks"
    marks.mkdir()
    preset = {
        "backend": "command",
        "cmd": [sys.executable, str(script), str(marks), "${PORT}"],
        "preload": True,
        "start_timeout": "600s",
        "stop_timeout": "20s",
    }
    d = start_daemon({"a": preset, "b": fake_preset("B")})
    wait_for((marks / "started").exists)
    assert d.chat("b")[0] == 200
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(d.chat, "b", "long", fake_delay=1.5)
        wait_for(lambda: d.model("b")["in_flight"] == 1)
        code, _ = _sigterm(d)
        assert long.result()[0] == 200
    assert code == 0
    assert wait_for_gone(d, timeout=5) == []
    assert (marks / "term").exists()
    pid = next(e["pid"] for e in d.events("backend.spawn") if e["model"] == "a")
    [exited] = [e for e in d.events("backend.exit") if e["pid"] == pid]
    assert (marks / "clean-exit").exists(), f"SIGKILLed mid-cleanup: {exited}"
    assert exited["code"] == 0, exited


def _start_cut(d: Daemon, pool: ThreadPoolExecutor) -> Future[tuple[int, Any]] | None:
    """a starts (its group ignores SIGTERM) when the shutdown cancels its load."""
    waiter = pool.submit(d.chat, "a")
    wait_for(lambda: _logged(d, "listening"))
    return waiter


def _stop_by_ttl(d: Daemon, _pool: ThreadPoolExecutor) -> Future[tuple[int, Any]] | None:
    """a is being stopped by its TTL (its group ignores SIGTERM) when the shutdown begins."""
    assert d.chat("a")[0] == 200
    wait_for(lambda: d.events("model.stop"))
    return None


@pytest.mark.parametrize("slow", [_start_cut, _stop_by_ttl])
def test_a_slow_stop_holds_back_no_other_models_stop_at_shutdown(
    start_daemon: StartDaemon,
    slow: Callable[[Daemon, ThreadPoolExecutor], Future[tuple[int, Any]] | None],
) -> None:
    """b's stop begins with the shutdown, not after a's grace (5 minutes) is over.

    Waiting for every cut start and every stop under way before stopping the rest made a
    shutdown take the sum of those stop_timeouts, past systemd's TimeoutStopSec. And a
    request waiting for the cut start was answered only once that start's stop was over:
    it held the drain (cut only at its 15 s), and b's stop behind it.
    """
    never_ready = ("--start-delay", "600") if slow is _start_cut else ()
    a = fake_preset("A", *never_ready, "--ignore-sigterm", stop_timeout="5m", ttl="1s")
    b = fake_preset("B", "--ignore-sigterm", stop_timeout="5m")
    d = start_daemon({"a": {**a, "start_timeout": "600s"}, "b": b}, {"max_running": 2})
    assert d.chat("b")[0] == 200
    assert d.proc is not None
    with ThreadPoolExecutor(1) as pool:
        waiter = slow(d, pool)
        d.proc.send_signal(signal.SIGTERM)
        if waiter is not None:
            status, body = waiter.result(timeout=10)  # at once, not after a's stop
            assert (status, body["error"]["code"]) == (503, "unavailable"), body
        # b is idle: its stop begins at once (10 s is only this test's patience).
        wait_for(lambda: [e for e in d.events("model.stop") if e["model"] == "b"], timeout=10)
        assert not [e for e in d.events("backend.exit") if e["model"] == "a"]  # still in grace
        d.proc.send_signal(signal.SIGINT)  # the second signal: no 5-minute wait here
        assert d.proc.wait(timeout=60) == 0
    assert wait_for_gone(d) == []
