"""A liveness kill soon after ready backs off; an expired backoff stops showing.

1. A backend that freezes within 60 s of becoming ready and is SIGKILLed by the
   liveness probe must count a failed start (backoff, doubling, breaker), as a backend
   that crashes within 60 s does. Otherwise one that freezes on every start is
   restarted by the very next request, in a loop, and the breaker never opens.
2. Once a backoff's retry_at has passed, status, /v1/models and /metrics must no
   longer say ``backoff`` (requests are no longer refused): the model sat ``backoff``
   with a retry_at in the past until some request arrived.
"""

from __future__ import annotations

import os
import signal

from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for


def _freeze_until_killed(d: Daemon, killed_before: int) -> None:
    """SIGSTOP the ready backend; wait until liveness has killed it and its group is gone."""
    pid = d.model("a")["pid"]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: len(d.events("backend.unresponsive")) == killed_before + 1, timeout=30)
    wait_for(lambda: d.model("a")["pid"] is None, timeout=30)


def test_a_backend_frozen_soon_after_ready_backs_off_after_its_liveness_kill(
    start_daemon: StartDaemon,
) -> None:
    """Two freezes a few seconds after ready: each kill counts, and the backoff doubles."""
    d = start_daemon({"a": fake_preset("A", health_interval="1s", health_failures=2)})
    assert d.chat("a")[0] == 200
    _freeze_until_killed(d, 0)
    model = d.model("a")
    assert model["failures"] == 1, model  # killed ~3 s after ready: a failed start
    assert [e["failures"] for e in d.events("model.backoff")] == [1]
    assert "health probes" in model["error"]
    # After the backoff the next request starts it again; a second freeze doubles it.
    wait_for(lambda: d.chat("a")[0] == 200, timeout=30, interval=0.2)
    _freeze_until_killed(d, 1)
    assert d.model("a")["failures"] == 2
    assert [e["delay_s"] for e in d.events("model.backoff")] == [1.0, 2.0]
    assert len(d.events("backend.spawn")) == 2  # nothing restarted in between


def _state_gauges(d: Daemon, model: str) -> list[str]:
    """The swapd_model_state series of ``model`` that are 1."""
    _, text = d.get("/metrics")
    return [
        line
        for line in text.splitlines()
        if line.startswith("swapd_model_state{")
        and f'model="{model}"' in line
        and line.rstrip().endswith(" 1.0")
    ]


def test_status_stops_showing_backoff_once_retry_at_has_passed(
    start_daemon: StartDaemon,
) -> None:
    """No request arrives after the failed start: status must not say backoff for good."""
    d = start_daemon({"bad": fake_preset("X", "--exit-at-start", "7")})
    assert d.chat("bad")[0] == 502
    assert d.model("bad")["retry_at"] is not None  # backing off (1 s), or just past it
    # Only reads from here on (status, /v1/models, /metrics never start a model).
    wait_for(lambda: d.model("bad")["state"] != "backoff", timeout=15, interval=0.2)
    model = d.model("bad")
    assert model["retry_at"] is None, model  # no retry time in the past
    assert model["failures"] == 1
    assert "exited with 7" in model["error"]
    _, listed = d.get("/v1/models")
    [entry] = [m for m in listed["data"] if m["id"] == "bad"]
    assert entry["status"] != "backoff"
    gauges = _state_gauges(d, "bad")
    assert gauges
    assert not any('state="backoff"' in g for g in gauges), gauges
    assert len(d.events("backend.spawn")) == 1  # reading status started nothing
    # And, as it now says, a request is not refused: it tries a start again.
    status, body = d.chat("bad")
    assert (status, body["error"]["code"]) == (502, "backend_start_failed")
    assert len(d.events("backend.spawn")) == 2
