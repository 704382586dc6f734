"""Teardown that cannot hang: escaped helpers, leaked descriptors, a leader's exit."""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
from conftest import StartDaemon
from daemon import (
    FAKE_UPSTREAM,
    Daemon,
    fake_preset,
    fake_stats,
    hook_env,
    wait_for,
    wait_for_gone,
)

from swapd import marks
from swapd.cgroups import Cgroups


def _kill(pid: int) -> None:
    if psutil.pid_exists(pid):
        os.kill(pid, signal.SIGKILL)


def _helper(d: Daemon, model: str) -> int:
    pid = fake_stats(d.model(model)["port"])["child_pid"]
    assert isinstance(pid, int)
    return pid


def test_unload_is_bounded_when_a_helper_escapes_the_group(start_daemon: StartDaemon) -> None:
    """Without cgroups, a helper that setsid()s no longer stalls a stop, and is ended.

    The leader stops within its grace period; swapd stops reading the pipe a second
    later and reports the escaped helper, then finds it by the mark in its
    environment and kills it.
    """
    d = start_daemon(
        {"a": fake_preset("A", "--setsid-helper", stop_timeout="2s")}, {"cgroups": False}
    )
    assert d.chat("a")[0] == 200
    helper = _helper(d, "a")
    try:
        status, body = d.request("POST", "/swapd/models/a/unload", timeout=30)
        assert (status, body["state"]) == (200, "stopped")
        assert [e["model"] for e in d.events("backend.escaped")] == ["a"]
        assert d.model("a")["escaped"] is True
        wait_for(lambda: d.events("backend.escaped.killed"), timeout=10)
        [killed] = d.events("backend.escaped.killed")
        assert killed["pids"] == [helper]
        wait_for(lambda: _gone(helper), timeout=5)
    finally:
        _kill(helper)


# A helper that leaves the backend's group and writes to the output it shares, on and on.
CHATTY = (
    "import os, time\nos.setsid()\n"
    "while True:\n    print('x' * 100, flush=True)\n    time.sleep(0.01)"
)


def test_a_helper_that_keeps_writing_to_the_output_does_not_make_the_leader_unkillable(
    start_daemon: StartDaemon,
) -> None:
    """The leader exits on SIGTERM at once; its output still flows from an escaped helper.

    The stop waited for that output to end as if for the leader: SIGKILL after the grace
    (backend.kill), then backend.unkillable 10 s on for a process long gone, and -9 for
    its exit status. The leader's own exit counts; the helper is ended by its mark.
    """
    script = f'{sys.executable} -c "{CHATTY}" & exec {sys.executable} {FAKE_UPSTREAM} --port "$0"'
    preset = {"backend": "command", "cmd": ["/bin/sh", "-c", script, "${PORT}"]}
    d = start_daemon({"a": {**preset, "stop_timeout": "2s"}}, {"cgroups": False})
    assert d.chat("a")[0] == 200
    status, body = d.request("POST", "/swapd/models/a/unload", timeout=60)
    assert (status, body["state"]) == (200, "stopped")
    [exited] = d.events("backend.exit")
    assert exited["code"] != -signal.SIGKILL, exited
    assert d.events("backend.unkillable") == []
    assert d.events("backend.kill") == []
    wait_for(lambda: d.events("backend.escaped.killed"), timeout=10)
    assert wait_for_gone(d) == []


def test_a_leader_that_crashes_while_a_helper_writes_on_is_noticed_at_once(
    start_daemon: StartDaemon,
) -> None:
    """The leader dies while serving; an escaped helper still writes to its output.

    The crash waited for that output to end, up to 30 s, and the model stayed ``ready``
    meanwhile, every request to it a 502.
    """
    script = f'{sys.executable} -c "{CHATTY}" & exec {sys.executable} {FAKE_UPSTREAM} --port "$0"'
    preset = {"backend": "command", "cmd": ["/bin/sh", "-c", script, "${PORT}"]}
    d = start_daemon({"a": {**preset, "stop_timeout": "2s"}}, {"cgroups": False})
    assert d.chat("a")[0] == 200
    helper = wait_for(lambda: _escaped_writer(d.model("a")["pid"]))
    os.kill(d.model("a")["pid"], signal.SIGKILL)
    [crash] = wait_for(lambda: d.events("backend.crash"), timeout=20)
    assert crash["code"] == -signal.SIGKILL
    assert psutil.pid_exists(helper)  # noticed while the helper still wrote
    wait_for(lambda: d.events("backend.escaped.killed"), timeout=20)
    assert wait_for_gone(d) == []


def _escaped_writer(leader: int) -> int | None:
    """The pid of the chatty helper the leader forked, once it runs."""
    for child in psutil.Process(leader).children():
        with contextlib.suppress(psutil.Error):
            if any("os.setsid()" in part for part in child.cmdline()):
                return int(child.pid)
    return None


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_leaders_death_is_noticed_while_a_helper_holds_its_output(
    start_daemon: StartDaemon,
) -> None:
    """The leader's exit is a crash at once, and a request after the backoff starts it again.

    (Dead within a minute of ready, it backs off as a failed start would.)
    """
    d = start_daemon({"a": fake_preset("A", "--setsid-helper")}, {"cgroups": False})
    assert d.chat("a")[0] == 200
    helpers = [_helper(d, "a")]
    try:
        leader = d.model("a")["pid"]
        os.kill(leader, signal.SIGKILL)
        wait_for(lambda: d.events("backend.crash"), timeout=15)
        wait_for(lambda: d.chat("a")[0] == 200, timeout=20, interval=0.2)
        helpers.append(_helper(d, "a"))
        assert d.model("a")["pid"] != leader
    finally:
        for helper in helpers:
            _kill(helper)


