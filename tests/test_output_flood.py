"""A backend that floods its output with empty lines must not stall swapd's event loop."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
import uvloop

from swapd.process import Child
from swapd.ringlog import RingLog

# 512 KiB of bare newlines: 524,288 lines, as a backend stuck printing blank lines makes.
FLOOD = "import os\nfor _ in range(8): os.write(1, b'\\n' * 65536)\n"
# What the loop may do for one backend's output between two turns of every other task.
MOST_LINES_PER_TURN = 8192


async def _lines_per_turn() -> int:
    ring = RingLog(capacity=10)
    child = Child("flood", [sys.executable, "-c", FLOOD], dict(os.environ), ring=ring)
    await child.spawn()
    most, seen = 0, 0
    exited = asyncio.ensure_future(child.wait_exit())
    while not exited.done():
        await asyncio.sleep(0)  # one turn of the loop: another task's chance to run
        most, seen = max(most, ring.total - seen), ring.total
    await exited
    await child.stop(1.0)
    assert ring.total >= 65536
    return most


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_flood_of_empty_lines_lets_other_tasks_run(loop: str) -> None:
    """Lines are handed over in bounded batches, with loop turns between them.

    Each of a backend's lines costs a log event and a ring entry (about 10 us); a read of
    64 KiB of newlines made 65,536 of them in one go, 0.6-2 s with the loop stopped: every
    request, probe, timer and stop of every model waited meanwhile.
    """
    run = asyncio.run if loop == "asyncio" else uvloop.run
    assert run(_lines_per_turn()) <= MOST_LINES_PER_TURN
