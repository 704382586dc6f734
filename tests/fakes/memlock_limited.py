"""Hold a path's pages under a tiny lock limit and print what the hold reports, as JSON.

Usage: ``memlock_limited.py PATH LIMIT_BYTES [--old-kernel]``. It stands in for swapd run
outside its unit, where ``RLIMIT_MEMLOCK`` is small. Root's ``CAP_IPC_LOCK`` ignores the limit,
so the process drops that capability first (a user without it loses nothing). ``--old-kernel``
makes ``MADV_POPULATE_READ`` an advice the kernel refuses, as kernels before 5.14 do, so the
unlocked pages are read in by the fallback.
"""

from __future__ import annotations

import ctypes
import json
import resource
import sys
from pathlib import Path

from swapd import pages
from swapd.pages import WarmFile, WarmSet

_CAPABILITY_VERSION_3 = 0x20080522
_CAP_IPC_LOCK = 14
_UNKNOWN_ADVICE = 0x7FFF


class _Header(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def drop_ipc_lock() -> None:
    """Remove CAP_IPC_LOCK from this process, so that RLIMIT_MEMLOCK applies to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _Header(_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~(1 << _CAP_IPC_LOCK) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def main() -> None:
    """Lower the limit, hold the path and print locked, lock_error, size and residency."""
    path, limit = Path(sys.argv[1]), int(sys.argv[2])
    if "--old-kernel" in sys.argv[3:]:
        pages._MADV_POPULATE_READ = _UNKNOWN_ADVICE
    drop_ipc_lock()
    report: dict[str, object]
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    if path.is_dir():
        with WarmSet.open(path) as held:
            files = [file.locked for file in held.files]
            report = {"locked": held.locked, "lock_error": held.lock_error, "files": files}
            report |= {"size": held.size, "resident": held.resident_bytes()}
    else:
        with WarmFile.open(path) as warm:
            report = {"locked": warm.locked, "lock_error": warm.lock_error}
            report |= {"size": warm.size, "resident": warm.resident_bytes()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
