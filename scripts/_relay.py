"""A byte relay on loopback: the cost of one more hop, with no HTTP in it.

``bench_proxy.py --floor`` puts this in front of a backend and measures it like
swapd: what it adds is what any proxy on this machine pays for the extra
process, the two extra system calls and wake-ups per message, and nothing else.
Each client connection is paired with a backend connection opened beforehand,
so connecting is not on the request's path either (swapd reuses pooled ones).

    python scripts/_relay.py LISTEN_PORT BACKEND_PORT    # prints "ready" once listening
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, cast

SPARES = 4  # backend connections kept open ahead of the clients that will use them
LOOPBACK = "127.0.0.1"


class _Backend(asyncio.Protocol):
    """One connection to the backend; what it receives goes to its client."""

    def __init__(self, spares: list[_Backend]) -> None:
        self.spares = spares
        self.transport: asyncio.Transport | None = None
        self.client: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        """Pass the backend's bytes on as they come."""
        if self.client is not None and not self.client.is_closing():
            self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """The backend closed: so does the client's connection; a spare is dropped."""
        del exc
        if self in self.spares:
            self.spares.remove(self)  # backends close idle connections after a few seconds
        if self.client is not None:
            self.client.close()


class Relay:
    """Accepts clients and pairs each with a spare backend connection."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.spares: list[_Backend] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def refill(self) -> None:
        """Open one more backend connection for a future client."""
        loop = asyncio.get_running_loop()
        _, backend = await loop.create_connection(
            lambda: _Backend(self.spares), LOOPBACK, self.backend_port
        )
        self.spares.append(backend)

    def protocol(self) -> asyncio.Protocol:
        """A protocol for one accepted client."""
        return _Client(self)


class _Client(asyncio.Protocol):
    """One client connection; what it sends goes to its backend connection."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.backend: _Backend | None = None
        self.waiting: list[bytes] = []  # sent before a backend connection was ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Take a spare backend connection (or wait for one) and open the next."""
        self.transport = cast("asyncio.Transport", transport)
        if self.relay.spares:
            self._pair(self.relay.spares.pop())
        self._spawn(self.relay.refill() if self.backend else self._connect())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.relay.tasks.add(task)
        task.add_done_callback(self.relay.tasks.discard)

    async def _connect(self) -> None:
        await self.relay.refill()
        self._pair(self.relay.spares.pop())

    def _pair(self, backend: _Backend) -> None:
        self.backend = backend
        backend.client = self.transport
        if backend.transport is not None:
            for data in self.waiting:
                backend.transport.write(data)
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        """Pass the client's bytes on as they come."""
        backend = self.backend.transport if self.backend is not None else None
        if backend is None:
            self.waiting.append(data)
        elif not backend.is_closing():
            backend.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """The client left: close its backend connection."""
        del exc
        if self.backend is not None and self.backend.transport is not None:
            self.backend.client = None
            self.backend.transport.close()


async def serve(listen_port: int, backend_port: int) -> None:
    """Relay until killed."""
    relay = Relay(backend_port)
    for _ in range(SPARES):
        await relay.refill()
    loop = asyncio.get_running_loop()
    await loop.create_server(relay.protocol, LOOPBACK, listen_port)
    print("ready", flush=True)  # the parent waits for this line
    await asyncio.Event().wait()


def main() -> None:
    """Run on uvloop, as swapd does."""
    import uvloop

    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
