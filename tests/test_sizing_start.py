"""One vLLM start at a time per GPU: what a start that waits shows, and a waiter cancelled.

Unit tests of :meth:`swapd.manager.Manager._one_sizing_start`, stepped by events, no timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from swapd.backends.vllm import VLLM
from swapd.manager import Manager
from swapd.presets import Preset
from swapd.probe import Device
from swapd.slot import Slot, snapshot

GPU = Device(id="gpu0", kind="nvidia", index=0, name="GPU 0", visible_env={})


def _slot(name: str) -> Slot:
    preset = Preset(name=name, file=f"presets/{name}.yaml", backend="vllm", model=Path("/m"))
    return Slot(preset, VLLM)


async def _until(check: Any) -> None:
    """Let the other tasks run until ``check()`` holds (a bounded number of loop turns)."""
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("never reached")


Start = Callable[[Slot, asyncio.Event | None], Coroutine[Any, Any, None]]


def _starts() -> tuple[Start, list[str]]:
    """Starts on GPU under one manager's lock: each enters, then holds it until ``ready``."""
    manager = cast("Manager", SimpleNamespace(_sizing_starts={}, _sizing_now={}))
    entered: list[str] = []

    async def start(slot: Slot, ready: asyncio.Event | None) -> None:
        async with Manager._one_sizing_start(manager, slot, GPU):
            entered.append(slot.preset.name)
            if ready is not None:
                await ready.wait()

    return start, entered


def test_a_vllm_start_waiting_for_another_says_so_in_status() -> None:
    """b waits for a's start on gpu0: its status says why (hold), and no longer once it goes."""

    async def main() -> None:
        start, entered = _starts()
        a, b = _slot("a"), _slot("b")
        a_ready = asyncio.Event()
        first = asyncio.create_task(start(a, a_ready))
        await _until(lambda: entered == ["a"])
        second = asyncio.create_task(start(b, None))
        await _until(lambda: b.hold is not None)
        assert entered == ["a"]
        assert snapshot(b).hold == "waits for 'a' to finish starting on gpu0"
        a_ready.set()
        await asyncio.gather(first, second)
        assert entered == ["a", "b"]
        assert snapshot(b).hold is None

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_no_hold_and_the_gpu_free() -> None:
    """A forced unload of a start that waits: nothing stays shown, and the next start goes."""

    async def main() -> None:
        start, entered = _starts()
        a, b, c = _slot("a"), _slot("b"), _slot("c")
        a_ready = asyncio.Event()
        first = asyncio.create_task(start(a, a_ready))
        await _until(lambda: entered == ["a"])
        waiter = asyncio.create_task(start(b, None))
        await _until(lambda: b.hold is not None)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert b.hold is None
        a_ready.set()
        await first
        await start(c, None)
        assert entered == ["a", "c"]

    asyncio.run(main())