def test_children_get_only_stdin_stdout_and_stderr(start_daemon: StartDaemon) -> None:
    """Whatever the event loop, nothing of swapd's but fds 0-2 reaches a backend."""
    d = start_daemon({"a": fake_preset("A", "--print-fds")})
    assert d.chat("a")[0] == 200
    _, logs = d.get("/swapd/models/a/logs")
    line = next(x for x in logs["lines"] if x.startswith("fake-upstream: fds "))
    fds = ast.literal_eval(line.removeprefix("fake-upstream: fds "))
    # 0-2, plus the one the listing opened for itself.
    assert fds == [0, 1, 2, 3], fds


def test_a_backend_cgroup_ends_helpers_that_escaped_the_group(start_daemon: StartDaemon) -> None:
    """Where swapd may make cgroups, a stop also kills a setsid() helper, and says so."""
    tree, why = Cgroups.open()
    if tree is None:
        pytest.skip(f"no cgroups to make here: {why}")
    d = start_daemon({"a": fake_preset("A", "--setsid-helper", stop_timeout="2s")})
    assert d.chat("a")[0] == 200
    helper = _helper(d, "a")
    try:
        status, body = d.request("POST", "/swapd/models/a/unload", timeout=30)
        assert (status, body["state"]) == (200, "stopped")
        # A helper forked before the backend joined its cgroup is found by its mark, just
        # after the stop: either way the event comes.
        [event] = wait_for(lambda: d.events("backend.escaped.killed"), timeout=10)
        assert event["pids"] == [helper]
        wait_for(lambda: not psutil.pid_exists(helper), timeout=5)
        assert d.proc is not None
        assert not list(tree.base.glob(f"swapd-{d.proc.pid}-a-*"))  # its cgroup is removed
    finally:
        _kill(helper)


def test_marked_pids_finds_a_backends_mark_in_proc_environ(tmp_path: Path) -> None:
    """Exact marks, run prefixes, zombies (empty environ) and unreadable entries."""

    def proc(pid: int, *env: str) -> None:
        folder = tmp_path / str(pid)
        folder.mkdir()
        (folder / "environ").write_bytes(b"\0".join(e.encode() for e in env) + b"\0")

    proc(10, "PATH=/bin", "SWAPD_BACKEND_ID=run1:1")
    proc(11, "SWAPD_BACKEND_ID=run1:12", "HOME=/")
    proc(12, "SWAPD_BACKEND_ID=run2:1")
    proc(13)  # a zombie: empty environ
    proc(14, "X=SWAPD_BACKEND_ID=run1:1")  # the mark inside another variable's value
    (tmp_path / "15").mkdir()  # no environ to read
    (tmp_path / "self").mkdir()
    assert marks.marked_pids("run1:1", proc=str(tmp_path)) == [10]
    assert marks.marked_pids("run1:", prefix=True, proc=str(tmp_path)) == [10, 11]
    assert marks.marked_pids("run3:", prefix=True, proc=str(tmp_path)) == []


# Loaded by swapd's interpreters (``sitecustomize``): SIGKILL sent to the pid written in
# ``flag`` goes nowhere, as for a process stuck in the kernel (state D); KILL_WAIT is 1 s.
UNKILLABLE = """
import os
import pathlib
import signal

import swapd.process

swapd.process.KILL_WAIT = 1.0
flag = pathlib.Path({flag!r})
killpg, kill = os.killpg, os.kill


def stuck(pid, sig):
    try:
        return sig == signal.SIGKILL and int(flag.read_text()) == pid
    except (OSError, ValueError):
        return False


def killpg_unless_stuck(pgid, sig):
    if not stuck(pgid, sig):
        killpg(pgid, sig)


def kill_unless_stuck(pid, sig):
    if not stuck(pid, sig):
        kill(pid, sig)


os.killpg, os.kill = killpg_unless_stuck, kill_unless_stuck
"""


def test_a_backend_that_sigkill_does_not_end_is_let_go(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A leader that SIGKILL does not end (stuck in the kernel) no longer holds its stop.

    The stop waited for its exit with no bound: the unload never answered, and the model
    stayed ``stopping`` with its slot taken. It now gives up after KILL_WAIT and says so.
    """
    hook = tmp_path / "hook"
    flag = hook / "unkillable"
    d = start_daemon(
        {"a": fake_preset("A", "--ignore-sigterm", stop_timeout="1s")},
        env=hook_env(hook, UNKILLABLE.format(flag=str(flag))),
    )
    assert d.chat("a")[0] == 200
    pid = d.model("a")["pid"]
    flag.write_text(str(pid))
    try:
        status, body = d.request("POST", "/swapd/models/a/unload", timeout=30)
        assert (status, body["state"]) == (200, "stopped")
        [event] = d.events("backend.unkillable")
        assert (event["pid"], event["model"]) == (pid, "a")
        assert pid not in [p for e in d.events("backend.escaped.killed") for p in e["pids"]]
    finally:
        flag.unlink()
        _kill(pid)
    [late] = wait_for(lambda: d.events("backend.unkillable.exit"))
    assert late["pid"] == pid  # reaped once it died at last
    assert d.chat("a")[0] == 200
