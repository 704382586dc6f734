"""One swapd per ``state_dir``: a lock held for the daemon's life.

A second instance on the same state directory would otherwise take the first
one's backends for leftovers of a dead run and kill them. The lock is an
``flock`` on ``state_dir/swapd.lock``, released by the kernel however swapd
ends, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from swapd.errors import SwapdError
from swapd.logs import get_logger

_log = get_logger("swapd.instance")


class AlreadyRunning(SwapdError):
    """Another swapd holds the state directory."""

    def __init__(self, state_dir: Path, pid: str) -> None:
        self.pid = pid
        super().__init__(f"already running (pid {pid or 'unknown'}) on state_dir {state_dir}")


class InstanceLock:
    """The held lock; :meth:`release` or process exit frees it."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> InstanceLock:
        """Take the lock or raise :class:`AlreadyRunning` naming the holder's pid."""
        path = state_dir / "swapd.lock"
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            # Never through a link: swapd would truncate whatever it points to.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:  # read-only (a unit's ProtectSystem=strict), or not ours
            hint = " (under systemd: add it to ReadWritePaths=)" if exc.errno == errno.EROFS else ""
            msg = f"cannot use state_dir {state_dir}: {exc.strerror}{hint}"
            raise SwapdError(msg) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(state_dir, holder) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            # A full disk: the lock holds all the same; only a second swapd's message
            # loses the pid it names.
            _log.warning("instance.pid.unwritten", path=str(path), error=exc.strerror or str(exc))
        return cls(fd, path)

    def release(self) -> None:
        """Let another instance start (the file stays; the lock is what counts)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
