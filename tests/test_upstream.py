"""The lean upstream client against a scripted HTTP server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Self

import pytest
import pytest_asyncio

from swapd import upstream
from swapd.upstream import UpstreamError, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    return await reader.readexactly(length)


class Server:
    """A loopback server whose behaviour per connection a test scripts."""

    def __init__(self, handler: Handler, port: int = 0) -> None:
        self.handler = handler
        self.connections = 0
        self.port = port  # 0: any free port
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()


@pytest_asyncio.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    """A pool closed after the test."""
    p = UpstreamPool()
    yield p
    p.close()


async def _keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        body = await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


@pytest.mark.asyncio
async def test_keep_alive_connection_is_reused(pool: UpstreamPool) -> None:
    """Two requests in a row travel over one connection and echo their bodies."""
    async with Server(_keep_alive) as server:
        for body in (b"one", b"two"):
            resp = await pool.request("127.0.0.1", server.port, "POST", "/x", [], body)
            assert (resp.status, await resp.read()) == (200, body)
            resp.finish()
        assert server.connections == 1


async def _answer_once_then_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


@pytest.mark.asyncio
async def test_a_connection_the_backend_closed_is_replaced(pool: UpstreamPool) -> None:
    """When the backend closes a kept-alive connection, the next request opens a new one."""
    async with Server(_answer_once_then_close) as server:
        for _ in range(3):
            resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
            assert await resp.read() == b"ok"
            resp.finish()
            await asyncio.sleep(0.05)
        assert server.connections == 3


class _Chunked:
    """Streams two events; the second only once the test has received the first."""

    def __init__(self) -> None:
        self.first_received = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: text/event-stream\r\n\r\n"
        )
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await self.first_received.wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await _keep_alive(reader, writer)


@pytest.mark.asyncio
async def test_chunked_body_arrives_in_pieces_and_the_connection_is_kept(
    pool: UpstreamPool,
) -> None:
    """A chunked answer is handed over as it arrives, then the connection is reused."""
    handler = _Chunked()
    async with Server(handler) as server:
        resp = await pool.request("127.0.0.1", server.port, "POST", "/s", [], b"")
        assert resp.header("content-type") == "text/event-stream"
        chunks = []
        async for chunk in resp.iter_chunks():
            chunks.append(chunk)
            handler.first_received.set()
        resp.finish()
        assert chunks == [b"data: 1\n\n", b"data: 2\n\n"]
        again = await pool.request("127.0.0.1", server.port, "POST", "/e", [], b"hi")
        assert await again.read() == b"hi"
        assert server.connections == 1


async def _burst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    events = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in (b"data: 1\n\n", b"data: 2\n\n"))
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + events + b"0\r\n\r\n")
    await writer.drain()


@pytest.mark.asyncio
async def test_chunks_that_arrived_together_are_handed_over_as_one(pool: UpstreamPool) -> None:
    """Chunks already waiting go to the caller joined: one write to the client, not several."""
    async with Server(_burst) as server:
        resp = await pool.request("127.0.0.1", server.port, "POST", "/s", [], b"")
        chunks = [chunk async for chunk in resp.iter_chunks()]
        resp.finish()
        assert chunks == [b"data: 1\n\ndata: 2\n\n"]


async def _die_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    await writer.drain()


@pytest.mark.asyncio
async def test_backend_dying_mid_body_is_an_error(pool: UpstreamPool) -> None:
    """An answer cut short by the backend raises UpstreamError instead of passing as whole."""
    async with Server(_die_mid_body) as server:
        resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
        with pytest.raises(UpstreamError):
            await resp.read()
        resp.finish()


async def _until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
    await writer.drain()


@pytest.mark.asyncio
async def test_body_delimited_by_close_is_read_whole(pool: UpstreamPool) -> None:
    """An answer with neither length nor chunks ends when the backend closes."""
    async with Server(_until_close) as server:
        resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
        assert await resp.read() == b"all of it"
        resp.finish()


@pytest.mark.asyncio
async def test_refused_connection_is_an_error(pool: UpstreamPool) -> None:
    """Nothing listening is an UpstreamError naming the address."""
    async with Server(_keep_alive) as server:
        port = server.port
    await asyncio.sleep(0.05)
    with pytest.raises(UpstreamError, match=f"cannot connect to 127.0.0.1:{port}"):
        await pool.request("127.0.0.1", port, "GET", "/", [], b"")


class _ReadThenClose:
    """Answers the first request, then reads the next one and closes without answering."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await _read_request(reader)
            self.requests += 1
            if self.requests % 2 == 0:
                return  # read it, maybe ran it, answered nothing
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()


