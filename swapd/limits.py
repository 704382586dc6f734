"""The edge: how many client connections swapd holds, and how long each may take.

aiohttp has no timeout for a request's headers and keeps an idle connection for
an hour, so a few hundred slow or silent clients could hold every file
descriptor. swapd serves through its own site, whose connections carry a timer:

    connect ──header_timeout──> headers in ──(the request runs)──> answered
       ^                                                              |
       └── first byte of the next request <──keepalive_timeout────────┘

A client's body gets ``body_timeout`` (the proxy enforces it while reading). A
connection over ``max_connections`` is answered 503 and closed at once, and
HTTP that cannot be parsed is answered in the usual JSON envelope with one log
line instead of a traceback. Each connection may take two file descriptors (the
client's and a backend's), so the cap is lowered to what the limit allows.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Literal, cast

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMethod,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo, _RequestFactory
from multidict import CIMultiDict, CIMultiDictProxy

from swapd.auth import listen_address
from swapd.errors import (
    HeadersTooLarge,
    MalformedHttp,
    RequestError,
    TooManyConnections,
    clip,
)
from swapd.logs import get_logger, new_request_id

_log = get_logger("swapd.limits")
Phase = Literal["headers", "busy", "idle"]
# Descriptors kept free for backends' pipes, PID records, probes and the reaper.
FD_SPARE = 256
FDS_PER_CONNECTION = 2
# A refused connection reads (and drops) what the client sends for this long before it
# closes, so the kernel does not reset the connection under the 503.
_REFUSED_LINGER = 1.0
_WARN_SHARE = 0.9
_FD_CHECK_EVERY = 64


# How long aiohttp's drain waits past swapd's cut of the handlers still running then.
_CUT_MARGIN_S = 1.0


@dataclass(frozen=True)
class Limits:
    """The edge's settings, from the daemon config."""

    max_connections: int = 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0


