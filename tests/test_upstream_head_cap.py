"""The 64 KiB cap on a backend's header block (and trailers) holds however the bytes arrive.

Two levels: a connection fed exact reads (deterministic read boundaries: one read, the
last byte apart, 1000-byte reads), and a loopback backend that writes its answer in one
write or in many.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Self

import pytest
import pytest_asyncio

from swapd import upstream
from swapd.upstream import MAX_HEAD_BYTES, UpstreamError, UpstreamPool

CAP = MAX_HEAD_BYTES
SIZED = b"Content-Length: 2\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
SIZED_BODY = b"ok"
CHUNKED_BODY = b"2\r\nok\r\n0\r\n\r\n"


def head_block(total: int, framing: bytes) -> bytes:
    """A status line and headers, blank line included, of exactly ``total`` bytes."""
    start = b"HTTP/1.1 200 OK\r\n" + framing
    pad = total - len(start) - len(b"X-Pad: \r\n\r\n")
    block = start + b"X-Pad: " + b"a" * pad + b"\r\n\r\n"
    assert len(block) == total
    return block


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, _name: str) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def _feed(reads: list[bytes]) -> upstream._Connection:
    conn = upstream._Connection()
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.expecting = True
    for data in reads:
        if transport.closed:
            break
        conn.data_received(data)
    return conn


def _splits(head: bytes, body: bytes) -> dict[str, list[bytes]]:
    whole = head + body
    return {
        "one read with the body": [whole],
        "one read, body later": [head, body],
        "last byte of the head with the body": [head[:-1], head[-1:] + body],
        "1000-byte reads": [whole[i : i + 1000] for i in range(0, len(whole), 1000)],
    }


CASES = [
    (size, kind, split)
    for size in (CAP - 1, CAP, CAP + 1, 3 * CAP)
    for kind in ("sized", "chunked")
    for split in _splits(b"", b"")
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("size", "kind", "split"), CASES)
async def test_the_head_cap_does_not_depend_on_read_boundaries(
    size: int, kind: str, split: str
) -> None:
    """A head of at most 64 KiB is an answer; one byte more is an error before any status.

    Before: a head over the cap passed whenever its last bytes came in the read that
    took it over (one write of 200 KB with its body was a 200), and a chunked one whose
    body came later was a 200 whose body then failed.
    """
    framing, body = (SIZED, SIZED_BODY) if kind == "sized" else (CHUNKED, CHUNKED_BODY)
    conn = _feed(_splits(head_block(size, framing), body)[split])
    assert conn.headers_ready.done()
    if size <= CAP:
        assert conn.headers_ready.exception() is None
        assert (conn.status, conn.error, conn.complete) == (200, None, True)
        assert b"".join(conn.chunks) == b"ok"
    else:
        exc = conn.headers_ready.exception()
        assert isinstance(exc, UpstreamError), f"a {size}-byte head was taken as an answer"
        assert "KiB of headers" in str(exc)


@pytest.mark.asyncio
async def test_header_bytes_do_not_count_against_the_trailer_cap() -> None:
    """A head under the cap, then body-less reads (a chunk-size line) are not over it.

    Before: the read that ended the head counted whole as "idle" bytes, so a 60 KB head
    and a 5 KB chunk extension read as 65+ KB of trailers.
    """
    head = head_block(CAP - 100, CHUNKED)
    conn = _feed([head, b"2;ext=" + b"e" * 200, b"\r\nok\r\n0\r\n\r\n"])
    assert (conn.error, conn.complete, b"".join(conn.chunks)) == (None, True, b"ok")


def _trailer_reads(size: int, split: str) -> list[bytes]:
    start = b"HTTP/1.1 200 OK\r\n" + CHUNKED + b"\r\n2\r\nok\r\n0\r\n"
    trailer = b"X-T: " + b"t" * (size - len(b"X-T: \r\n")) + b"\r\n"
    end = b"\r\n"
    if split == "one read":
        return [start + trailer + end]
    if split == "after the body":
        return [start, trailer + end]
    return [start] + [trailer[i : i + 1000] for i in range(0, len(trailer), 1000)] + [end]


@pytest.mark.asyncio
@pytest.mark.parametrize("split", ["one read", "after the body", "1000-byte reads"])
async def test_trailers_over_the_cap_fail_however_they_arrive(split: str) -> None:
    """Trailers of 3 x 64 KiB are an error in every split (before: only in small reads)."""
    conn = _feed(_trailer_reads(3 * CAP, split))
    assert conn.headers_ready.exception() is None
    assert conn.error is not None, "trailers over the cap were accepted"
    assert "KiB of headers or trailers" in str(conn.error)


@pytest.mark.asyncio
@pytest.mark.parametrize("split", ["one read", "after the body", "1000-byte reads"])
async def test_trailers_under_the_cap_pass_however_they_arrive(split: str) -> None:
    """Trailers just under the cap are dropped, the body whole, the connection reusable."""
    conn = _feed(_trailer_reads(CAP - 100, split))
    assert (conn.error, conn.complete, conn.reusable()) == (None, True, True)
    assert b"".join(conn.chunks) == b"ok"


# ---- over a socket: one write or many


class _Backend:
    """Answers each request with the next scripted answer: a list of writes."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while self.answers:
                await reader.readuntil(b"\r\n\r\n")  # the requests here have no body
                for data in self.answers.pop(0):
                    writer.write(data)
                    await writer.drain()
                    await asyncio.sleep(0.01)  # pacing only: each write its own read
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@pytest_asyncio.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    """A pool closed after the test."""
    p = UpstreamPool()
    yield p
    p.close()
    await asyncio.sleep(0)  # let the transports close


