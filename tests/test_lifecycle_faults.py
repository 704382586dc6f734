"""Plain exceptions injected into a real swapd's lifecycle (:mod:`faults`).

Whatever raises, the model must end where its next request can load it (never stranded in
``starting``, ``stopping``, ``sleeping`` or ``waking``, nor failed with a dead process), no
process may be left behind or unwatched, the error is logged, and the load that waited for
the room answers as usual. Each test failed on older code, where:

- a stop that raised left its model ``stopping`` for good (each later request a 500
  ``BadTransition``), and a sleep that raised left it ``sleeping``;
- a crashed backend whose reaping or forgetting raised kept its dead process, so that the
  next request for it waited forever; a failed start or a stop whose process could not be
  forgotten left it ``starting`` or ``stopping``;
- a step after a start that raised (its pages, measurement or probe) answered 500 and left
  the backend unwatched;
- a sleeper whose ram tier bookkeeping raised stayed asleep uncounted, and the load failed;
  the pages of a stop that could not be entered in the tier stayed locked, uncounted;
- a failed sleep or wake whose handling raised left the model ``sleeping`` or ``waking``;
- a staging cache that could not be read at start kept swapd from starting.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from daemon import Daemon, fake_preset, wait_for
from faults import fault_env, faults_met

if TYPE_CHECKING:
    from conftest import StartDaemon

MIB = 1 << 20


def _only_running(d: Daemon, *models: str) -> None:
    """The processes swapd runs are those of ``models``, and nothing else lives on."""
    pids = {d.model(m)["pid"] for m in models}
    assert None not in pids
    assert wait_for(lambda: {p.pid for p in d.leftovers()} == pids, timeout=10)


@pytest.mark.parametrize(
    ("target", "skip"),
    [
        ("swapd.process:Child.stop", 0),  # the stop itself
        ("swapd.cgroups:kill", 0),  # its cgroup's last sweep
        ("swapd.app:Reaper.__call__", 1),  # telling the reaper the group is gone
        ("swapd.manager:Manager._close_connections", 0),  # a step of the stop around it
    ],
)
def test_an_eviction_whose_stop_raises_still_stops_the_victim_and_loads_the_model(
    start_daemon: StartDaemon, tmp_path: Path, target: str, skip: int
) -> None:
    """The victim is stopped (its process ended), the load it made room for goes on."""
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B")},
        {"max_running": 1},
        env=fault_env(tmp_path, target, skip=skip),
    )
    assert d.chat("a")[0] == 200
    status, body = d.chat("b")
    assert faults_met(tmp_path) == 1
    assert status == 200, body
    assert d.model("a")["state"] == "stopped"
    _only_running(d, "b")
    assert d.events("backend.stop.error") or d.events("model.stop.error")
    assert d.chat("a")[0] == 200  # and it loads again, in b's place
    _only_running(d, "a")


def _vllm(binary: str, model_dir: Path) -> dict[str, Any]:
    model_dir.mkdir(parents=True)
    return {"backend": "vllm", "model": str(model_dir), "binary": binary, "sleep": 1}


def test_a_sleep_that_raises_ends_the_process_and_the_model_starts_again(
    start_daemon: StartDaemon, tmp_path: Path, vllm_binary: str
) -> None:
    """An error other than the backend's answer fails the sleep as a refused /sleep does."""
    d = start_daemon(
        {"v": _vllm(vllm_binary, tmp_path / "m"), "w": _vllm(vllm_binary, tmp_path / "n")},
        {"max_running": 1},
        env=fault_env(tmp_path, "swapd.backends.vllm:VllmKind.sleep"),
    )
    assert d.chat("v")[0] == 200
    status, body = d.chat("w")
    assert faults_met(tmp_path) == 1
    assert status == 200, body
    v = d.model("v")
    assert v["state"] == "failed", v
    assert "could not sleep: RuntimeError: injected fault" in v["error"]
    [event] = d.events("model.sleep.error")
    assert "RuntimeError" in event["error"]
    _only_running(d, "w")
    assert d.chat("v")[0] == 200  # started afresh; w sleeps in its place
    assert d.model("w")["state"] == "asleep"


