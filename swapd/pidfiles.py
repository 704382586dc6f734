"""Records of running children, so that a later swapd can end an earlier run's leftovers.

Each record holds the pid (also the process group id) and the process start
time; a leftover is killed only if a process with that pid *and* that start
time still exists, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import psutil

from swapd import marks
from swapd.boot import kernel_boot_id
from swapd.logs import get_logger

_log = get_logger("swapd.pidfiles")


class PidRecords:
    """One JSON file per live child under ``state_dir/children``."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "children"

    def add(self, pid: int, model: str, mark: str | None = None) -> None:
        """Record a freshly spawned child, and the mark in its environment (see swapd.marks)."""
        try:
            started = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        record = {"pid": pid, "model": model, "create_time": started, "owner": os.getpid()}
        if mark is not None:
            record["mark"] = mark
        if (boot := kernel_boot_id()) is not None:
            record["boot"] = boot
        path = self.directory / f"{pid}.json"
        tmp = path.with_suffix(".tmp")
        try:
            # A fresh state_dir's first record makes the folder: it may fail as the write does.
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
        except OSError as exc:
            # A full or read-only state_dir: the record is a net for a later swapd only.
            # The reaper, the parent-death signal and the mark still end this child.
            tmp.unlink(missing_ok=True)
            _log.warning("pidfile.write.fail", pid=pid, model=model, error=str(exc))

    def remove(self, pid: int) -> None:
        """Forget a child that has been reaped; a record that cannot be removed is logged."""
        try:
            (self.directory / f"{pid}.json").unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("pidfile.remove.fail", pid=pid, error=str(exc))

    def end_leftovers(self) -> list[int]:
        """SIGKILL the process groups an earlier swapd left behind; return their pids."""
        ended: list[int] = []
        if not self.directory.is_dir():
            return ended
        boot = kernel_boot_id()
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                pid, started = int(record["pid"]), float(record["create_time"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            # pid 0 or 1 is not a child's (killpg(0) would end swapd's own group); a
            # record from before this boot names processes that all ended at the reboot,
            # and its pid and group id are someone else's now.
            if pid <= 1 or _earlier_boot(record, started, boot):
                path.unlink(missing_ok=True)
                continue
            mark = record.get("mark")
            mark = mark if isinstance(mark, str) and mark else None
            # The leader, or (it gone) members of its group. A live pid with another start
            # time is a recycled pid: its group, if it leads one, is not ours. A dead
            # leader's group may be a later holder's of the pid too (a daemon's double
            # fork leaves one): a member carrying the backend's mark proves it ours.
            if _same_process(pid, started) or (
                not psutil.pid_exists(pid) and _ours(_group_members(pid, started), mark)
            ):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                ended.append(pid)
                _log.warning("leftover.kill", pid=pid, model=record.get("model"))
            if mark is not None:
                # Helpers that left the group (setsid) still carry the backend's mark.
                escaped = [p for p in marks.kill_marked(mark) if p not in ended]
                if escaped:
                    ended.extend(escaped)
                    _log.warning("leftover.escaped.kill", pids=escaped, model=record.get("model"))
            path.unlink(missing_ok=True)
        return ended


def _earlier_boot(record: dict[str, object], started: float, boot: str | None) -> bool:
    """Whether a record was written before this boot.

    By the kernel's boot id where both have one; a record without one (an older swapd)
    by its start time, before this boot's, with a minute's slack for clock steps.
    """
    written = record.get("boot")
    if isinstance(written, str) and boot is not None:
        return written != boot
    return started < psutil.boot_time() - 60


def _same_process(pid: int, create_time: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def _ours(members: list[int], mark: str | None) -> bool:
    """Whether a dead leader's group is the backend's: a member carries its mark.

    A record without a mark (from an older swapd) takes any member, as before.
    """
    if not members or mark is None:
        return bool(members)
    marked = set(marks.marked_pids(mark))
    return any(pid in marked for pid in members)


def _group_members(pgid: int, leader_started: float) -> list[int]:
    """Processes still in the group of a dead leader, started after it (so surely its own)."""
    members = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["create_time"] >= leader_started:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members
