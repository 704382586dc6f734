"""Supervision when the disk is full, when swapd was killed, and when it is told twice to stop."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from daemon import FAKE_UPSTREAM, fake_preset, hook_env, wait_for, wait_for_gone

from swapd.cgroups import Cgroups

if TYPE_CHECKING:
    from conftest import StartDaemon

# Every write of a child record fails as on a full disk.
FULL_CHILDREN = """
import errno
import pathlib

_write_text = pathlib.Path.write_text


def _full(self, *args, **kwargs):
    if "children" in str(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return _write_text(self, *args, **kwargs)


pathlib.Path.write_text = _full
"""

# The folder of child records cannot be made, as on a full disk (a fresh state_dir).
NO_ROOM_FOR_CHILDREN = """
import errno
import pathlib

_mkdir = pathlib.Path.mkdir


def _full(self, *args, **kwargs):
    if self.name == "children" and not self.exists():
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return _mkdir(self, *args, **kwargs)


pathlib.Path.mkdir = _full
"""

# The pid written into the instance lock fails as on a full disk.
FULL_LOCK = """
import errno
import os

_pwrite = os.pwrite


def _full(fd, data, offset):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    if target.endswith("swapd.lock"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return _pwrite(fd, data, offset)


os.pwrite = _full
"""


def test_a_full_state_dir_does_not_stop_models_from_starting(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The child record is a net for a later swapd: its write failing is logged, not fatal."""
    d = start_daemon({"a": fake_preset("A")}, env=hook_env(tmp_path / "hook", FULL_CHILDREN))
    status, body = d.chat("a")
    assert status == 200, body
    assert d.events("pidfile.write.fail")
    assert not list((d.root / "state" / "children").glob("*.tmp"))


def test_a_records_folder_a_full_disk_cannot_hold_does_not_stop_models_from_starting(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """On a fresh state_dir the first record makes its folder: that failing is logged too."""
    d = start_daemon({"a": fake_preset("A")}, env=hook_env(tmp_path / "hook", NO_ROOM_FOR_CHILDREN))
    status, body = d.chat("a")
    assert status == 200, body
    assert d.events("pidfile.write.fail")


def test_a_full_disk_under_the_instance_lock_still_starts(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The lock holds without the pid in it: swapd starts, and says what it could not write."""
    d = start_daemon({"a": fake_preset("A")}, env=hook_env(tmp_path / "hook", FULL_LOCK))
    assert d.chat("a")[0] == 200
    assert d.events("instance.pid.unwritten")


def test_a_second_signal_kills_the_backends_and_ends_the_drain(start_daemon: StartDaemon) -> None:
    """Ctrl-C twice: a backend that ignores SIGTERM is not waited for through stop_timeout."""
    d = start_daemon({"a": fake_preset("A", "--ignore-sigterm", stop_timeout="5m")})
    assert d.chat("a")[0] == 200
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: d.events("swapd.shutdown"))
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(timeout=60) == 0  # far short of the 5 minutes it would wait
    assert d.events("swapd.shutdown.forced")
    assert wait_for_gone(d) == []


def test_a_helper_left_in_a_killed_swapds_cgroup_is_ended_at_the_next_start(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """One that made its own session with no environment: neither group nor mark finds it.

    Its cgroup, named after a swapd no longer alive, does: the next start ends it.
    """
    tree, why = Cgroups.open()
    if tree is None:
        pytest.skip(f"no cgroups to make here: {why}")
    pidfile = tmp_path / "helper.pid"
    script = (
        f"sleep 0.5; env -i setsid sh -c 'echo $$ > {pidfile}; exec sleep 1000' "
        f'</dev/null >/dev/null 2>&1 & exec {sys.executable} {FAKE_UPSTREAM} --port "$0" --name A'
    )
    d = start_daemon({"a": {"backend": "command", "cmd": ["/bin/sh", "-c", script, "${PORT}"]}})
    assert d.chat("a")[0] == 200
    helper = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip()))
    try:
        assert "swapd-" in Path(f"/proc/{helper}/cgroup").read_text()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        time.sleep(0.5)  # what the reaper ends, it ends now
        assert psutil.pid_exists(helper)  # it escaped the reaper as well
        d.start()
        wait_for(lambda: not psutil.pid_exists(helper), timeout=10)
        assert d.events("leftover.cgroup.kill")
    finally:
        if psutil.pid_exists(helper):
            os.kill(helper, signal.SIGKILL)
