"""A watchdog process that kills every backend process group when swapd dies.

swapd starts it once, with a pipe on its stdin, and writes ``+PGID`` when a
backend starts and ``-PGID`` when it has been reaped. When the pipe closes --
swapd exited, crashed or was killed with SIGKILL -- the reaper SIGKILLs each
group still listed. A parent-death signal alone would miss grandchildren such
as vLLM's engine process; the group kill does not. Then it kills every process
that still carries the mark of swapd's run in its environment: helpers that
left their group with ``setsid()`` (see :mod:`swapd.marks`).

Run as ``python -m swapd.reaper RUN_ID``; it ignores SIGINT and SIGTERM so that
it outlives swapd's own ordered shutdown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterable

from swapd import marks


def kill_groups(groups: set[int]) -> None:
    """SIGKILL each process group; groups that are already gone are fine."""
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def watch(stream: Iterable[str]) -> set[int]:
    """Follow ``+PGID``/``-PGID`` lines until end of file; return the groups left."""
    groups: set[int] = set()
    for raw in stream:
        line = raw.strip()
        if len(line) > 1 and line[1:].isdigit():
            pgid = int(line[1:])
            if line[0] == "+":
                groups.add(pgid)
            elif line[0] == "-":
                groups.discard(pgid)
    return groups


def main() -> None:
    """Watch stdin, then kill what is left: the groups, then whatever carries the run's mark."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kill_groups(watch(sys.stdin))
    if len(sys.argv) > 1:
        marks.kill_marked(marks.run_prefix(sys.argv[1]), prefix=True)


if __name__ == "__main__":
    main()
