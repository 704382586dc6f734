"""A reload that changes how a model is probed applies to its running process."""

from __future__ import annotations

import contextlib
import os
import signal

from conftest import StartDaemon
from daemon import fake_preset, fake_stats, wait_for


def test_a_reloaded_health_interval_applies_to_the_running_backend(
    start_daemon: StartDaemon,
) -> None:
    """``health_interval`` 1h to 1s is in place: a backend frozen after it is killed.

    Before, the probe loop slept out the old hour: the reload said in place, and a
    frozen backend went unnoticed.
    """
    d = start_daemon({"a": fake_preset("A", health_interval="1h", health_failures=1)})
    assert d.chat("a")[0] == 200
    pid = d.model("a")["pid"]
    d.presets = {"a": fake_preset("A", health_interval="1s", health_failures=1)}
    d.write()
    status, plan = d.request("POST", "/swapd/reload")
    assert status == 200, plan
    assert plan["in_place"] == ["a"]
    assert d.model("a")["pid"] == pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: d.events("backend.unresponsive"), timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_a_probe_every_few_ms_waits_a_second_for_a_slow_healthy_answer(
    start_daemon: StartDaemon,
) -> None:
    """``health_interval: 50ms`` probes often, but a miss is no answer within a second.

    Before, the deadline was the interval itself: a backend whose healthy answer took
    0.2 s (a busy machine) missed every probe and was killed as frozen.
    """
    preset = fake_preset("A", "--health-delay", "0.2", health_interval="50ms", health_failures=1)
    d = start_daemon({"a": preset})
    assert d.chat("a")[0] == 200
    pid = d.model("a")["pid"]
    port = d.model("a")["port"]
    wait_for(lambda: fake_stats(port)["health_answers"] >= 10, timeout=60)
    assert not d.events("backend.probe.miss")
    assert not d.events("backend.unresponsive")
    assert d.model("a")["pid"] == pid
