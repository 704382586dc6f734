"""Readiness polls follow a backend's output, but never faster than READY_POLL_GAP."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
from aiohttp import web

from swapd import process
from swapd.errors import BackendStartError
from swapd.process import Child
from swapd.ringlog import RingLog
from swapd.upstream import UpstreamPool

# Prints a line every 0.1 ms, and never becomes ready.
CHATTY = "import time\nwhile True:\n    print('loading', flush=True)\n    time.sleep(0.0001)\n"


async def _polls_while_chatty(seconds: float) -> tuple[int, float]:
    polls = 0

    async def health(_request: web.Request) -> web.Response:
        nonlocal polls
        polls += 1
        return web.Response(status=503, text="loading")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    child = Child("chatty", [sys.executable, "-c", CHATTY], dict(os.environ), ring=RingLog())
    pool = UpstreamPool()
    await child.spawn()
    started = time.monotonic()
    try:
        with pytest.raises(BackendStartError, match="not ready"):
            await child.wait_ready("127.0.0.1", port, "/health", seconds, pool)
        elapsed = time.monotonic() - started
    finally:
        await child.stop(5)
        pool.close()
        await runner.cleanup()
    assert child.ring.total > 100  # it did print a lot
    return polls, elapsed


def test_a_chatty_backend_is_not_polled_faster_than_the_gap() -> None:
    """Thousands of lines a second; the polls stay within one per READY_POLL_GAP."""
    polls, elapsed = asyncio.run(_polls_while_chatty(0.5))
    assert polls >= 1
    assert polls <= elapsed / process.READY_POLL_GAP + 1
