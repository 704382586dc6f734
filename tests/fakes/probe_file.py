"""The JSON file through which fake backends report "GPU" memory to a file-driven probe.

Layout::

    {"devices": {"gpu0": {"total": <bytes>, "outside": <bytes>}, ...},
     "processes": {"<pid>": {"device": "gpu0", "bytes": <int>, "released_at": <float|null>}}}

``outside`` is memory held by programs the daemon does not manage. A reader counts a
process entry while the pid is alive and ``released_at`` is null, or while the current
time is before ``released_at`` (memory that a dying process frees only after a delay).

Writers hold an exclusive ``flock`` on ``<file>.lock`` and replace the file atomically,
so readers never need the lock. Only the standard library is used: the fake upstream
imports this module while running as a plain script.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

State = dict[str, Any]


def empty_state() -> State:
    """Return the state of a file that does not exist yet."""
    return {"devices": {}, "processes": {}}


def read_state(path: Path | str) -> State:
    """Return the file's content, or an empty state when it does not exist."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return empty_state()
    state: State = json.loads(text)
    state.setdefault("devices", {})
    state.setdefault("processes", {})
    return state


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the writers' lock so that read-modify-write cycles do not interleave."""
    with Path(f"{path}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _update(path: Path | str, change: Callable[[State], None]) -> None:
    """Apply ``change`` to the state under the lock and replace the file atomically."""
    path = Path(path)
    with _locked(path):
        state = read_state(path)
        change(state)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(state, out)
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_devices(path: Path | str, devices: dict[str, dict[str, int]]) -> None:
    """Set the devices (``{"gpu0": {"total": ..., "outside": ...}}``), keeping processes."""

    def change(state: State) -> None:
        state["devices"] = devices

    _update(path, change)


def register(path: Path | str, pid: int, device: str, nbytes: int) -> None:
    """Record that ``pid`` holds ``nbytes`` on ``device`` until it exits or releases."""

    def change(state: State) -> None:
        state["processes"][str(pid)] = {"device": device, "bytes": nbytes, "released_at": None}

    _update(path, change)


def release(path: Path | str, pid: int, delay: float) -> None:
    """Record that ``pid`` frees its memory ``delay`` seconds from now."""

    def change(state: State) -> None:
        entry = state["processes"].get(str(pid))
        if entry is not None:
            entry["released_at"] = time.time() + delay

    _update(path, change)


def pid_alive(pid: int) -> bool:
    """Tell whether a process with this pid exists (zombies count as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def used_bytes(state: State, now: float | None = None) -> dict[str, int]:
    """Return the bytes a reader counts per device: ``outside`` plus held process memory."""
    now = time.time() if now is None else now
    used = {name: int(dev.get("outside", 0)) for name, dev in state["devices"].items()}
    for pid, entry in state["processes"].items():
        released_at = entry["released_at"]
        held = pid_alive(int(pid)) if released_at is None else now < released_at
        if held:
            used[entry["device"]] = used.get(entry["device"], 0) + int(entry["bytes"])
    return used