@pytest.mark.asyncio
async def test_a_post_the_backend_may_have_read_is_never_sent_again(pool: UpstreamPool) -> None:
    """A kept-alive connection that closes after reading a POST is an error, not a resend."""
    handler = _ReadThenClose()
    async with Server(handler) as server:
        resp = await pool.request("127.0.0.1", server.port, "POST", "/x", [], b"one")
        assert await resp.read() == b"one"
        resp.finish()
        with pytest.raises(UpstreamError):
            await pool.request("127.0.0.1", server.port, "POST", "/x", [], b"two")
        assert handler.requests == 2  # the backend saw it once, and only once


@pytest.mark.asyncio
async def test_an_idempotent_request_is_retried_once_on_a_fresh_connection(
    pool: UpstreamPool,
) -> None:
    """A GET that got no answer on a reused connection is sent again on a new one."""
    handler = _ReadThenClose()
    async with Server(handler) as server:
        resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
        await resp.read()
        resp.finish()
        resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
        assert resp.status == 200
        resp.finish()
        assert (handler.requests, server.connections) == (3, 2)


@pytest.mark.asyncio
async def test_a_connection_idle_past_reuse_idle_is_not_reused(
    pool: UpstreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle connection older than REUSE_IDLE is closed instead of reused."""
    monkeypatch.setattr("swapd.upstream.REUSE_IDLE", 0.05)
    async with Server(_keep_alive) as server:
        for body in (b"one", b"two"):
            resp = await pool.request("127.0.0.1", server.port, "POST", "/x", [], body)
            await resp.read()
            resp.finish()
            await asyncio.sleep(0.1)
        assert server.connections == 2


async def _hop_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"Content-Type: text/plain\r\nConnection: X-Other\r\nContent-Length: 2\r\n\r\nok"
    )
    await writer.drain()


@pytest.mark.asyncio
async def test_the_headers_a_proxy_decides_on_are_noted_while_parsing(pool: UpstreamPool) -> None:
    """Type, length and every name that a Connection header lists are read off the answer."""
    async with Server(_hop_headers) as server:
        resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
        assert (resp.content_type, resp.content_length) == (b"text/plain", 2)
        assert resp.connection_names == {b"keep-alive", b"x-hop", b"x-other"}
        assert await resp.read() == b"ok"
        resp.finish()


async def _chunked_as_llama(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
        )
        await writer.drain()


@pytest.mark.asyncio
async def test_llama_servers_connection_is_not_kept_after_a_stream(pool: UpstreamPool) -> None:
    """llama-server closes after a chunked answer while announcing keep-alive: never reused."""
    async with Server(_chunked_as_llama) as server:
        for _ in range(2):
            resp = await pool.request("127.0.0.1", server.port, "POST", "/s", [], b"")
            assert await resp.read() == b"data: 1\n\n"
            resp.finish()
        assert server.connections == 2


class _CloseAfterStream(threading.Thread):
    """A blocking server in a thread: each connection gets one chunked answer, then a close.

    In a thread, its close reaches the kernel while the test holds the event loop, as a
    backend's does while swapd is busy with something else.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0

    def run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.connections += 1
                with conn:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += conn.recv(4096)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
                    )


@pytest.mark.asyncio
async def test_a_connection_closed_after_a_stream_is_not_reused(pool: UpstreamPool) -> None:
    """A close already in the kernel is seen before reuse, and the address is remembered."""
    server = _CloseAfterStream()
    server.start()
    try:
        for _ in range(3):
            resp = await pool.request("127.0.0.1", server.port, "POST", "/s", [], b"")
            assert await resp.read() == b"data: 1\n\n"
            resp.finish()
            # Hold the loop: the backend's FIN arrives but stays unread, as under load.
            time.sleep(0.05)  # noqa: ASYNC251
        assert server.connections == 3  # every POST got through, none was lost
    finally:
        server.listener.close()


async def _chunked_keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n0\r\n\r\n"
        )
        await writer.drain()


