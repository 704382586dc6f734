"""A reload that restarts the liveness probe keeps what the probe knew, and never cuts its kill."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from conftest import StartDaemon
from daemon import Daemon, fake_preset, hook_env, wait_for

STABLE_SOON = """
import swapd.manager
swapd.manager.STABLE_AFTER = 2.0
"""

# A group that takes a while to go after SIGKILL (a CUDA process freeing device memory
# takes seconds): the liveness kill's stop lasts 6 s.
SLOW_KILL = """
import asyncio
import swapd.process
_kill, _terminate = swapd.process.Child.kill_group, swapd.process.Child._terminate
def kill_group(self):
    self._review_killed = True
    _kill(self)
async def _slow_terminate(self, timeout):
    if getattr(self, "_review_killed", False):
        await asyncio.sleep(6)
    return await _terminate(self, timeout)
swapd.process.Child.kill_group = kill_group
swapd.process.Child._terminate = _slow_terminate
"""


def _reload(d: Daemon, **keys: object) -> None:
    d.presets = {"a": fake_preset("A", **keys)}
    d.write()
    status, plan = d.request("POST", "/swapd/reload")
    assert status == 200, plan
    assert plan["in_place"] == ["a"], plan


def test_a_proven_backend_frozen_after_a_probe_reload_is_not_a_failed_start(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """It answered its probes past STABLE_AFTER; a reload restarts its probe; it freezes.

    The restarted probe starts from ``answered = ready_at``: the kill counts as a failed
    start (failures 1, backoff), as if it had frozen at once.
    """
    d = start_daemon(
        {"a": fake_preset("A", health_interval="1s", health_failures=2)},
        env=hook_env(tmp_path / "hook", STABLE_SOON),
    )
    assert d.chat("a")[0] == 200
    time.sleep(3.5)  # probes answered at ~1, 2, 3 s: proven (STABLE_AFTER is 2 s here)
    _reload(d, health_interval="1s", health_failures=3)
    pid = d.model("a")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: d.events("backend.unresponsive"), timeout=30)
        wait_for(lambda: d.model("a")["pid"] is None, timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    model = d.model("a")
    assert d.events("model.backoff") == [], model
    assert model["failures"] == 0, model


def test_a_probe_reload_during_a_liveness_kill_does_not_strand_the_model(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A reload that changes health_failures while the liveness kill's stop runs.

    _apply_in_place cancels the liveness task inside _kill_frozen: _forget_child never
    runs, the model stays failed with its dead pid, and every request waits (_reaping).
    """
    d = start_daemon(
        {"a": fake_preset("A", health_interval="1s", health_failures=1)},
        env=hook_env(tmp_path / "hook", SLOW_KILL),
    )
    assert d.chat("a")[0] == 200
    pid = d.model("a")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: d.events("backend.unresponsive"), timeout=30)
        _reload(d, health_interval="1s", health_failures=2)  # within the 6 s stop
        wait_for(lambda: d.model("a")["pid"] is None, timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    status, body = d.request("POST", "/swapd/models/a/load", timeout=30)
    assert status == 200, body
