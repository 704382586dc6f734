"""A lean HTTP/1.1 client for backends on loopback: pooled keep-alive connections, raw bytes.

The proxy's own work per request is what swapd adds to every answer; a
general-purpose client (cookies, redirects, tracing, header multidicts) cost
more than half of it. This client does only what a proxy to a local backend
needs: send the client's bytes in one write, parse the answer with httptools,
hand body chunks over as they arrive (pausing the backend when the client is
slow), and keep the connection for the next request when the answer is whole.
The few headers the proxy decides on (type, length, ``Connection``) are noted
while the parser reads them, so nothing walks the header list twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import cast

import httptools

# A kept-alive connection idle longer than this is not reused: backends close idle
# connections after a few seconds (llama-server and uvicorn after 5 s), and a request
# written into one that is closing may or may not have been read.
REUSE_IDLE = 2.0
# Methods that may be sent again when a reused connection fails before any answer. Any
# other request may have been read and run by the backend, so it is never resent.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
# Stop reading from a backend when this much body waits for a slow client.
_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 18
# Chunks already waiting are handed over as one, up to this size: one write to the
# client instead of several, and never a delay (only what has arrived is joined).
_JOIN_LIMIT = 1 << 16
# Servers (their Server header) known to close a connection right after a chunked answer
# while announcing keep-alive: llama-server (cpp-httplib) does, within microseconds.
_CLOSE_AFTER_CHUNKED = (b"llama.cpp",)
# An answer's status line and headers (interim answers included) may take this much; the
# parser keeps an unfinished header whole, so a backend that never ends one would
# otherwise grow swapd without bound.
MAX_HEAD_BYTES = 64 * 1024
_OVER_CAP = f"the backend sent over {MAX_HEAD_BYTES // 1024} KiB of headers or trailers"
# The body of an answer to swapd's own calls (health polls, sleep and wake).
CONTROL_BODY_LIMIT = 1 << 20


class UpstreamError(Exception):
    """The backend closed the connection or sent something that is not HTTP."""


class NotSent(UpstreamError):
    """The backend refused the connection: the request never reached it."""


class _Connection(asyncio.Protocol):
    """One TCP connection to a backend, carrying one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._poll: select.poll | None = None
        self.closed = False
        self.cut = False  # the backend ended the connection in the middle of an exchange
        self.reset = False  # ... with a reset: it closed with what swapd sent still unread
        self.after_chunked = False  # the previous answer on this connection was chunked
        self._loop = asyncio.get_running_loop()
        # Made once connected: the parser holds this connection's callbacks, a cycle that a
        # connection refused (never made, never lost) would leave to the cyclic collector.
        self._parser: httptools.HttpResponseParser
        self.chunks: deque[bytes] = deque()
        self._reset()

    def _reset(self) -> None:
        self.headers_ready: asyncio.Future[None] = self._loop.create_future()
        self.status = 0
        self._reset_headers()
        self._interim = False  # parsing a 1xx answer (100 Continue): the real one follows
        self._reading = False  # inside data_received
        self.expecting = False  # a request is out and its answer not yet begun or whole
        self.head = False  # the request is a HEAD: the answer has headers only
        self._refused = ""  # why a callback stopped the parser
        self.chunks.clear()
        self.buffered = 0
        self.complete = False
        self.received_any = False
        self._head_bytes = 0  # read while the answer's headers were not yet complete
        # The head's size as the parser saw it (interim answers included), and the trailers':
        # capped however the bytes were split into reads.
        self._head_size = 0
        self._trailer_size = 0
        self._idle_bytes = 0  # read since the body last grew (a trailer section, say)
        self.idle_since = 0.0
        self.error: UpstreamError | None = None
        self.keep_alive = True
        self._wakeup: asyncio.Future[None] | None = None
        self._paused = False
        # Takes the body of a read and says whether it passed it on (see pass_to).
        self.sink: Callable[[bytes], bool] | None = None

    def _reset_headers(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        # Noted by on_header: the first Content-Type and Content-Length, and the names
        # that Connection declares hop-by-hop (RFC 9110 section 7.6.1).
        self.content_type: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.known_to_close = False  # after a chunked answer, by its Server header
        self.connection_names: frozenset[bytes] = frozenset()
        self._seen_length = False
        self._headers_done = False  # what follows the body's end are trailers, not headers

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport, and a poll object for checks before reuse."""
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast("asyncio.Transport", transport)
        self._parser = httptools.HttpResponseParser(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; its callbacks fill in the answer; then hand over what came."""
        self.received_any = True
        behind = bool(self.chunks)  # the reader has not taken the last read's body yet
        headers_done = self._headers_done
        if not headers_done:
            self._head_bytes += len(data)
        buffered = self.buffered  # on_body adds to it: whether this read brought body
        self._reading = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamError(self._refused or f"bad HTTP from backend: {exc}"))
            self.close()
        finally:
            self._reading = False
        if self._headers_done and not self.complete:
            # After the headers, bytes that bring no body are chunk framing or trailers,
            # which the parser also keeps whole until they end.
            # (The read that ended the head counts from zero: its head bytes are capped apart.)
            grew = self.buffered != buffered or not headers_done
            self._idle_bytes = 0 if grew else self._idle_bytes + len(data)
        unfinished = self._idle_bytes if self._headers_done else self._head_bytes
        if unfinished > MAX_HEAD_BYTES and self.error is None:
            reason = _OVER_CAP
            self._fail(UpstreamError(reason))
            self.close()
            return
        if self.chunks and not behind and not self.complete and self.error is None:
            self._offer()
        if self.chunks or self.complete:
            self._wake()  # (a failure has woken the reader already)

    def _resume(self) -> None:
        """Read from the backend again, if a reader that fell behind had paused it."""
        if self._paused and self.transport is not None:
            self.transport.resume_reading()
        self._paused = False

    def _offer(self) -> None:
        """Offer this read's body, joined, to the sink; leave it queued if it declines.

        Outside the parser's callbacks, so an error in the sink is not taken for bad
        HTTP. The end of an answer is left to the reader: its last chunk and the end
        go out in one write.
        """
        sink = self.sink
        if sink is None:
            return
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if sink(body):
            chunks.clear()
            self.buffered = 0
            if self._paused:
                self._resume()

    def connection_lost(self, exc: Exception | None) -> None:
        """An unfinished answer fails; a finished one stays as it is."""
        by_backend = not self.closed
        self.closed = True
        delimited = self._seen_length or self.chunked
        if not (self.complete or delimited) and exc is None and self.headers_ready.done():
            # An answer with neither a length nor chunks ends when the backend closes; one
            # with either is cut short (a backend that died), never passed on as whole.
            self.on_message_complete()
        if not self.complete:
            self.cut = by_backend and self.expecting
            self.reset = isinstance(exc, ConnectionResetError)
            reason = str(exc) if exc else "backend closed the connection"
            self._fail(UpstreamError(reason))
        # Nothing is read after this. The parser holds this connection's callbacks: kept,
        # the pair (and the transport, the buffers) waits for a full cyclic collection,
        # which is rare, instead of going with the last reference.
        del self._parser

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        """An answer begins: refused unless a request awaits one.

        A second answer after the whole one, or any answer on an idle connection, would
        otherwise be taken for the next request's: raising here makes the parser fail,
        and the connection is closed.
        """
        if not self.expecting or self.complete:
            self._refused = "the backend sent an answer it was not asked for"
            raise UpstreamError(self._refused)

    def _over_cap(self, size: int) -> None:
        """Stop the parser when a head (or the trailers) passes MAX_HEAD_BYTES."""
        if size > MAX_HEAD_BYTES:
            self._refused = _OVER_CAP
            raise UpstreamError(self._refused)

    def on_status(self, status: bytes) -> None:
        """Count the reason phrase (perhaps one piece of it) towards the head's size."""
        self._head_size += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect one header; note the ones the proxy decides on (trailers are dropped)."""
        line = len(name) + len(value) + 4  # ": " and CRLF
        if self._headers_done:
            self._trailer_size += line
            self._over_cap(self._trailer_size)
            return
        self._head_size += line
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-type" and self.content_type is None:
            self.content_type = value
        elif lower == b"content-length" and not self._seen_length:
            self._seen_length = True
            self.content_length = int(value) if value.isdigit() else None
        elif lower == b"transfer-encoding":
            # Chunked only when it is the last coding (RFC 9112 section 6.3): otherwise
            # the answer ends when the connection closes.
            self.chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif lower == b"server":
            self.known_to_close = value.startswith(_CLOSE_AFTER_CHUNKED)
        elif lower == b"connection":
            named = {token.strip().lower() for token in value.split(b",")}
            self.connection_names = self.connection_names.union(named)

    def on_headers_complete(self) -> None:
        """The status and headers are in: the caller may start answering."""
        self._head_size += 17  # "HTTP/1.1 200 ", the status line's CRLF, the blank line
        self._over_cap(self._head_size)
        status = self.status = self._parser.get_status_code()
        if status < 200:
            if status >= 100 and status != 101:
                # 100 Continue (a forwarded Expect), 103 Early Hints: not the answer.
                self._interim = True
                return
            if status == 101:  # Switching Protocols
                # swapd strips Upgrade from requests: a backend that switches anyway is broken.
                self._refused = "the backend switched protocols (101), which swapd does not relay"
            else:
                # The parser takes any three digits; HTTP's statuses start at 100.
                self._refused = f"the backend answered status {status:03d}, which is not HTTP"
            raise UpstreamError(self._refused)
        self._headers_done = True
        self.keep_alive = self._parser.should_keep_alive()
        if self.head:
            # The parser cannot know the request was HEAD and would wait for the body
            # that Content-Length announces: the answer is whole, the connection spent.
            self.keep_alive = False
            self.complete = True
        if not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        """Queue a body chunk, pausing the backend when too much waits."""
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and self.transport is not None and not self._paused:
            self.transport.pause_reading()
            self._paused = True

    def on_message_complete(self) -> None:
        """The whole answer is in (an interim 1xx answer is not: the real one follows)."""
        if self._interim:
            self._interim = False
            self._reset_headers()
            return
        if self.complete:
            return  # a HEAD's answer, whole at its headers
        self.complete = True
        if not self._reading:
            self._wake()  # the backend closed to end the answer

    # ---- used by UpstreamResponse

    def _fail(self, error: UpstreamError) -> None:
        self.error = error
        if not self.headers_ready.done():
            self.headers_ready.set_exception(error)
            self.headers_ready.exception()  # mark retrieved: the caller may be gone
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def settled(self) -> bool:
        """Whether the next :meth:`next_chunk` returns without waiting."""
        return bool(self.chunks) or self.complete or self.error is not None

    async def next_chunk(self) -> bytes | None:
        """The body that has arrived since the last call, or None at the end of the answer."""
        chunks = self.chunks
        while not chunks:
            if self.complete:
                return None
            if self.error is not None:
                # A new one each time: raised, the stored error would hold this frame (and
                # so this connection) in its traceback, a cycle only a full collection frees.
                raise UpstreamError(*self.error.args)
            self._wakeup = self._loop.create_future()
            await self._wakeup
        chunk = chunks.popleft()
        if chunks and len(chunk) + len(chunks[0]) <= _JOIN_LIMIT:
            parts, size = [chunk], len(chunk)
            while chunks and size + len(chunks[0]) <= _JOIN_LIMIT:
                parts.append(chunks.popleft())
                size += len(parts[-1])
            chunk = b"".join(parts)
        self.buffered -= len(chunk)
        if self.buffered < _LOW_WATER:
            self._resume()
        return chunk

    def finished(self) -> bool:
        """Whether the whole answer is in and handed over."""
        return self.complete and not self.chunks

    def dropped(self) -> bool:
        """Whether an idle connection has something to read: the backend's close, or junk.

        A FIN can be in the kernel before the loop has read it, and a request written
        then is lost (a POST is never sent twice). A poll with no timeout sees it, as
        urllib3 checks a pooled connection before reuse.
        """
        return self._poll is not None and bool(self._poll.poll(0))

    def reusable(self) -> bool:
        """Whether the connection can carry the next request."""
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def recycle(self) -> None:
        """Prepare for the next exchange on the same connection."""
        self.after_chunked = self.chunked
        # The answer may have ended while its reader was behind: a paused connection in
        # the pool would never read the next request's answer.
        self._resume()
        self._reset()

    def close(self) -> None:
        """Close the connection; a backend sees this as the client going away."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """Status, headers and body of one backend answer.

    ``raw_headers`` are the backend's bytes; ``content_type``, ``content_length``
    and ``connection_names`` (lower-case header names that ``Connection`` lists)
    were noted while they were parsed.
    """

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], conn: _Connection) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self.status = conn.status
        self.raw_headers = conn.headers
        self.content_type = conn.content_type
        self.content_length = conn.content_length
        self.connection_names = conn.connection_names
        self.next_chunk = conn.next_chunk
        self.settled = conn.settled
        self.finished = conn.finished
        self._done = False

    def pass_to(self, sink: Callable[[bytes], bool] | None) -> None:
        """Offer the body of each read from the backend to ``sink`` as it arrives.

        What one read brought is offered joined, once, when nothing is queued before
        it and the answer is not yet whole. The sink returns True when it has passed
        the body on (then :meth:`next_chunk` never sees it, and the reader is not
        woken) and False to have it queued as usual, for instance while the client is
        behind; the body keeps its order either way. Passing it on from the backend's
        own read saves a loop turn and a task switch on the way to the client.
        ``None`` stops offering.
        """
        self._conn.sink = sink

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The headers as text (latin-1, as HTTP defines them)."""
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive)."""
        wanted = name.lower().encode("latin-1")
        found = next((v for k, v in self.raw_headers if k.lower() == wanted), None)
        return None if found is None else found.decode("latin-1")

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as the backend sends them (those already waiting, joined)."""
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; :class:`UpstreamError` once it passes ``limit`` bytes, if given.

        swapd's own calls (health, sleep) read answers that are short by nature: a limit
        keeps a backend that streams forever on such a path from growing swapd.
        """
        parts = []
        size = 0
        while (chunk := await self.next_chunk()) is not None:
            size += len(chunk)
            if limit is not None and size > limit:
                raise UpstreamError(f"the answer passed {limit} bytes, more than swapd reads")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def finish(self) -> None:
        """Give the connection back if the answer was read whole, else close it."""
        if self._done:
            return
        self._done = True
        if self._pool.keeps(self._key, self._conn):
            self._conn.recycle()
            self._pool.put(self._key, self._conn)
        else:
            self._pool.lost(self._key, self._conn)
            self._conn.close()


class UpstreamPool:
    """Keep-alive connections per backend address.

    llama-server closes a connection right after a streamed (chunked) answer while
    announcing keep-alive, so a request that reuses it races the close and is lost.
    Such a connection is not kept: known servers by their Server header, others
    once one of their connections is seen closing after a chunked answer.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._close_after_chunked: set[tuple[str, int]] = set()

    def keeps(self, key: tuple[str, int], conn: _Connection) -> bool:
        """Whether a finished exchange's connection may carry the next request."""
        closes = conn.known_to_close or key in self._close_after_chunked
        return conn.reusable() and not (conn.chunked and closes)

    def _closed_after_chunked(self, key: tuple[str, int], conn: _Connection) -> None:
        if conn.after_chunked:
            self._close_after_chunked.add(key)

    def put(self, key: tuple[str, int], conn: _Connection) -> None:
        """Return an idle connection."""
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > REUSE_IDLE:
                conn.close()
                continue
            if conn.closed or conn.dropped():
                self._closed_after_chunked(key, conn)
                conn.close()
                continue
            return conn
        return None

    async def accepts(self, host: str, port: int) -> None:
        """Connect to the port and close again; :class:`NotSent` when it refuses."""
        (await self._connect((host, port))).close()

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Connection, key[0], key[1])
        except OSError as exc:
            raise NotSent(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror}") from exc
        return conn

    async def control(  # noqa: PLR0913, PLR0917 - where, what, headers, a body
        self,
        host: str,
        port: int,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> tuple[int, bytes]:
        """One of swapd's own calls (health, sleep, wake): the status and the whole body.

        The body is read to at most :data:`CONTROL_BODY_LIMIT` bytes (:class:`UpstreamError`
        past it). Callers bound the time, the body's included: it may never end.
        """
        resp = await self.request(host, port, method, path, headers, body)
        try:
            body = await resp.read(CONTROL_BODY_LIMIT)
        finally:
            resp.finish()
        return resp.status, body

    async def request(  # noqa: PLR0913, PLR0917 - one argument per part of the request line
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
    ) -> UpstreamResponse:
        """Send one request and wait for the answer's status and headers.

        Header names and values are bytes, passed on as the client sent them.
        """
        key = (host, port)
        parts = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode("latin-1")]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (b"Content-Length: %d\r\n\r\n" % len(body), body)
        payload = b"".join(parts)
        conn = self._take(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(key)
            assert conn.transport is not None  # noqa: S101 - set on connect
            conn.expecting = True
            conn.head = method == "HEAD"
            conn.transport.write(payload)
            try:
                # Not shielded: a cancelled request closes the connection below, so the
                # future has no other reader (and a shield costs a loop turn per answer).
                await conn.headers_ready
            except UpstreamError as exc:
                # The error raised here is the one the connection keeps (in headers_ready):
                # its traceback holds this frame, so the frame lets go of the connection
                # before raising (conn = None), or the two wait for the cyclic collector.
                self.lost(key, conn)
                if conn.reset and not reused and not conn.received_any:
                    # Reset before a byte came back on a new connection: the backend closed
                    # with the request unread (a dying listener's queue), so it never ran.
                    conn.close()
                    conn = None
                    raise NotSent(f"the backend reset the connection unread: {exc}") from exc
                if reused and not conn.received_any:
                    self._closed_after_chunked(key, conn)
                # A kept-alive connection the backend closed meanwhile: one fresh try, only
                # for a request that may run twice and when nothing at all came back.
                if reused and not conn.received_any and method in _IDEMPOTENT:
                    conn.close()
                    conn, reused = None, False
                    continue
                conn.close()
                conn = None
                raise
            except asyncio.CancelledError:
                conn.close()
                conn = None  # the future keeps the CancelledError, which holds this frame
                raise
            return UpstreamResponse(self, key, conn)

    def lost(self, key: tuple[str, int], conn: _Connection) -> None:
        """After a backend cut an exchange short: its idle connections go too.

        A cut is most often the backend dying; its idle connections then die with it, but
        their close may not have reached swapd yet, and a POST written on one is lost
        (never sent twice). A fresh connection to a dead backend is refused instead,
        which tells the caller the request never reached it.
        """
        if conn.cut:
            self.forget(*key)

    def forget(self, host: str, port: int) -> None:
        """Close and drop the idle connections to a backend that is gone."""
        for conn in self._idle.pop((host, port), []):
            conn.close()

    def retire(self, host: str, port: int) -> None:
        """A backend has ended: drop its connections and what was learned of its address.

        Each start gets a new port, so a remembered address is never asked about again
        (kept, one per backend ever started, it grows for as long as swapd runs), and a
        later backend given the same port is another server, to be learned afresh.
        """
        self.forget(host, port)
        self._close_after_chunked.discard((host, port))

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.close()
        self._idle.clear()