@pytest.mark.asyncio
async def test_an_ended_backends_port_is_not_remembered(pool: UpstreamPool) -> None:
    """What the pool learned of a backend's address goes with the backend (retired).

    Kept, it grew by one address per backend ever started, and a later backend on the
    same port inherited it: its streamed answers never reused a connection.
    """
    closing = _CloseAfterStream()
    closing.start()
    port = closing.port
    try:
        for _ in range(3):
            resp = await pool.request("127.0.0.1", port, "POST", "/s", [], b"")
            assert await resp.read() == b"data: 1\n\n"
            resp.finish()
            time.sleep(0.05)  # noqa: ASYNC251 - the close arrives while the loop is held
    finally:
        closing.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept: the port is let go
        closing.listener.close()
        closing.join()
    pool.retire("127.0.0.1", port)
    async with Server(_chunked_keep_alive, port) as server:
        for _ in range(3):
            resp = await pool.request("127.0.0.1", port, "POST", "/s", [], b"")
            assert await resp.read() == b"data: 1\n\n"
            resp.finish()
        assert server.connections == 1


class _ThreeChunks:
    """Streams three events, each after the test says it has dealt with the one before."""

    def __init__(self) -> None:
        self.next = asyncio.Queue[None]()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"):
            await self.next.get()
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.mark.asyncio
async def test_a_sink_takes_chunks_as_they_arrive_and_declined_ones_keep_their_order(
    pool: UpstreamPool,
) -> None:
    """What the sink passes on never reaches next_chunk; what it declines is queued.

    Once a chunk waits in the queue, later ones queue behind it even if the sink
    would take them, so the reader sees the body in the backend's order.
    """
    handler = _ThreeChunks()
    offered: list[bytes] = []
    taken: list[bytes] = []
    declines = [False, True, False]  # the second chunk is declined (a client behind)

    arrived = asyncio.Event()

    def sink(chunk: bytes) -> bool:
        offered.append(chunk)
        arrived.set()
        if declines[len(offered) - 1]:
            return False
        taken.append(chunk)
        return True

    async with Server(handler) as server:
        resp = await pool.request("127.0.0.1", server.port, "POST", "/s", [], b"")
        resp.pass_to(sink)
        for _ in range(2):  # the first is taken, the second declined (queued)
            handler.next.put_nowait(None)
            async with asyncio.timeout(10):
                await arrived.wait()
            arrived.clear()
        assert taken == [b"data: 1\n\n"]
        handler.next.put_nowait(None)
        await asyncio.sleep(0.1)  # the third arrives behind a queued chunk: not offered
        assert len(offered) == 2
        assert await resp.read() == b"data: 2\n\ndata: 3\n\n"
        resp.pass_to(None)
        resp.finish()
    assert taken == [b"data: 1\n\n"]


class _Burst:
    """Headers first; then, when told, fifty events in one write, and the end."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await self.go.wait()
        events = [b"data: %d\n\n" % i for i in range(50)]
        writer.write(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.mark.asyncio
async def test_a_sink_is_offered_what_one_read_brought_joined(pool: UpstreamPool) -> None:
    """Fifty events that came in one read go to the sink as one piece: one write, not 50."""
    handler = _Burst()
    offered: list[bytes] = []

    def sink(chunk: bytes) -> bool:
        offered.append(chunk)
        return True

    async with Server(handler) as server:
        resp = await pool.request("127.0.0.1", server.port, "POST", "/s", [], b"")
        resp.pass_to(sink)
        handler.go.set()
        assert await resp.read() == b""  # all of it went to the sink
        resp.finish()
    assert offered == [b"".join(b"data: %d\n\n" % i for i in range(50))]


async def _continue_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    answered = 0
    while True:
        await _read_request(reader)
        answered += 1
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        body = b"answer %d" % answered
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


@pytest.mark.asyncio
async def test_an_interim_100_continue_is_not_taken_for_the_answer(pool: UpstreamPool) -> None:
    """The answer after a 1xx is the request's own; the next request on the connection gets its own.

    Taking the 100 for the answer handed the real one to whichever request came next.
    """
    async with Server(_continue_first) as server:
        for expected in (b"answer 1", b"answer 2"):
            resp = await pool.request("127.0.0.1", server.port, "POST", "/x", [], b"{}")
            assert (resp.status, await resp.read()) == (200, expected)
            resp.finish()
        assert server.connections == 1


async def _stray_after_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        body = await _read_request(reader)
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTRAY"
        if body == b"same read":
            writer.write(answer + stray)
        else:
            writer.write(answer)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(stray)  # while the connection idles in the pool
        await writer.drain()


@pytest.mark.asyncio
async def test_an_answer_the_backend_was_not_asked_for_ends_the_connection(
    pool: UpstreamPool,
) -> None:
    """A stray answer is never the next request's: its connection is closed, not reused.

    Taken as the next answer it handed every later request the answer to the one before.
    """
    async with Server(_stray_after_answer) as server:
        for body in (b"same read", b"later", b"after"):
            resp = await pool.request("127.0.0.1", server.port, "POST", "/x", [], body)
            assert (resp.status, await resp.read()) == (200, body)
            resp.finish()
            await asyncio.sleep(0.1)
        assert server.connections == 3


async def _cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    version = b"HTTP/1.0" if b"/old" in request else b"HTTP/1.1"
    writer.write(version + b" 200 OK\r\nConnection: close\r\nContent-Length: 100\r\n\r\nhalf")
    await writer.drain()


@pytest.mark.asyncio
async def test_a_sized_answer_cut_short_by_a_close_is_an_error(pool: UpstreamPool) -> None:
    """Connection: close (or HTTP/1.0) does not make a short body whole: the backend died."""
    async with Server(_cut_short) as server:
        for target in ("/new", "/old"):
            resp = await pool.request("127.0.0.1", server.port, "GET", target, [], b"")
            with pytest.raises(UpstreamError):
                await resp.read()
            resp.finish()


@pytest.mark.asyncio
async def test_an_answer_whose_last_coding_is_not_chunked_ends_at_the_close(
    pool: UpstreamPool,
) -> None:
    """``chunked, gzip`` is read until the backend closes (RFC 9112): whole, not cut short."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nraw-body"
    async with Server(functools.partial(_write_once, answer)) as server:
        resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
        assert await resp.read() == b"raw-body"
        resp.finish()


