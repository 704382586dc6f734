"""A mark in every backend's environment, to find the helpers that left its process group.

A helper that calls ``setsid()`` leaves its backend's process group, so a group
signal misses it; once its parent dies it is re-parented and no ancestry leads
back to swapd. Its environment still does: every backend starts with
``SWAPD_BACKEND_ID=<run>:<n>`` (one run id per swapd process), which children
inherit unless they clear their environment. A stop without cgroups, and the
reaper when swapd dies, end whatever still carries the mark.

Only the standard library: the reaper imports this and stays small.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import signal
from pathlib import Path

ENV_VAR = "SWAPD_BACKEND_ID"
# This swapd's run: the pid alone could repeat after a reboot or in another pid namespace.
RUN_ID = f"{os.getpid()}-{secrets.token_hex(4)}"
_numbers = itertools.count(1)
# New helpers may fork while the marked ones are being killed: look again, a few times.
_SWEEPS = 3


def new_backend_id() -> str:
    """A mark for the next backend of this run."""
    return f"{RUN_ID}:{next(_numbers)}"


def run_prefix(run_id: str = RUN_ID) -> str:
    """The part every backend mark of a run starts with."""
    return f"{run_id}:"


def marked_pids(mark: str, *, prefix: bool = False, proc: Path = Path("/proc")) -> list[int]:
    """Processes whose environment carries ``mark`` (or a mark starting with it)."""
    wanted = f"{ENV_VAR}={mark}".encode()
    own = {os.getpid(), os.getppid()}
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            environ = (entry / "environ").read_bytes()  # empty for zombies and kernel threads
        except OSError:
            continue  # gone meanwhile, or another user's
        for item in environ.split(b"\0"):
            if item == wanted or (prefix and item.startswith(wanted)):
                found.append(int(entry.name))
                break
    return sorted(found)


def kill_marked(mark: str, *, prefix: bool = False) -> list[int]:
    """SIGKILL every process carrying the mark; the pids killed."""
    killed: list[int] = []
    for _ in range(_SWEEPS):
        pids = [pid for pid in marked_pids(mark, prefix=prefix) if pid not in killed]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed += pids
    return killed
