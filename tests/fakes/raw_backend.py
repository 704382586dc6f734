"""A raw-socket backend that breaks its answer on purpose, as the request's JSON "mode" says.

Modes: ``ok`` (a small JSON answer), ``close_after_headers`` (SSE headers, then a close),
``cut_sized`` (a 2 MiB Content-Length, 100 bytes, then a close), ``stall_partial``
(SSE headers and half an event, then nothing until swapd closes) and ``stall_error``
(a chunked HTML 500 and the start of its text, then nothing until swapd closes),
``late_headers`` (SSE headers after 0.97 s, then nothing until swapd closes),
``cut_mid_stream`` (SSE headers, one event and half the next, then a close),
``flood`` (SSE headers, then 1 MiB events as fast as swapd takes them, until it closes),
``status_000`` (a JSON answer whose status is 000, then a close), ``deep_error``
(a JSON 500 whose body nests 5,000 arrays deep, then a close) and ``gzip_error`` (an
HTML 500 in gzip, as a server that compresses what it sends, then a close).
``/health`` answers 503 until ``--start-delay`` seconds have passed, then 200.

    python tests/fakes/raw_backend.py --port PORT [--start-delay SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """The path and body of one request on ``reader``."""
    head = await reader.readuntil(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return first.split(" ")[1], body


class RawBackend:
    """Serves /health, and each POST as its body's "mode" says."""

    def __init__(self, start_delay: float) -> None:
        self.ready_at = time.monotonic() + start_delay

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests until one of them closes it."""
        try:
            while True:
                path, body = await read_request(reader)
                if path == "/health":
                    ready = time.monotonic() >= self.ready_at
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                        if ready
                        else b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n"
                    )
                elif not await self._answer(json.loads(body).get("mode", "ok"), reader, writer):
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _answer(
        mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Write the answer ``mode`` names; False when the connection is to end."""
        breaking = _BREAKING.get(mode)
        if breaking is not None:
            await breaking(reader, writer)
            return False
        answer = b'{"ok": true}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
        )
        return True


async def _close_after_headers(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_HEAD)


async def _cut_sized(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    writer.write(head + b"Content-Length: %d\r\n\r\n" % (2 << 20) + b"x" * 100)


async def _late_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(0.97)
    writer.write(SSE_HEAD)
    await writer.drain()
    await reader.read()  # until swapd closes the connection


async def _cut_mid_stream(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_HEAD + _chunk(b'data: {"n": 1}\n\n'))
    await writer.drain()
    await asyncio.sleep(0.1)  # the first event reaches the client on its own
    writer.write(_chunk(b'data: {"n": '))


async def _flood(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_HEAD)
    event = _chunk(b"data: " + b"x" * (1 << 20) + b"\n\n")
    while True:  # until swapd closes the connection (ConnectionError)
        writer.write(event)
        await writer.drain()


async def _stall_partial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_HEAD + _chunk(b'data: {"choices": [{"delta": {"content": "x'))
    await writer.drain()
    await reader.read()  # until swapd closes the connection


async def _stall_error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = b"HTTP/1.1 500 X\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
    writer.write(head + _chunk(b"<html><body>the backend broke"))
    await writer.drain()
    await reader.read()  # until swapd closes the connection


async def _deep_error(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    text = b"[" * 5000
    head = b"HTTP/1.1 500 X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    writer.write(head % len(text) + text)


async def _status_000(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 000 X\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")


async def _gzip_error(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    text = gzip.compress(b"<html><body>the backend broke" + b" " * 2000 + b"</body></html>")
    head = b"HTTP/1.1 500 X\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\n"
    writer.write(head + b"Content-Length: %d\r\n\r\n" % len(text) + text)


# The modes that end the connection, each after what it writes.
_BREAKING: dict[
    str, Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]
] = {
    "close_after_headers": _close_after_headers,
    "cut_sized": _cut_sized,
    "late_headers": _late_headers,
    "cut_mid_stream": _cut_mid_stream,
    "flood": _flood,
    "stall_partial": _stall_partial,
    "stall_error": _stall_error,
    "deep_error": _deep_error,
    "status_000": _status_000,
    "gzip_error": _gzip_error,
}


async def main() -> None:
    """Listen on --port until killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-delay", type=float, default=0.0)
    args = parser.parse_args()
    backend = RawBackend(args.start_delay)
    server = await asyncio.start_server(backend.serve, "127.0.0.1", args.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