async def _endless(
    start: bytes,
    unit: bytes,
    times: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Answer with ``start``, then ``unit`` over and over: an answer that never ends."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(start)
    with contextlib.suppress(ConnectionError):
        for _ in range(times):
            writer.write(unit)
            await writer.drain()


# 10 MB of header lines; 10 MB of one trailer line; 40 MB of chunks: none ever ends.
_ENDLESS_HEADERS = functools.partial(
    _endless, b"HTTP/1.1 200 OK\r\n", b"X-More: " + b"a" * 90 + b"\r\n", 100_000
)
_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
_ENDLESS_TRAILER = functools.partial(
    _endless, _CHUNKED + b"5\r\nhello\r\n0\r\nX-Trailer: ", b"t" * 1000, 10_000
)
_ENDLESS_BODY = functools.partial(_endless, _CHUNKED, b"1000\r\n" + b"a" * 4096 + b"\r\n", 10_000)


@pytest.mark.asyncio
async def test_headers_that_never_end_are_an_error_not_a_growing_buffer(
    pool: UpstreamPool,
) -> None:
    """The parser keeps an unfinished header section whole: past 64 KiB the answer fails.

    A backend that sent header lines forever took swapd to gigabytes.
    """
    async with Server(_ENDLESS_HEADERS) as server:
        with pytest.raises(UpstreamError, match="KiB of headers or trailers"):
            await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")


@pytest.mark.asyncio
async def test_a_trailer_that_never_ends_is_an_error_too(pool: UpstreamPool) -> None:
    """After the last chunk the parser keeps a trailer line whole: capped as headers are."""
    async with Server(_ENDLESS_TRAILER) as server:
        resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
        try:
            with pytest.raises(UpstreamError, match="KiB of headers or trailers"):
                await resp.read()
        finally:
            resp.finish()


@pytest.mark.asyncio
async def test_a_read_with_a_limit_stops_at_it(pool: UpstreamPool) -> None:
    """swapd's own calls (health, sleep) read at most CONTROL_BODY_LIMIT of an answer.

    A health path that streamed forever took swapd to gigabytes within start_timeout.
    """
    async with Server(_ENDLESS_BODY) as server:
        with pytest.raises(UpstreamError, match="more than swapd reads"):
            await pool.control("127.0.0.1", server.port, "GET", "/health")


async def _write_once(
    answer: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(answer)
    await writer.drain()


async def _head_then_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n")
        if not head.startswith(b"HEAD"):
            writer.write(b'{"answer":"GET"}\n')
        await writer.drain()


@pytest.mark.asyncio
async def test_a_head_answer_is_whole_at_its_headers(pool: UpstreamPool) -> None:
    """The parser cannot know the request was HEAD: its answer ends at the headers."""
    async with Server(_head_then_get) as server:
        resp = await pool.request("127.0.0.1", server.port, "HEAD", "/props", [], b"")
        async with asyncio.timeout(5):
            assert (resp.status, resp.content_length, await resp.read()) == (200, 17, b"")
        resp.finish()
        resp = await pool.request("127.0.0.1", server.port, "GET", "/props", [], b"")
        assert await resp.read() == b'{"answer":"GET"}\n'
        resp.finish()


async def _trailer_and_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    if b"/upgrade" in request:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )
    else:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
            b"2\r\nok\r\n0\r\nX-T: tail\r\nContent-Type: text/evil\r\n\r\n"
        )
    await writer.drain()