def fit_fd_limit(max_connections: int) -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one; the cap that then fits, and the limit.

    Logs a warning when the cap had to be lowered.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit we have
    fits = max(1, (soft - FD_SPARE) // FDS_PER_CONNECTION)
    if max_connections > fits:
        _log.warning(
            "connection.limit.lowered",
            max_connections=max_connections,
            lowered_to=fits,
            fd_limit=soft,
            hint="raise LimitNOFILE= (systemd) or ulimit -n",
        )
        return fits, soft
    return max_connections, soft


def open_fds() -> int | None:
    """How many file descriptors swapd has open now (Linux), None where unknown."""
    try:
        return sum(1 for _ in Path("/proc/self/fd").iterdir())
    except OSError:
        return None


class _Tally:
    """Counts an event and logs it at most once a second, with the count since the last line."""

    def __init__(self, event: str, *, warn: bool) -> None:
        self.event = event
        self.warn = warn
        self.total = 0
        self._since = 0
        self._last = -math.inf

    def add(self, **fields: object) -> None:
        self.total += 1
        self._since += 1
        now = time.monotonic()
        if now - self._last < 1.0:
            return
        log = _log.warning if self.warn else _log.info
        log(self.event, count=self._since, total=self.total, **fields)
        self._since = 0
        self._last = now


@dataclass
class Edge:
    """Every client connection of one daemon: counts, caps, timers, and the snapshot."""

    limits: Limits
    fd_limit: int | None = None
    open: set[EdgeHandler] = field(default_factory=set)
    refused: _Tally = field(default_factory=lambda: _Tally("connection.refused", warn=True))
    # Idle kept-alive connections closed at the cap to let a new one in.
    made_room: _Tally = field(default_factory=lambda: _Tally("connection.made_room", warn=False))
    timeouts: dict[str, _Tally] = field(
        default_factory=lambda: {
            phase: _Tally("connection.timeout", warn=False) for phase in ("headers", "idle")
        }
    )
    _accepted: int = 0
    _warned: bool = False

    def protocol(self, server: web.Server) -> asyncio.Protocol:
        """A protocol for one new connection: served, or refused when at the cap.

        At the cap, the connection idle longest between requests is closed to make
        room: kept-alive connections that only wait must not lock new clients out
        (one client holding every slot with a request each).
        """
        if len(self.open) >= self.limits.max_connections and not self._close_idlest():
            self.refused.add(max_connections=self.limits.max_connections)
            return _Refused()
        conn = EdgeHandler(
            server,
            self,
            loop=asyncio.get_running_loop(),
            # aiohttp's own idle timer, kept only as a backstop behind ours.
            keepalive_timeout=self.limits.keepalive_timeout + self.limits.header_timeout,
        )
        # Counted here, not in connection_made: a burst of accepts may build several
        # protocols before the first of them is told its connection is made.
        self._opened(conn)
        return conn

    def _opened(self, conn: EdgeHandler) -> None:
        """Count a connection; warn once as the cap (and so the descriptor limit) nears."""
        self.open.add(conn)
        self._accepted += 1
        near = len(self.open) >= _WARN_SHARE * self.limits.max_connections
        if self._accepted % _FD_CHECK_EVERY == 0 or near:
            fds = open_fds()
            near = near or bool(fds and self.fd_limit and fds >= _WARN_SHARE * self.fd_limit)
            if near and not self._warned:
                _log.warning(
                    "connection.limit.near",
                    open=len(self.open),
                    max_connections=self.limits.max_connections,
                    fds=fds,
                    fd_limit=self.fd_limit,
                )
            self._warned = near

    def _close_idlest(self) -> bool:
        """Close the connection idle longest between requests; False when none idles."""
        idle = [conn for conn in self.open if conn.waiting]
        if not idle:
            return False
        conn = min(idle, key=lambda c: c.idle_since or 0.0)
        self.open.discard(conn)  # its slot is the new connection's from now
        conn.close_idle()
        self.made_room.add(max_connections=self.limits.max_connections)
        return True

    def closed(self, conn: EdgeHandler) -> None:
        """Forget a connection."""
        self.open.discard(conn)

    def snapshot(self) -> dict[str, object]:
        """Counts for ``/swapd/status``."""
        return {
            "open": len(self.open),
            "max": self.limits.max_connections,
            "refused": self.refused.total,
            "closed_for_room": self.made_room.total,
            "timed_out": {phase: tally.total for phase, tally in self.timeouts.items()},
            "fds": open_fds(),
            "fd_limit": self.fd_limit,
        }


# All of a request's header lines together; aiohttp's own caps (8 KiB a line, 128 lines)
# would let each connection hold a megabyte of unfinished headers.
HEADER_BYTES_MAX = 64 * 1024
_HEADERS_END = re.compile(rb"\n\r?\n")


class EdgeHandler(RequestHandler):
    """aiohttp's connection handler with a header and idle timer, and JSON parse errors."""

    def __init__(
        self,
        server: web.Server,
        edge: Edge,
        *,
        loop: asyncio.AbstractEventLoop,
        keepalive_timeout: float,
    ) -> None:
        super().__init__(
            server,
            loop=loop,
            keepalive_timeout=keepalive_timeout,
            access_log=None,  # type: ignore[arg-type]  # None turns aiohttp's access log off
            # SO_KEEPALIVE probes after 2 h of silence; the idle timer here closes long
            # before, so the option only cost a socket object and a system call per connect.
            tcp_keepalive=False,
        )
        self._edge = edge
        self._clock = loop
        self._phase: Phase = "headers"
        self.cut_at_shutdown = False  # its request still ran when the drain's time was up
        # One timer per connection, moved lazily: a request only sets the deadline, and the
        # timer, when it fires early, sleeps on to it (arming a timer per request costs more).
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False  # the connection is gone: no timer is armed again
        self.idle_since: float | None = None  # between requests since then; None otherwise
        # The request's header bytes so far, until the blank line that ends them.
        self._head_bytes = 0
        self._head_tail = b""
        self._head_done = False
        self._discarding = False  # refused: what the client still sends is dropped
        # The last request's body: bytes that still come for it after its answer (aiohttp
        # reads away what the handler left) are no head.
        self._body: StreamReader | None = None
        factory = self._request_factory
        assert factory is not None  # noqa: S101 - aiohttp sets it from the server
        self._request_factory = _expect_stops_here(factory)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the clock: the headers must arrive within ``header_timeout``."""
        super().connection_made(transport)
        self._arm(self._edge.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        """The first byte after an answer starts the next request's header clock."""
        if self._discarding:
            return
        if self._phase == "idle" and data:
            if self._body is not None and not self._body.is_eof():
                self._parse(data)  # the rest of an answered request's body
                return
            self._phase = "headers"
            self.idle_since = None
            # A pipelined head aiohttp has parsed whole already waits its turn: what comes
            # is its body. (Pipelined bytes that came while a request ran are not counted:
            # aiohttp's own caps, 128 lines of 8 KiB, bound them.)
            self._head_bytes, self._head_tail = 0, b""
            self._head_done = bool(self._messages)
            self._arm(self._edge.limits.header_timeout)
        if self._phase == "headers" and not self._head_done and self._headers_too_large(data):
            return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """aiohttp's parsing; a parse error in the middle of a body fails that body at once.

        aiohttp queues the error as the next request and leaves the body being read
        waiting for bytes the broken stream never brings: a bad chunk size in a later
        read was answered only at body_timeout, as a 408.
        """
        queued = len(self._messages)
        super().data_received(data)
        body = self._body
        if len(self._messages) == queued or body is None or body.is_eof():
            return
        if body.exception() is not None:
            return
        for message, _ in list(self._messages)[queued:]:
            if isinstance(message, _ErrInfo):
                error = _parse_error(message.status, message.exc, message.message)
                _log.info("http.invalid", status=error.status, reason=error.message)
                body.set_exception(error)
                return

    def _headers_too_large(self, data: bytes) -> bool:
        """Count header bytes until their blank line; past the cap, answer 431 and close.

        aiohttp holds up to 128 lines of 8 KiB each while headers arrive: a megabyte per
        connection, which a thousand connections make a gigabyte.
        """
        end = _HEADERS_END.search(self._head_tail + data[:4])
        if end is not None:
            counted = max(0, end.end() - len(self._head_tail))
        else:
            end = _HEADERS_END.search(data)
            counted = len(data) if end is None else end.end()
        self._head_bytes += counted
        self._head_done = end is not None
        self._head_tail = (self._head_tail + data)[-3:]
        if self._head_bytes <= HEADER_BYTES_MAX:
            return False
        error = HeadersTooLarge(f"the request's headers pass {HEADER_BYTES_MAX} bytes")
        _log.info("http.invalid", status=error.status, reason=error.message)
        if self.transport is not None:
            self._discarding = True  # what the client still sends is dropped meanwhile
            _answer_and_linger(self.transport, error, self.force_close)
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the timer and forget the connection."""
        self._lost = True
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The body's reader points back at this handler: kept, the pair waits for the
        # cyclic collector (a full collection, rare) instead of going with the connection.
        self._body = None
        self._edge.closed(self)
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """As aiohttp's, but a handler still running at ``timeout`` is cancelled then.

        aiohttp only fails the handler's body reads at ``timeout`` and waits as long
        again; a handler waiting on its backend reads no body, so it ran twice the time.
        """
        cut = None if timeout is None else self._clock.call_later(timeout, self._cut)
        try:
            # aiohttp's own wait ends a little after the cut: ending at the same moment, its
            # timeout cancelled the future the cut handler then set on its way out, and
            # aiohttp logged an InvalidStateError traceback for every request cut.
            await super().shutdown(None if timeout is None else timeout + _CUT_MARGIN_S)
        finally:
            if cut is not None:
                cut.cancel()

    def _cut(self) -> None:
        task = self._task_handler
        if self._request_in_progress and task is not None and not task.done():
            self.cut_at_shutdown = True
            task.cancel()

    def request_started(self, body: StreamReader | None = None) -> None:
        """Headers are in and a handler runs: no deadline while it works."""
        self._phase = "busy"
        self._deadline = None
        self._body = body

    def request_finished(self) -> None:
        """The handler is done: the connection may idle for ``keepalive_timeout``."""
        self._phase = "idle"
        self.idle_since = self._clock.time()
        self._arm(self._edge.limits.keepalive_timeout)

    @property
    def waiting(self) -> bool:
        """Between requests: the last answer written whole, nothing of the next one read."""
        return self.idle_since is not None and not self._request_in_progress

    def close_idle(self) -> None:
        """Close this connection, waiting between requests, to make room for another."""
        self.idle_since = None
        self.force_close()

    def _arm(self, seconds: float) -> None:
        if self._lost:
            # A handler that ends after its client left (a hang-up mid-stream, an events
            # subscriber that went away) would arm the keep-alive timer here, and the
            # timer kept the whole connection's state for keepalive_timeout.
            return
        self._deadline = deadline = self._clock.time() + seconds
        timer = self._timer
        if timer is not None and timer.when() <= deadline:
            return  # it fires first and sleeps on to the deadline
        if timer is not None:
            timer.cancel()
        self._timer = self._clock.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.transport is None:
            return  # busy, or gone
        if self._clock.time() < deadline:
            self._timer = self._clock.call_at(deadline, self._expire)
            return
        if self._phase == "idle" and self.transport.get_write_buffer_size():
            # Still sending the last answer to a slow reader: that is not idling.
            self._arm(self._edge.limits.keepalive_timeout)
            return
        self._edge.timeouts[self._phase].add(phase=self._phase)
        self.force_close()

    def log_exception(self, *args: object, **kwargs: object) -> None:
        """aiohttp's "Unhandled exception", but one line for a body that cannot be read.

        After a handler answered (400: the gzip body is not gzip, or a chunk size is
        broken), aiohttp reads away what is left of the body and meets the same error
        again: that is no fault of swapd's, and the request's log lines said it already.
        """
        exc = kwargs.get("exc_info")
        if isinstance(exc, web.RequestPayloadError | RequestError):
            _log.debug("http.body.unread", reason=clip(str(exc).split("\n")[-1].strip(), 200))
            return
        super().log_exception(*args, **kwargs)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer unparsable HTTP in the JSON envelope and log one line, no traceback."""
        error = _parse_error(status, exc, message)
        # Non-HTTP bytes (TLS to the plain port, scanners) are common on a public port.
        log = _log.debug if isinstance(exc, BadHttpMethod) else _log.info
        log("http.invalid", status=error.status, reason=error.message, peer=request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already started; cannot send the error")
        response = web.json_response(error.envelope(), status=error.status)
        response.headers["X-Request-Id"] = new_request_id()
        response.force_close()
        return response


def http_reason(exc: HttpProcessingError) -> str:
    """aiohttp's reason for a parse error, without the bytes of the request it quotes.

    A line too long, or a header value its Python parser refuses, is quoted (up to 100
    bytes of it): a Cookie's or a key's, which must reach neither the answer nor the log.
    """
    if isinstance(exc, LineTooLong):
        return f"Got more than {exc.args[1]} bytes in one line"
    if isinstance(exc, InvalidHeader):
        return "Invalid HTTP header"
    return exc.message


def _parse_error(status: int, exc: BaseException | None, message: str | None) -> RequestError:
    reason = http_reason(exc) if isinstance(exc, HttpProcessingError) else message
    # aiohttp's reasons go on to quote the line with a caret under it: keep the first line.
    first = str(reason or "").strip().split("\n", 1)[0].rstrip(":") or "unreadable request"
    text = clip(first, 200)
    if isinstance(exc, LineTooLong) or "too many headers" in text.lower():
        return HeadersTooLarge(text)
    if status < 500:
        return MalformedHttp(f"the request is not valid HTTP: {text}")
    return RequestError(f"internal error while reading the request: {text}")


def _answer_and_linger(
    transport: asyncio.Transport, error: RequestError, close: Callable[[], None]
) -> asyncio.TimerHandle:
    """Write ``error`` as a whole answer, half-close, and ``close`` after a short linger.

    Closing outright while the client still sends would reset the connection and lose
    the answer; the linger gives the client time to read it.
    """
    body = json.dumps(error.envelope()).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in error.headers().items())
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-Id: {new_request_id()}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    transport.write(head.encode() + body)
    if transport.can_write_eof():
        transport.write_eof()
    return asyncio.get_running_loop().call_later(_REFUSED_LINGER, close)


# The request's key for a client waiting for "100 Continue" (see send_continue).
EXPECTS_CONTINUE = "swapd.expects_continue"


def _expect_stops_here(factory: _RequestFactory) -> _RequestFactory:
    """Requests without their ``Expect`` header, which swapd answers itself.

    aiohttp answers it before any middleware: "100 Continue" before the key, Host and
    ``max_body`` checks (a client refused 401 was first told to send its gigabyte), and an
    unknown expectation as a text 417. Here an unknown one is ignored (RFC 9110 allows
    it), and "100 Continue" goes out when a handler that passed the checks reads the body.
    """

    def make(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        headers = message.headers
        if hdrs.EXPECT not in headers:
            return factory(message, payload, protocol, writer, task)
        wants = headers[hdrs.EXPECT].strip().lower() == "100-continue"
        kept = CIMultiDict((k, v) for k, v in headers.items() if k.lower() != "expect")
        raw = tuple((k, v) for k, v in message.raw_headers if k.lower() != b"expect")
        message = message._replace(headers=CIMultiDictProxy(kept), raw_headers=raw)
        request = factory(message, payload, protocol, writer, task)
        if wants and message.version == HttpVersion11:
            request[EXPECTS_CONTINUE] = True
        return request

    return make


async def send_continue(request: web.BaseRequest) -> None:
    """Tell a client that waits with its body to send it, once (the checks have passed)."""
    if request.get(EXPECTS_CONTINUE):
        request[EXPECTS_CONTINUE] = False
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp does: the answer has not begun


class _Refused(asyncio.Protocol):
    """A connection over ``max_connections``: answered 503 at once, then closed."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Answer before reading anything; linger briefly so the client can read it."""
        # uvloop's transports do not subclass asyncio's, but behave as a TCP transport.
        tcp = cast("asyncio.Transport", transport)
        self._timer = _answer_and_linger(tcp, TooManyConnections(), tcp.close)

    def data_received(self, data: bytes) -> None:
        """Drop what the client sends; it is not served."""

    def eof_received(self) -> bool:
        """The client is done too: close now."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the linger timer."""
        del exc
        if self._timer is not None:
            self._timer.cancel()


class EdgeSite(web.BaseSite):
    """A TCP site whose connections go through an :class:`Edge`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, edge: Edge) -> None:
        super().__init__(runner, backlog=1024)
        self._host = host
        self._port = port
        self._edge = edge

    @property
    def name(self) -> str:
        """The URL served."""
        return f"http://{listen_address(self._host, self._port)}"

    async def start(self) -> None:
        """Listen; every accepted connection gets a protocol from the edge."""
        await super().start()
        server = self._runner.server
        assert server is not None  # noqa: S101 - the runner is set up before a site starts
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._edge.protocol(server),
            self._host or None,  # every address, of every family
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )


def track(request: web.Request) -> EdgeHandler | None:
    """Mark the request's connection busy; the connection, to mark it idle afterwards."""
    conn = request.protocol
    if isinstance(conn, EdgeHandler):
        conn.request_started(request.content)
        return conn
    return None
