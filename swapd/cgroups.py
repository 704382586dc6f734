"""A cgroup per backend, where swapd may make them: stops that also end escaped helpers.

A helper that calls ``setsid()`` leaves its backend's process group, so a signal
to the group misses it. A cgroup v2 holds every descendant whatever it does, and
``cgroup.kill`` ends them all at once. swapd makes one child cgroup per backend
under its own cgroup when it may: under systemd only when the unit delegates its
cgroup (``Delegate=yes``, which systemd marks with a ``delegate`` xattr), and
elsewhere when the directory is writable. Otherwise it says why once and falls back
to process groups and the environment mark of :mod:`swapd.marks`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from pathlib import Path

from swapd.logs import get_logger

_log = get_logger("swapd.cgroups")
_PREFIX = "swapd-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_OWNER = re.compile(rf"^{_PREFIX}(\d+)-")
# How long to wait for a killed cgroup to empty before giving up on removing it.
_EMPTY_TIMEOUT = 2.0


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "cgroup2":
            return Path(before.split()[4])
    return None


def own_cgroup() -> Path | None:
    """The directory of swapd's own cgroup v2, or None without a v2 hierarchy."""
    mount = _cgroup2_mount()
    if mount is None:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return None


def _delegated(path: Path) -> bool:
    for name in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, name) == b"1":
                return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _members(path: Path) -> list[int]:
    try:
        return [int(pid) for pid in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


class Cgroups:
    """Makes, kills and removes the per-backend cgroups under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def open(cls) -> tuple[Cgroups | None, str]:
        """The tree to use, or None and the reason it cannot be used here."""
        try:
            base = own_cgroup()
        except OSError as exc:
            return None, f"cannot read the cgroup of swapd: {exc}"
        if base is None:
            return None, "no cgroup v2 hierarchy"
        if os.environ.get("INVOCATION_ID") and not _delegated(base):
            return None, "the systemd unit does not delegate its cgroup (set Delegate=yes)"
        probe = base / f"{_PREFIX}probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError as exc:
            return None, f"cannot create cgroups under {base}: {exc.strerror or exc}"
        has_kill = (probe / "cgroup.kill").exists()
        probe.rmdir()
        if not has_kill:
            return None, "the kernel has no cgroup.kill (Linux 5.14 or later needed)"
        tree = cls(base)
        tree.clean()
        return tree, ""

    def clean(self) -> None:
        """End and remove the backend cgroups a swapd no longer alive left (a crash, a SIGKILL).

        Names carry the owner's pid, so one swapd never touches another live one's. What is
        still in one escaped its process group and the reaper (a helper that made its own
        session and cleared its environment): a backend's, so ended here.
        """
        for child in self.base.glob(f"{_PREFIX}*"):
            owner = _OWNER.match(child.name)
            if owner is None or _alive(int(owner.group(1))) or not child.is_dir():
                continue
            if _members(child):
                _log.warning("leftover.cgroup.kill", path=str(child), pids=kill(child))
                continue
            with contextlib.suppress(OSError):
                child.rmdir()

    def create(self, model: str) -> Path:
        """A fresh, empty cgroup for one start of ``model``."""
        name = f"{_PREFIX}{os.getpid()}-{_UNSAFE.sub('_', model)[:40]}-{secrets.token_hex(3)}"
        path = self.base / name
        path.mkdir()
        return path


def join(path: Path, pid: int) -> None:
    """Move process ``pid`` (all its threads) into the cgroup ``path``.

    A migration waits for the kernel's cgroup lock, which can take 5-20 ms (an RCU
    grace period): callers run it in a worker thread while the backend starts.
    """
    (path / "cgroup.procs").write_text(str(pid))


def kill_members(path: Path) -> None:
    """SIGKILL every process in ``path`` now, without waiting (gone already: nothing to do)."""
    with contextlib.suppress(OSError):
        (path / "cgroup.kill").write_text("1")


def kill(path: Path) -> list[int]:
    """End every process left in ``path`` and remove it; return the pids that were there.

    Blocking but short; called after the process group is gone, so whatever is
    still in the cgroup escaped the group.
    """
    left = _members(path)
    if left:
        kill_members(path)
    deadline = time.monotonic() + _EMPTY_TIMEOUT
    while _members(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        path.rmdir()
    except OSError as exc:
        _log.warning("cgroup.remove.fail", path=str(path), error=str(exc))
    return left
