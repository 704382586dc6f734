"""Daemon lifecycle: nothing outlives swapd, leftovers are ended, control endpoints work."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from conftest import StartDaemon
from daemon import fake_preset, fake_stats, wait_for, wait_for_gone
from test_reload import Stream


def _reaper(pid: int) -> psutil.Process:
    return next(p for p in psutil.Process(pid).children() if "swapd.reaper" in p.cmdline())


def test_kill_9_of_swapd_leaves_no_child(start_daemon: StartDaemon) -> None:
    """SIGKILL of the daemon ends every backend and every process they forked."""
    d = start_daemon(
        {"a": fake_preset("A", "--fork-child"), "b": fake_preset("B", "--ignore-sigterm")},
        {"max_running": 2},
    )
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    grandchild = fake_stats(d.model("a")["port"])["child_pid"]
    assert isinstance(grandchild, int)
    assert len(d.leftovers()) >= 3  # two backends and a forked helper
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert wait_for_gone(d) == []


def test_kill_9_of_swapd_also_ends_a_helper_that_left_its_group(start_daemon: StartDaemon) -> None:
    """Without cgroups, the reaper finds a setsid() helper by the mark in its environment."""
    d = start_daemon({"a": fake_preset("A", "--setsid-helper")}, {"cgroups": False})
    assert d.chat("a")[0] == 200
    helper = fake_stats(d.model("a")["port"])["child_pid"]
    assert isinstance(helper, int)
    assert os.getsid(helper) != os.getsid(d.model("a")["pid"])  # outside the backend's group
    assert d.proc is not None
    try:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        wait_for(lambda: _gone(helper), timeout=10)
    finally:
        if not _gone(helper):
            os.kill(helper, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_leftovers_of_an_earlier_run_are_ended_at_start(start_daemon: StartDaemon) -> None:
    """If swapd and its reaper both die, the next swapd on the same state_dir ends the leftovers."""
    d = start_daemon({"a": fake_preset("A", "--fork-child")})
    assert d.chat("a")[0] == 200
    grandchild = fake_stats(d.model("a")["port"])["child_pid"]
    assert isinstance(grandchild, int)
    assert d.proc is not None
    # Stopped first, as `pkill -9` ends both at once: swapd cannot start another reaper.
    d.proc.send_signal(signal.SIGSTOP)
    _reaper(d.proc.pid).kill()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    # The backend dies with its parent; the helper it forked is an orphan now.
    assert psutil.pid_exists(grandchild)
    d.start()
    wait_for(lambda: not psutil.pid_exists(grandchild), timeout=5)
    assert [e["pids"] for e in d.events("leftover.ended")]


def test_sigterm_stops_every_backend_before_exit(start_daemon: StartDaemon) -> None:
    """An ordinary stop of swapd stops each backend (grace, then SIGKILL) and exits 0."""
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B", "--ignore-sigterm", stop_timeout="1s")},
        {"max_running": 2},
    )
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    assert d.stop() == 0
    assert wait_for_gone(d) == []
    assert sorted(e["model"] for e in d.events("backend.exit")) == ["a", "b"]


def test_load_and_unload_endpoints(start_daemon: StartDaemon) -> None:
    """POST load makes a model ready without a request; unload stops it; unknown names are 404."""
    d = start_daemon({"a": fake_preset("A")})
    status, body = d.request("POST", "/swapd/models/a/load")
    assert (status, body["state"]) == (200, "ready")
    assert body["pid"] is not None
    status, body = d.request("POST", "/swapd/models/a/unload")
    assert (status, body["state"], body["pid"]) == (200, "stopped", None)
    status, body = d.request("POST", "/swapd/models/nope/load")
    assert status == 404
    assert body["error"]["code"] == "model_not_found"


def test_unload_all_stops_every_model_once_its_requests_finish(start_daemon: StartDaemon) -> None:
    """POST /swapd/unload: a stream in flight ends whole, then every model is stopped."""
    slow = ("--chunks", "20", "--chunk-interval", "0.05")
    d = start_daemon({"a": fake_preset("A", *slow), "b": fake_preset("B"), "c": fake_preset("C")})
    assert d.chat("b")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    pids = [d.model(name)["pid"] for name in ("a", "b")]
    status, body = d.request("POST", "/swapd/unload")
    assert status == 200
    assert {(m["name"], m["state"], m["pid"]) for m in body["models"]} == {
        ("a", "stopped", None),
        ("b", "stopped", None),
        ("c", "stopped", None),
    }
    assert len(stream.finish()) == 21
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert d.request("POST", "/swapd/unload?force=maybe")[0] == 400


def test_the_model_list_shows_descriptions_and_metadata_and_leaves_unlisted_models_out(
    start_daemon: StartDaemon,
) -> None:
    """``description`` and ``metadata`` appear in /v1/models; an ``unlisted`` model is served.

    A reload that changes them applies in place: the backend keeps its pid.
    """
    meta = {"family": "qwen", "context": 8192, "tags": ["chat", "tools"]}
    described = fake_preset("A", description="a chat model", metadata=meta)
    d = start_daemon({"a": described, "embed": fake_preset("E", unlisted=True)})
    _, models = d.get("/v1/models")
    [a] = models["data"]
    assert (a["id"], a["description"], a["metadata"]) == ("a", "a chat model", meta)
    _, embed = d.get("/v1/models/embed")  # found by its name, as requests find it
    assert (embed["id"], "description" in embed) == ("embed", False)
    assert d.chat("embed")[0] == 200
    assert d.chat("a")[0] == 200
    pid = d.model("a")["pid"]
    d.presets = {**d.presets, "a": fake_preset("A", description="renamed")}
    d.write()
    status, plan = d.request("POST", "/swapd/reload")
    assert (status, plan["restarted"]) == (200, [])
    _, models = d.get("/v1/models")
    assert [(m["id"], m["description"], "metadata" in m) for m in models["data"]] == [
        ("a", "renamed", False)
    ]
    assert d.model("a")["pid"] == pid


def test_status_and_models_list_every_model_with_state(start_daemon: StartDaemon) -> None:
    """/v1/models and /swapd/status list all configured models, loaded or not."""
    d = start_daemon({"a": fake_preset("A", aliases=["alpha"]), "b": fake_preset("B")})
    assert d.chat("alpha")[0] == 200
    _, models = d.get("/v1/models")
    assert {(m["id"], m["status"]) for m in models["data"]} == {("a", "ready"), ("b", "stopped")}
    a = d.model("a")
    assert a["aliases"] == ["alpha"]
    assert a["in_flight"] == 0
    assert a["pid"] > 0
    assert a["port"] > 0
    assert a["last_used"] is not None


def test_a_backend_is_stopped_with_none_of_swapds_connections_open(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """swapd closes its kept-alive connections to a backend before it signals the stop.

    A backend's shutdown waits for its open connections to end (llama-server took 145-160
    ms to exit on SIGTERM with a blocking client's idle connection open, 45-55 ms
    without), and every swap waits for the stop.
    """
    report = tmp_path / "open-at-term"
    d = start_daemon({"a": fake_preset("A", "--connections-at-term", str(report))})
    for _ in range(3):
        assert d.chat("a")[0] == 200  # sized answers: the connection is kept for the next
    status, body = d.request("POST", "/swapd/models/a/unload")
    assert (status, body["state"]) == (200, "stopped")
    assert report.read_text() == "0"


def test_a_backend_without_a_health_route_is_ready_once_its_port_accepts(
    start_daemon: StartDaemon,
) -> None:
    """``health: none``: its only health route is elsewhere, and it binds after 1.5 s.

    The request waits for the port (never a refused connection), then is answered.
    """
    late = fake_preset(
        "A", "--health-path", "/elsewhere", "--start-delay", "1.5", "--listen-late", health="none"
    )
    d = start_daemon({"a": late})
    status, body = d.chat("a")
    assert status == 200, body
    assert d.model("a")["state"] == "ready"
    assert d.events("request.error") == []


@pytest.mark.parametrize("killed", ["before the start", "while it serves"])
def test_a_reaper_killed_while_swapd_runs_is_started_again(
    start_daemon: StartDaemon, killed: str
) -> None:
    """A new reaper is told every running group: a later kill -9 of swapd still ends them."""
    d = start_daemon({"a": fake_preset("A", "--fork-child")})
    assert d.proc is not None
    first = _reaper(d.proc.pid)
    if killed == "before the start":
        first.kill()
    assert d.chat("a")[0] == 200
    grandchild = fake_stats(d.model("a")["port"])["child_pid"]
    assert isinstance(grandchild, int)
    if killed == "while it serves":
        first.kill()
    wait_for(lambda: d.events("reaper.gone"))
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert wait_for_gone(d) == []
    assert not psutil.pid_exists(grandchild) or _gone(grandchild)