@pytest.mark.llama
@pytest.mark.parametrize(
    "target",
    [
        "swapd.pages:WarmSet.open",  # locking them
        # Entering them in the tier: before, locked but never counted, for good.
        "swapd.manager:Manager._entered_ram",
    ],
)
def test_a_page_lock_that_raises_as_the_model_stops_leaves_it_stopped_on_disk(
    start_daemon: StartDaemon, tmp_path: Path, tiny_gguf: Path, target: str
) -> None:
    """The TTL's stop to the ram tier cannot hold the pages: the model goes to disk."""
    preset = {"backend": "llama-server", "model": str(tiny_gguf), "ttl": "1s"}
    d = start_daemon({"t": preset}, {"ram_budget": 64 * MIB}, env=fault_env(tmp_path, target))
    assert d.chat("t")[0] == 200
    wait_for(lambda: faults_met(tmp_path) == 1, timeout=30)
    wait_for(lambda: d.model("t")["state"] == "stopped", timeout=10)
    assert d.model("t")["tier"] == "disk"
    assert d.events("model.stop.error")
    assert d.leftovers() == []
    status, body = d.chat("t")
    assert status == 200, body


@pytest.mark.parametrize(
    ("target", "event"),
    [
        ("swapd.process:Child.stop", "backend.stop.error"),  # the stop of its group
        ("swapd.manager:Manager._forget_child", "backend.forget.error"),  # letting go of it
    ],
)
def test_a_crashed_backend_whose_reaping_raises_can_be_started_again(
    start_daemon: StartDaemon, tmp_path: Path, target: str, event: str
) -> None:
    """The dead process is let go however its group's stop ends; requests do not hang."""
    d = start_daemon({"a": fake_preset("A")}, env=fault_env(tmp_path, target))
    assert d.chat("a")[0] == 200
    os.kill(d.model("a")["pid"], signal.SIGKILL)
    wait_for(lambda: faults_met(tmp_path) == 1)
    # Before: failed with the dead pid for good, and each request waited for its reaping.
    wait_for(lambda: d.model("a")["pid"] is None, timeout=10)
    assert d.events(event)
    wait_for(lambda: d.chat("a")[0] == 200, timeout=20, interval=0.2)  # after its backoff
    _only_running(d, "a")


@pytest.mark.parametrize(
    ("target", "skip"),
    [
        ("swapd.cgroups:kill", 0),  # the cgroup's last sweep, which ends what left the group
        ("swapd.app:Reaper.__call__", 1),  # telling the reaper the group is gone
    ],
)
def test_a_teardown_that_raises_is_finished_by_the_retry(
    start_daemon: StartDaemon, tmp_path: Path, target: str, skip: int
) -> None:
    """The stop's teardown is run again: what left the group ends, the reaper lets it go.

    Before, the retry only answered the first teardown's error again: a helper that left
    the group (setsid) lived on, and the reaper kept the group, to SIGKILL that process
    group id when swapd died, whichever process holds it by then.
    """
    d = start_daemon(
        {"a": fake_preset("A", "--setsid-helper"), "b": fake_preset("B")},
        {"max_running": 1},
        env=fault_env(tmp_path, target, skip=skip),
    )
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    assert faults_met(tmp_path) == 1
    assert d.model("a")["state"] == "stopped"
    _only_running(d, "b")
    assert [e["model"] for e in d.events("backend.exit")] == ["a"]


@pytest.mark.parametrize(
    ("target", "skip"),
    [
        ("swapd.manager:Manager._drop_pages", 0),  # letting go of pages it started from
        ("swapd.manager:Manager._spawn_task", 3),  # the measurement's task
        ("swapd.manager:Manager._probe_liveness", 0),  # the liveness probe
    ],
)
def test_a_ready_backend_whose_bookkeeping_raises_is_served_and_watched(
    start_daemon: StartDaemon, tmp_path: Path, target: str, skip: int
) -> None:
    """The request is answered, and a later crash of the backend is still noticed."""
    d = start_daemon({"a": fake_preset("A")}, env=fault_env(tmp_path, target, skip=skip))
    status, body = d.chat("a")
    assert faults_met(tmp_path) == 1
    assert status == 200, body
    assert d.events("model.ready.error")
    a = d.model("a")
    assert (a["state"], a["error"]) == ("ready", None)
    os.kill(a["pid"], signal.SIGKILL)
    # Before: unwatched, it stayed ready with its dead pid, each request a 502.
    wait_for(lambda: d.model("a")["pid"] is None, timeout=10)
    assert d.events("backend.crash")
    wait_for(lambda: d.chat("a")[0] == 200, timeout=20, interval=0.2)
    _only_running(d, "a")


