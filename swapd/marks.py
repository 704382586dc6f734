"""A mark in every backend's environment, to find the helpers that left its process group.

A helper that calls ``setsid()`` leaves its backend's process group, so a group
signal misses it; once its parent dies it is re-parented and no ancestry leads
back to swapd. Its environment still does: every backend starts with
``SWAPD_BACKEND_ID=<run>:<n>`` (one run id per swapd process), which children
inherit unless they clear their environment. Every stop (after the group and the
cgroup), and the reaper when swapd dies, end whatever still carries the mark.

Only ``os`` and friends: the reaper imports this and stays small (no pathlib, no
secrets: each costs it megabytes of resident memory).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from collections.abc import Collection

ENV_VAR = "SWAPD_BACKEND_ID"
# This swapd's run: the pid alone could repeat after a reboot or in another pid namespace.
RUN_ID = f"{os.getpid()}-{os.urandom(4).hex()}"
_numbers = itertools.count(1)
# New helpers may fork while the marked ones are being killed: look again, a few times.
_SWEEPS = 3


def new_backend_id() -> str:
    """A mark for the next backend of this run."""
    return f"{RUN_ID}:{next(_numbers)}"


def run_prefix(run_id: str = RUN_ID) -> str:
    """The part every backend mark of a run starts with."""
    return f"{run_id}:"


def marked_pids(
    mark: str, *, prefix: bool = False, proc: str = "/proc", skip: Collection[int] = ()
) -> list[int]:
    """Processes whose environment carries ``mark`` (or a mark starting with it).

    ``skip`` is never read: a process stuck in the kernel can block a read of its
    environment for as long as it is stuck.
    """
    wanted = f"{ENV_VAR}={mark}".encode()
    own = {os.getpid(), os.getppid(), *skip}
    found = []
    for name in os.listdir(proc):  # noqa: PTH208 - no pathlib here
        if not name.isdigit() or int(name) in own:
            continue
        try:
            with open(os.path.join(proc, name, "environ"), "rb") as environ:  # noqa: PTH118, PTH123 - no pathlib here
                items = environ.read().split(b"\0")  # empty for zombies and kernel threads
        except OSError:
            continue  # gone meanwhile, or another user's
        if any(item == wanted or (prefix and item.startswith(wanted)) for item in items):
            found.append(int(name))
    return sorted(found)


def kill_marked(mark: str, *, prefix: bool = False, skip: Collection[int] = ()) -> list[int]:
    """SIGKILL every process carrying the mark (but ``skip``); the pids killed."""
    killed: list[int] = []
    for _ in range(_SWEEPS):
        pids = [pid for pid in marked_pids(mark, prefix=prefix, skip=skip) if pid not in killed]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed += pids
    return killed
