"""Leftovers of an earlier run at start: what must be ended, and what must be left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from conftest import StartDaemon
from daemon import fake_preset, fake_stats, wait_for

from swapd.pidfiles import PidRecords

# A classic daemon's shape: a session leader forks its worker and exits. The worker stays
# in the group whose id is the leader's (now free) pid.
DOUBLE_FORK = """
import os, sys, time
if os.fork() == 0:
    time.sleep(600)
    os._exit(0)
print("forked", flush=True)
"""


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def double_forked_worker() -> tuple[int, psutil.Process]:
    """Start a daemon of the classic shape; its leader's (now free) pid and its worker."""
    leader = subprocess.Popen(
        [sys.executable, "-c", DOUBLE_FORK], start_new_session=True, stdout=subprocess.PIPE
    )
    assert leader.stdout is not None
    assert leader.stdout.readline() == b"forked\n"
    leader.stdout.close()
    leader.wait()
    worker = next(
        p for p in psutil.process_iter() if _pgid(p.pid) == leader.pid and p.pid != leader.pid
    )
    return leader.pid, worker


def test_a_recycled_pid_whose_leader_is_gone_does_not_get_its_group_killed(
    start_daemon: StartDaemon,
) -> None:
    """A record's pid P, now the id of an unrelated group whose leader exited, kills nothing.

    The earlier run's backend P died (its group with it); P was then reused by an
    unrelated session leader that forked a worker and exited (a daemon's double fork).
    Group P lives on without its leader, and its worker started after the record's time.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)  # the reaper ends the backend; its record stays
    d.proc.wait()
    children = d.root / "state" / "children"
    [path] = children.glob("*.json")
    record = json.loads(path.read_text())
    wait_for(lambda: not psutil.pid_exists(record["pid"]), timeout=10)
    leader_pid, worker = double_forked_worker()
    try:
        # The record as swapd wrote it, its pid now the (free) pid of that group's leader.
        path.unlink()
        (children / f"{leader_pid}.json").write_text(json.dumps({**record, "pid": leader_pid}))
        d.start()
        assert not gone(worker.pid), "an unrelated process was SIGKILLed at start"
        assert d.events("leftover.kill") == []
    finally:
        if not gone(worker.pid):
            worker.kill()


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def _reaper(pid: int) -> psutil.Process:
    return next(p for p in psutil.Process(pid).children() if "swapd.reaper" in p.cmdline())


def test_a_helper_that_left_its_group_in_an_earlier_run_is_ended_at_start(
    start_daemon: StartDaemon,
) -> None:
    """swapd and its reaper both die: the next swapd ends the setsid() helper too.

    (``pkill -9 -f swapd`` matches both, as does the OOM killer's choice of both.) The
    backend dies with swapd and its group is ended at start, but a helper that left the
    group (setsid) lived on, holding whatever it held, forever.
    """
    d = start_daemon({"a": fake_preset("A", "--setsid-helper")}, {"cgroups": False})
    assert d.chat("a")[0] == 200
    helper = fake_stats(d.model("a")["port"])["child_pid"]
    assert isinstance(helper, int)
    assert d.proc is not None
    try:
        # Stopped first, as `pkill -9` ends both at once: swapd cannot start another reaper.
        d.proc.send_signal(signal.SIGSTOP)
        _reaper(d.proc.pid).kill()
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        assert not gone(helper)
        d.start()
        wait_for(lambda: gone(helper), timeout=10)
    finally:
        if not gone(helper):
            os.kill(helper, signal.SIGKILL)


def test_a_record_with_an_impossible_pid_is_dropped(tmp_path: Path) -> None:
    """A damaged record (a pid below 2) is removed; it neither stops swapd's start nor kills."""
    records = PidRecords(tmp_path)
    folder = records.directory
    folder.mkdir()
    for pid in (-5, 0, 1):
        record = {"pid": pid, "create_time": 1.0, "model": "m"}
        (folder / f"bad{pid}.json").write_text(json.dumps(record))
    assert records.end_leftovers() == []
    assert list(folder.glob("*.json")) == []