@pytest.mark.asyncio
async def test_trailers_are_not_headers_and_a_switch_of_protocol_is_refused(
    pool: UpstreamPool,
) -> None:
    """Trailer fields never join the answer's headers; a 101 is an error, not an answer."""
    async with Server(_trailer_and_upgrade) as server:
        resp = await pool.request("127.0.0.1", server.port, "GET", "/t", [], b"")
        assert await resp.read() == b"ok"
        assert resp.content_type is None
        assert [k for k, _ in resp.raw_headers] == [b"Transfer-Encoding", b"Trailer"]
        resp.finish()
        with pytest.raises(UpstreamError):
            await pool.request("127.0.0.1", server.port, "GET", "/upgrade", [], b"")


class _Transport:
    """A transport that only records whether its protocol reads."""

    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, _name: str) -> None:
        return None

    def close(self) -> None:
        pass


@pytest.mark.asyncio
async def test_an_answer_that_ends_while_its_reader_is_behind_leaves_the_connection_reading() -> (
    None
):
    """The read that pauses the backend also ends the answer: recycled, it reads again.

    Kept paused in the pool, the next request on it waited for ever.
    """
    conn = upstream._Connection()
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.expecting = True
    body = b"x" * (upstream._HIGH_WATER + 10)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert conn.complete
    assert not transport.reading
    conn.recycle()
    assert transport.reading


@pytest.mark.asyncio
async def test_a_reset_with_the_request_unread_by_a_closing_listener_is_not_sent(
    pool: UpstreamPool,
) -> None:
    """A listener that dies with the connection in its queue never read the request.

    The kernel completed the handshake and took the request; the process closed the
    listener without accepting it, which resets the connection. That request never ran:
    NotSent, so the proxy waits for the exit and leases it again (before: a 502).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # never accepted
    port = listener.getsockname()[1]
    sent = asyncio.ensure_future(pool.request("127.0.0.1", port, "POST", "/", [], b"{}"))
    try:
        async with asyncio.timeout(10):
            # The request sits in the accept queue, unread (no event tells when).
            while not _queued(port):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            listener.close()
            with pytest.raises(upstream.NotSent, match="reset the connection unread"):
                await sent
    finally:
        listener.close()
        sent.cancel()


def _queued(port: int) -> bool:
    """Whether a connection to ``port`` holds bytes nobody has read (``ss`` would show them)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, queue = fields[1], fields[4]
        if int(local.split(":")[1], 16) == port and int(queue.split(":")[1], 16) > 0:
            return True
    return False


@pytest.mark.asyncio
async def test_a_cut_exchange_drops_the_idle_connections_to_that_backend(
    pool: UpstreamPool,
) -> None:
    """After a backend cuts one exchange short, its kept-alive connections are not reused.

    A cut most often means the backend died; a POST written on one of its idle
    connections before their close arrives would be lost.
    """
    answered = 0

    async def first_answers_then_cuts(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal answered
        while True:
            body = await _read_request(reader)
            if body == b"cut":
                writer.transport.abort()
                return
            answered += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with Server(first_answers_then_cuts) as server:
        held = await pool.request("127.0.0.1", server.port, "POST", "/", [], b"a")
        idle = await pool.request("127.0.0.1", server.port, "POST", "/", [], b"b")
        for resp in (held, idle):
            assert await resp.read() == b"ok"
        idle.finish()  # one connection idle in the pool, one still out
        held.finish()
        assert server.connections == 2
        with pytest.raises(UpstreamError):
            await pool.request("127.0.0.1", server.port, "POST", "/", [], b"cut")
        resp = await pool.request("127.0.0.1", server.port, "POST", "/", [], b"c")
        assert await resp.read() == b"ok"
        resp.finish()
        assert server.connections == 3  # a new connection, not the idle one