async def _get(pool: UpstreamPool, port: int) -> tuple[int, bytes]:
    async with asyncio.timeout(10):
        resp = await pool.request("127.0.0.1", port, "GET", "/", [], b"")
        try:
            return resp.status, await resp.read()
        finally:
            resp.finish()


async def _status(pool: UpstreamPool, port: int) -> int:
    """The status alone: an error here is one before any answer began."""
    async with asyncio.timeout(10):
        resp = await pool.request("127.0.0.1", port, "GET", "/", [], b"")
    resp.finish()
    return resp.status


NEXT = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"]


def _writes(head: bytes, body: bytes, how: str) -> list[bytes]:
    if how == "one write":
        return [head + body]
    if how == "head, then body":
        return [head, body]
    whole = head + body
    return [whole[i : i + 4096] for i in range(0, len(whole), 4096)]


HOW = ["one write", "head, then body", "4 KiB writes"]


@pytest.mark.asyncio
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("kind", ["sized", "chunked"])
@pytest.mark.parametrize("size", [CAP + 1, 100_000])
async def test_a_head_over_the_cap_is_refused_and_the_next_request_gets_its_own_answer(
    pool: UpstreamPool, size: int, kind: str, how: str
) -> None:
    """Over loopback: a head over 64 KiB is an UpstreamError before any status, however written.

    Before: written at once (one read), it was a 200; a chunked one whose body came
    later was a 200 whose body then failed.
    """
    framing, body = (SIZED, SIZED_BODY) if kind == "sized" else (CHUNKED, CHUNKED_BODY)
    answer = _writes(head_block(size, framing), body, how)
    async with _Backend([answer, NEXT, NEXT]) as backend:
        async with asyncio.timeout(10):
            with pytest.raises(UpstreamError, match="KiB of headers"):
                await _status(pool, backend.port)  # before: a 200 (a body that failed after)
        assert await _get(pool, backend.port) == (200, b"next")


@pytest.mark.asyncio
@pytest.mark.parametrize("how", HOW)
async def test_a_head_of_exactly_the_cap_is_an_answer_and_the_connection_is_kept(
    pool: UpstreamPool, how: str
) -> None:
    """A head of exactly 64 KiB, then a second request on the same connection."""
    answer = _writes(head_block(CAP, SIZED), SIZED_BODY, how)
    async with _Backend([answer, NEXT]) as backend:
        assert await _get(pool, backend.port) == (200, b"ok")
        assert await _get(pool, backend.port) == (200, b"next")
        assert backend.connections == 1