def test_a_start_whose_watch_cannot_begin_ends_the_process_and_starts_again(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A backend nothing would watch is not served: stopped, and the next request starts it."""
    env = fault_env(tmp_path, "swapd.manager:Manager._spawn_task", skip=2)  # the watch's task
    d = start_daemon({"a": fake_preset("A")}, env=env)
    status, _ = d.chat("a")
    assert faults_met(tmp_path) == 1
    assert status == 500
    assert d.leftovers() == []
    assert d.model("a")["pid"] is None
    wait_for(lambda: d.chat("a")[0] == 200, timeout=20, interval=0.2)  # after its backoff
    _only_running(d, "a")


def test_a_failed_start_whose_process_cannot_be_forgotten_backs_off(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Failed, not starting for good: the next request is answered, with the start's error."""
    env = fault_env(tmp_path, "swapd.manager:Manager._forget_child")
    d = start_daemon({"a": fake_preset("A", "--exit-at-start", "3")}, env=env)
    status, body = d.chat("a")
    assert faults_met(tmp_path) == 1
    assert status == 502, body
    assert d.events("backend.forget.error")
    a = d.model("a")
    # Before: starting, its dead pid kept, and each later request a 500 BadTransition.
    assert a["state"] in ("failed", "backoff"), a
    assert a["pid"] is None
    assert "exited with 3" in a["error"]
    wait_for(lambda: d.model("a")["state"] == "failed", timeout=10)
    status, body = d.chat("a")
    assert status == 502, body  # started again, and failed again as it does
    assert d.leftovers() == []


def test_an_eviction_that_cannot_forget_its_victim_still_leaves_it_stopped(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Letting go of the stopped process raises, each time: the model is stopped all the same."""
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B")},
        {"max_running": 1},
        env=fault_env(tmp_path, "swapd.manager:Manager._forget_child", times=2),
    )
    assert d.chat("a")[0] == 200
    status, body = d.chat("b")
    assert faults_met(tmp_path) >= 1  # before: twice, the second time out of the stop
    assert status == 200, body
    assert d.events("backend.forget.error")
    # Before: stopping for good, and each request for it a 500 BadTransition.
    assert d.model("a")["state"] == "stopped"
    _only_running(d, "b")
    assert d.chat("a")[0] == 200
    _only_running(d, "a")


def _sleep_beside(
    start_daemon: StartDaemon, tmp_path: Path, vllm_binary: str, target: str
) -> Daemon:
    """v, measured, then put to sleep by a load of w; ``target`` raises once."""
    v = {**_vllm(vllm_binary, tmp_path / "m"), "ram_ttl": "1s"}
    d = start_daemon(
        {"v": v, "w": _vllm(vllm_binary, tmp_path / "n")},
        {"max_running": 1},
        env=fault_env(tmp_path, target),
    )
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["memory"]["measured"], timeout=10)
    status, body = d.chat("w")
    assert faults_met(tmp_path) == 1
    assert status == 200, body  # before: the load that waited for the sleep failed
    return d


def test_a_sleeper_whose_cost_cannot_be_read_is_counted_as_last_measured(
    start_daemon: StartDaemon, tmp_path: Path, vllm_binary: str
) -> None:
    """In the ram tier with the bytes it had, and its ram_ttl ends it there."""
    d = _sleep_beside(start_daemon, tmp_path, vllm_binary, "swapd.manager:Manager._asleep_cost")
    assert d.events("model.measure.fail")
    # Before: asleep, no bytes in the tier and no ram_ttl, for good.
    [entered] = [e for e in d.events("model.tier") if e["model"] == "v"]
    assert entered["tier"] == "ram"
    assert entered["bytes"] > 0
    wait_for(lambda: d.events("model.ram_ttl.expire"), timeout=20)
    wait_for(lambda: d.model("v")["state"] == "stopped", timeout=10)
    _only_running(d, "w")


def test_a_sleeper_the_ram_tier_cannot_take_goes_to_disk(
    start_daemon: StartDaemon, tmp_path: Path, vllm_binary: str
) -> None:
    """Uncounted it would stay asleep for good: it is stopped, and starts again when asked."""
    d = _sleep_beside(start_daemon, tmp_path, vllm_binary, "swapd.manager:Manager._entered_ram")
    assert d.events("model.tier.error")
    wait_for(lambda: d.model("v")["state"] == "stopped", timeout=10)
    _only_running(d, "w")
    assert d.chat("v")[0] == 200
    assert d.model("w")["state"] == "asleep"


def test_a_staging_cache_that_cannot_be_read_at_start_leaves_the_model_unstaged(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """swapd starts, says so, and the model's next load stages it again."""
    model = tmp_path / "models" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(os.urandom(MIB))
    cache = tmp_path / "cache"
    preset = fake_preset("S", stage=True, model=str(model))
    first = start_daemon({"s": preset}, {"cache_dir": str(cache)})
    assert first.chat("s")[0] == 200
    assert first.stop() == 0
    env = fault_env(tmp_path, "swapd.staging:StagingCache.cached_path", error="PermissionError")
    # Before: swapd exited 1 at start, on the traceback of the error.
    d = start_daemon({"s": preset}, {"cache_dir": str(cache)}, env=env)
    assert faults_met(tmp_path) == 1
    [event] = d.events("staging.read.fail")
    assert "injected fault" in event["error"]
    assert d.model("s")["tier"] == "store"  # its copy is not known to be there
    assert d.chat("s")[0] == 200
    assert d.model("s")["tier"] == "device"


def test_a_failed_sleep_whose_handling_raises_still_ends_as_a_failed_sleep(
    start_daemon: StartDaemon, tmp_path: Path, vllm_binary: str
) -> None:
    """Its /sleep answers 404 and remembering that raises: failed, not sleeping for good."""
    no_dev_mode = tmp_path / "bin" / "vllm-no-dev"
    no_dev_mode.write_text(f'#!/bin/sh\nexport VLLM_SERVER_DEV_MODE=0\nexec {vllm_binary} "$@"\n')
    no_dev_mode.chmod(0o755)
    d = start_daemon(
        {"v": _vllm(str(no_dev_mode), tmp_path / "m"), "w": _vllm(vllm_binary, tmp_path / "n")},
        {"max_running": 1},
        env=fault_env(tmp_path, "swapd.manager:Manager._sleep_missing_found"),
    )
    assert d.chat("v")[0] == 200
    status, body = d.chat("w")
    assert faults_met(tmp_path) == 1
    v = d.model("v")
    # Before: sleeping for good, its process kept, each request for it a 500 BadTransition.
    assert v["state"] == "failed", v
    assert status == 200, body
    assert "HTTP 404" in v["error"]
    assert d.events("model.sleep.error")
    _only_running(d, "w")
    assert d.chat("v")[0] == 200  # started afresh; w sleeps in its place
    assert d.model("w")["state"] == "asleep"


def test_a_failed_wake_whose_handling_raises_still_ends_as_a_failed_wake(
    start_daemon: StartDaemon, tmp_path: Path, vllm_binary: str
) -> None:
    """A level-2 wake finds /collective_rpc missing and remembering that raises: failed."""
    preset = {**_vllm(vllm_binary, tmp_path / "m"), "sleep": 2, "ttl": "1s"}
    env = fault_env(tmp_path, "swapd.manager:Manager._sleep_missing_found")
    d = start_daemon({"v": preset}, env={**env, "FAKE_VLLM_NO_RPC": "1"})
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    status, body = d.chat("v")
    assert faults_met(tmp_path) == 1
    v = d.model("v")
    # Before: waking for good, its process kept, each request for it a 500 BadTransition.
    assert v["state"] in ("failed", "backoff"), v
    assert status == 502, body
    assert v["pid"] is None
    assert d.events("model.sleep.error")
    assert d.leftovers() == []
    wait_for(lambda: d.chat("v")[0] == 200, timeout=20, interval=0.2)  # after its backoff
    _only_running(d, "v")
