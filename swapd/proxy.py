"""OpenAI-compatible routes: find the model, lease a ready backend, pass the exchange through.

Bodies are forwarded as the bytes the client sent (never re-encoded, unless the
model's preset rewrites them: see :mod:`swapd.rewrite`), and
responses as the chunks the backend sends: a streamed answer reaches the
client chunk by chunk, and a client that hangs up closes the upstream
connection, which cancels the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any, TypeVar

from aiohttp import hdrs, web
from aiohttp.http import StreamWriter
from aiohttp.http_exceptions import HttpProcessingError

from swapd import _json as capped_json
from swapd._exchange import CLIENT_GONE, answer_began, stream_error
from swapd.errors import (
    BackendErrorText,
    BackendGone,
    BadRequest,
    BodyTooLarge,
    RequestError,
    RequestTimeout,
    UpstreamTimeout,
    clip,
)
from swapd.limits import http_reason, send_continue
from swapd.logs import get_logger
from swapd.manager import Lease, Manager
from swapd.presets import Preset
from swapd.rewrite import rewrite
from swapd.upstream import NotSent, UpstreamError, UpstreamPool, UpstreamResponse

_log = get_logger("swapd.proxy")

JSON_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/rerank",
    "/v1/score",
    "/v1/audio/speech",
    "/v1/images/generations",
)
MULTIPART_ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits")
# Headers that describe one hop, not the message (RFC 9110 section 7.6.1), plus ones aiohttp sets.
_HOP = frozenset(
    {
        "connection",
        "proxy-connection",  # an old, non-standard spelling of Connection
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        # swapd has read the whole body: a backend must not wait to be asked for it,
        # and its 100 Continue would only cost a round trip.
        "expect",
        "host",
        "content-length",
    }
)
# The client's credentials for swapd: never forwarded (a backend's own key is swapd's to send).
_PRIVATE = frozenset({"authorization", "x-api-key", "cookie"})
_NOT_FORWARDED = frozenset(name.encode() for name in _HOP | _PRIVATE)
_HOP_BYTES = frozenset(name.encode() for name in _HOP)
# Request content codings that aiohttp decodes as it reads the body.
_DECODED = frozenset({"gzip", "deflate", "br", "zstd"})
# Sized answers up to this are read whole and sent in one write; larger ones are passed
# through chunk by chunk with backpressure, like streams, so swapd never holds them whole.
BUFFER_LIMIT = 1 << 20
# How long a relayed answer's headers wait for its first chunk to share a write with it.
HEADERS_WAIT = 0.05
# The relayed answer, once aiohttp has taken it (its headers may still wait in the writer).
_RELAYED = "swapd.relayed"
# Set on a relayed answer once its end is being written: whole, whatever cuts in meanwhile.
_WHOLE = web.ResponseKey("whole", bool)
# Set on a /upstream/ request: the backend's answer goes back as sent, errors too.
AS_SENT = "swapd.as_sent"
# How long a request that a backend refused waits for swapd to see that backend's exit.
EXIT_NOTICE_WAIT = 5.0


def _named_in_connection(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names that ``Connection`` declares hop-by-hop (RFC 9110 section 7.6.1)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


def forwarded_headers(request: web.Request, lease: Lease) -> list[tuple[bytes, bytes]]:
    """The client's headers as sent, less those that stop at swapd, plus the backend's key.

    Bytes as sent: decoding and re-encoding them could fail.
    """
    raw = request.raw_headers
    dropped = _NOT_FORWARDED
    if "Connection" in request.headers:
        dropped = dropped | _named_in_connection(raw)
    if request.headers.get("Content-Encoding", "").lower() in _DECODED:
        dropped = dropped | {b"content-encoding"}  # aiohttp has decoded the body already
    headers = [(k, v) for k, v in raw if k.lower() not in dropped]
    launch = lease.slot.launch
    if launch is not None:
        headers.extend(launch.headers)  # the backend's own key, known only to swapd
    return headers


# A body over this is read for its model in a worker thread, one body at a time. The
# nesting check, the scan and the parse of a 60 MiB chat took 148 and 106 ms; off the
# loop, other requests are served between their steps. A single long call (the parse of
# a huge body whose model the scan cannot find) still holds the interpreter's lock, and
# with it the loop, for its whole length. One at a time keeps the peak memory of such
# parses to one body's (a hostile 64 MiB body takes 1.8 GiB to parse), as on the loop.
WORKER_BODY = 1024 * 1024
_T = TypeVar("_T")


class LargeBodies:
    """Reads of large bodies in a worker thread, one at a time; small ones on the loop."""

    def __init__(self) -> None:
        self._one = asyncio.Lock()

    async def read(self, body: bytes, read: Callable[[bytes], _T]) -> _T:
        """``read(body)``, in a worker thread when the body is over :data:`WORKER_BODY`."""
        if len(body) <= WORKER_BODY:
            return read(body)
        await self._one.acquire()
        try:
            work = asyncio.ensure_future(asyncio.to_thread(read, body))
        except BaseException:
            self._one.release()
            raise
        # A thread cannot be stopped: the lock stays held until it ends, even when the
        # request that started it is cancelled (its client hung up).
        work.add_done_callback(_release_after(self._one))
        return await asyncio.shield(work)


def _release_after(lock: asyncio.Lock) -> Callable[[asyncio.Future[Any]], None]:
    def done(work: asyncio.Future[Any]) -> None:
        lock.release()
        if not work.cancelled():
            work.exception()  # retrieved: a cancelled caller's error is not logged as lost

    return done


# The name parameter itself, not the end of filename="..."; quoted, or a bare token.
_FIELD_NAME = re.compile(rb'(?<![\w-])name=(?:"([^"]*)"|([^\s;"]+))', re.IGNORECASE)
# What starts a body in UTF-16 or UTF-32, which Python's json.loads reads (and a backend
# built on it would) while a byte scan reads the bytes: a NUL in the first four, or a BOM.
_NOT_UTF8 = re.compile(rb"\A(?:\xfe\xff|\xff\xfe|.{0,3}\x00)", re.DOTALL)


def model_from_json(body: bytes) -> str:
    """The ``model`` of a JSON request body, or :class:`BadRequest` saying what is wrong."""
    if _NOT_UTF8.match(body):
        # Read two ways otherwise: by swapd's scan as bytes, by a Python backend as UTF-16.
        raise BadRequest("request body is not valid JSON: JSON must be sent as UTF-8")
    capped_json.check_depth(body)  # before any reading, scan or parse
    model = capped_json.top_level_string(body, "model")
    if model:
        return model
    if not body.strip():
        # json's own words ("Expecting value: line 1 column 1") hide what is wrong.
        raise BadRequest(
            'request body is not valid JSON: it is empty (send a JSON object with a "model")'
        )
    data = capped_json.parse_checked(body)  # its depth is checked above: once is enough
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {_json_kind(data)}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        missing = "model" not in data
        got = "" if missing else f': "model" is {_json_kind(model)}'
        raise BadRequest(f'request body has no "model" string{got}')
    return model


def _rewrites(preset: Preset) -> bool:
    """Whether the preset rewrites its JSON bodies (see :mod:`swapd.rewrite`)."""
    return preset.use_model_name is not None or preset.filters is not None


def _rewritten(preset: Preset, body: bytes) -> bytes:
    return rewrite(body, preset.use_model_name, preset.filters)


def _json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words, for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    return "an array" if isinstance(value, list) else "an object"


def model_from_multipart(body: bytes, content_type: str) -> str:
    """The ``model`` field of a multipart/form-data body.

    Parts are cut where a form parser cuts them (RFC 2046 section 5.1.1): at a delimiter
    that starts a line and ends one, never at the boundary's bytes inside a file. A form
    with two ``model`` fields is refused: parsers differ on which one counts.
    """
    start, end = _model_field(body, content_type)
    model = body[start:end].decode("utf-8", "replace").strip()
    if not model:
        raise BadRequest('form has no "model" field')
    return model


def renamed_form(body: bytes, content_type: str, model: str) -> bytes:
    """``body`` with its ``model`` field's value replaced by ``model``, every other byte kept."""
    start, end = _model_field(body, content_type)
    return body[:start] + model.encode() + body[end:]


def _model_field(body: bytes, content_type: str) -> tuple[int, int]:
    """Where the value of the form's one ``model`` field starts and ends in ``body``."""
    found = form_fields(body, content_type, b"model")
    if len(found) > 1:
        raise BadRequest('form has more than one "model" field')
    if not found:
        raise BadRequest('form has no "model" field')
    return found[0]


def form_fields(body: bytes, content_type: str, name: bytes) -> list[tuple[int, int]]:
    """Where the value of each field called ``name`` starts and ends in ``body``, in order."""
    boundary = _boundary(content_type)
    found: list[tuple[int, int]] = []
    for start, end in _form_parts(body, boundary):
        head_end = body.find(b"\r\n\r\n", start, end)
        if head_end >= 0 and _field_name(body[start:head_end]) == name:
            found.append((head_end + 4, end))
    return found


def _boundary(content_type: str) -> bytes:
    """The boundary parameter of a multipart/form-data type, as the bytes sent."""
    kind, *params = content_type.split(";")
    values = [
        value.strip().strip('"')
        for name, eq, value in (p.strip().partition("=") for p in params)
        if eq and name.strip().lower() == "boundary"
    ]
    if kind.strip().lower() != "multipart/form-data" or len(values) != 1 or not values[0]:
        raise BadRequest("expected a multipart/form-data body with one boundary")
    # aiohttp decodes header bytes with surrogateescape: this gives back the bytes sent.
    return values[0].encode("utf-8", "surrogateescape")


def _form_parts(body: bytes, boundary: bytes) -> list[tuple[int, int]]:
    """Where each part of a form (its headers, a blank line, its content) starts and ends."""
    delimiter = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r\n|\Z)")
    parts: list[tuple[int, int]] = []
    start: int | None = None
    for found in delimiter.finditer(body):
        if start is not None:
            parts.append((start, found.start()))
        if found.group(1):  # the close delimiter: what follows is an epilogue
            break
        start = found.end()
    return parts


def _field_name(head: bytes) -> bytes | None:
    """The ``name`` of a part's Content-Disposition header."""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-disposition:"):
            name = _FIELD_NAME.search(line)
            return None if name is None else name.group(1) or name.group(2)
    return None


async def read_body(request: web.Request, limit: int, timeout: float | None = None) -> bytes:
    """The whole body, or :class:`BodyTooLarge` as soon as it passes ``limit``.

    :class:`RequestTimeout` when it has not all arrived within ``timeout`` seconds.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    headers = request.headers
    if hdrs.CONTENT_ENCODING in headers and len(headers.getall(hdrs.CONTENT_ENCODING)) > 1:
        # aiohttp decodes by the last one; a backend would read the first.
        raise BadRequest("more than one Content-Encoding header; send one (or none)")
    content = request.content
    try:
        if content.is_eof():
            # The whole body came with the headers (most requests): nothing to wait for.
            body = content.read_nowait()
            if len(body) > limit:
                raise BodyTooLarge(limit)
            return body
        await send_continue(request)
        async with asyncio.timeout(timeout):
            return await _read_all(request, limit)
    except TimeoutError as exc:
        raise RequestTimeout(timeout or 0) from exc
    except web.RequestPayloadError as exc:
        # A body whose Content-Encoding does not decode (not gzip after all, say). aiohttp
        # renders its parser's error as "400, message:\n  ...": the reason is what follows.
        cause = exc.__cause__
        if isinstance(cause, HttpProcessingError):
            reason = http_reason(cause)  # not the bytes it quotes: a trailer's, say
        else:
            reason = " ".join(str(exc).split()).removeprefix("400, message: ")
        raise BadRequest(f"the request body cannot be read: {clip(reason, 200)}") from exc


async def _read_all(request: web.Request, limit: int) -> bytes:
    # Pieces joined once at the end: adding each to the body copied all before it, on the
    # loop, quadratic in the size of a body that arrives in many reads.
    pieces: list[bytes] = []
    size = 0
    while True:
        more = await request.content.read(limit + 1 - size)
        if not more:
            break
        pieces.append(more)
        size += len(more)
        if size > limit:
            raise BodyTooLarge(limit)
        if request.content.at_eof():
            break
    return b"".join(pieces)


class Proxy:
    """The request path: parse, lease, forward."""

    def __init__(
        self,
        manager: Manager,
        pool: UpstreamPool,
        max_body: int,
        body_timeout: float | None = None,
        send_timeout: float | None = None,
    ) -> None:
        self.manager = manager
        self.pool = pool
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.send_timeout = send_timeout
        self.large_bodies = LargeBodies()

    async def read_form(self, request: web.Request) -> tuple[bytes, str]:
        """A multipart route's body, and the model its form names."""
        body = await read_body(request, self.max_body, self.body_timeout)
        content_type = request.headers.get("Content-Type", "")
        model = await self.large_bodies.read(
            body, functools.partial(model_from_multipart, content_type=content_type)
        )
        return body, model

    async def forward(  # noqa: PLR0913 - the request, then one keyword per way it may differ
        self,
        request: web.Request,
        model: str,
        body: bytes,
        *,
        admitted: bool = False,
        json_body: bool = False,
        form: bool = False,
        passive: bool = False,
    ) -> web.StreamResponse:
        """Send the request to a leased backend and pass the answer back unbuffered.

        A backend that refuses the connection died before swapd noticed (a request queued
        behind its ``concurrency`` is leased the moment the one before it ends): the
        request never reached it, so once swapd has seen the exit it is leased again,
        and waits for the restart as any request for a stopped model does. ``admitted``:
        the request held a lease already (a cold stream's), counted and let in then.
        ``json_body``: a JSON route's body, which the leased model's preset may rewrite.
        ``form``: a multipart route's body, whose model the preset's ``use_model_name`` renames.
        ``passive``: only while the model is ready, not counted as its use (``Lease``).
        """
        request["model"] = model  # clipped in the log line, not for the metrics' lookup
        manager = self.manager
        lease = await manager.acquire(model, admitted=admitted, passive=passive)
        try:
            return await self._leased(request, lease, body, json_body, form)
        except NotSent as exc:
            refused = exc
        finally:
            manager.release(lease)
        lease = await lease_again(manager, lease, refused)
        try:
            return await self._leased(request, lease, body, json_body, form)
        except NotSent as exc:
            raise BackendGone(lease.model, str(exc)) from exc
        finally:
            manager.release(lease)

    async def _leased(
        self, request: web.Request, lease: Lease, body: bytes, json_body: bool, form: bool
    ) -> web.StreamResponse:
        if json_body and _rewrites(lease.slot.preset):
            body = await self.body_for(lease, body)  # not awaited for most presets
        elif form and lease.slot.preset.use_model_name is not None:
            body = await self.form_for(request, lease, body)  # not awaited for most presets
        headers = forwarded_headers(request, lease)
        limit = lease.slot.preset.request_timeout
        try:
            if limit is None:
                return await self._exchange(request, lease, headers, body)
            try:
                async with asyncio.timeout(limit):
                    return await self._exchange(request, lease, headers, body)
            except TimeoutError:
                relayed = request.get(_RELAYED)
                if relayed is None:
                    raise UpstreamTimeout(lease.model, limit) from None
                _answer_or_cut(request, relayed, UpstreamTimeout(lease.model, limit))
                return web.Response(status=UpstreamTimeout.status)
        finally:
            # The answer points back at the request: kept in it, the pair would wait for
            # the cyclic collector whenever aiohttp does not end the answer (a hang-up).
            request.pop(_RELAYED, None)

    async def body_for(self, lease: Lease, body: bytes) -> bytes:
        """A JSON route's body as the lease's backend gets it: as sent, or rewritten.

        Rewritten where the preset asks (parsed in a worker thread when large, as the
        model's read is).
        """
        preset = lease.slot.preset  # as the lease found it: a reload may change it later
        if not _rewrites(preset):
            return body  # most presets: the client's bytes, not parsed again
        return await self.large_bodies.read(body, functools.partial(_rewritten, preset))

    async def form_for(self, request: web.Request, lease: Lease, body: bytes) -> bytes:
        """A multipart route's body as the lease's backend gets it: as sent, or renamed.

        Its model is renamed where the preset's ``use_model_name`` asks (in a worker thread
        when large, as it was read).
        """
        name = lease.slot.preset.use_model_name
        if name is None:
            return body
        content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
        renamed = functools.partial(renamed_form, content_type=content_type, model=name)
        return await self.large_bodies.read(body, renamed)

    async def _exchange(
        self, request: web.Request, lease: Lease, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> web.StreamResponse:
        try:
            upstream = await self.pool.request(
                lease.host, lease.port, request.method, request.rel_url.raw_path_qs, headers, body
            )
        except NotSent:
            raise  # the caller may lease it again once swapd has seen the exit
        except UpstreamError as exc:
            raise BackendGone(lease.model, str(exc)) from exc
        try:
            return await self._relay(request, upstream, lease.model, self.send_timeout)
        finally:
            # Closing (not reusing) an unfinished upstream cancels the generation.
            upstream.finish()

    @staticmethod
    async def _relay(
        request: web.Request, upstream: UpstreamResponse, model: str, send_timeout: float | None
    ) -> web.StreamResponse:
        # The backend's answer began: timed now, whatever its status and whether swapd sends
        # it on whole (after the handler), streamed, or put in the envelope.
        answer_began(request, time.perf_counter())
        dropped = (
            _HOP_BYTES | upstream.connection_names if upstream.connection_names else _HOP_BYTES
        )
        out_headers = [
            (k.decode("latin-1"), _header_text(v))
            for k, v in upstream.raw_headers
            if k.lower() not in dropped
        ]
        if request.method == "HEAD" and upstream.content_length is not None:
            # The size of the answer a GET would get: aiohttp would not say it itself.
            out_headers.append(("Content-Length", str(upstream.content_length)))
        content_type = upstream.content_type
        streaming = content_type is not None and content_type.startswith(b"text/event-stream")
        length = upstream.content_length
        if (
            upstream.status >= 400
            and not streaming
            and not request.get(AS_SENT)
            and not is_json(content_type)
        ):
            # An HTML 500, sized or chunked: in the envelope, so SDKs read its reason.
            raise BackendErrorText(model, upstream.status, await _error_text(upstream, model))
        if not streaming and length is not None and length <= BUFFER_LIMIT:
            return await _sized_answer(upstream, model, out_headers)
        # The headers go out with the first chunk (or the end): one write and one wake-up
        # of the client instead of two, on the way to the first chunk.
        response = _Coalesced(status=upstream.status, headers=out_headers)
        if length is not None and not streaming:
            response.content_length = length
        request[_RELAYED] = response
        if streaming:
            # Tell Nginx (and similar) not to buffer server-sent events.
            response.headers["X-Accel-Buffering"] = "no"
            response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        flush = None
        if not upstream.settled():
            # ...but not later than HEADERS_WAIT: a backend still working on its first
            # chunk (a long prompt) shows the client its status meanwhile.
            flush = asyncio.get_running_loop().call_later(HEADERS_WAIT, _send_headers, request)
        try:
            cut = await pass_body(request, response, upstream, send_timeout)
        finally:
            if flush is not None:
                flush.cancel()
        if cut is not None:
            _end_cut(request, response, BackendGone(model, str(cut)))
        return response


async def lease_again(manager: Manager, lease: Lease, refused: NotSent) -> Lease:
    """The same request leased again, once swapd has seen its refusing backend exit.

    The backend refused the connection (given back in ``lease``): the request never
    reached it, and waits for the restart as any request for a stopped model does.
    :class:`BackendGone` when no exit is seen within :data:`EXIT_NOTICE_WAIT`.
    """
    if not await manager.exit_noticed(lease, EXIT_NOTICE_WAIT):
        raise BackendGone(lease.model, str(refused))
    return await manager.acquire(lease.model, admitted=True, passive=lease.passive)


async def pass_body(
    request: web.Request,
    response: web.StreamResponse,
    upstream: UpstreamResponse,
    send_timeout: float | None = None,
) -> UpstreamError | None:
    """Write the backend's body to the client chunk by chunk, as it comes.

    While the client keeps up, each chunk is written from the backend connection's
    own read (:func:`_write_at_once`); chunks that wait go through the awaited path
    below, which waits for a slow client (backpressure), for ``send_timeout`` at most
    per write: a client that takes nothing for that long is cut, and its lease freed.
    Returns the backend's error when it cut its answer short: the caller ends the
    client's answer as it can.
    """
    upstream.pass_to(_write_at_once(request))
    stall = _Stall(request, send_timeout)
    try:
        while (chunk := await upstream.next_chunk()) is not None:
            if upstream.finished():
                # The answer is whole: its last chunk and the end go in one write.
                response[_WHOLE] = True
                await stall.write(response.write_eof(chunk))
                return None
            await stall.write(response.write(chunk))
        response[_WHOLE] = True
        await stall.write(response.write_eof())
    except UpstreamError as exc:
        return exc
    finally:
        stall.stop()
        upstream.pass_to(None)
    return None


async def write_last(
    request: web.Request,
    response: web.StreamResponse,
    data: bytes,
    send_timeout: float | None = None,
) -> None:
    """End ``response`` with ``data``; a client that takes none for ``send_timeout`` is cut."""
    stall = _Stall(request, send_timeout)
    try:
        response[_WHOLE] = True
        await stall.write(response.write_eof(data))
    finally:
        stall.stop()


class _Stall:
    """Cuts a client that takes nothing of its answer for ``send_timeout``.

    One timer a stream, not one a write: each awaited write notes when it began, and the
    timer, when it fires, cuts the client if a write has waited that long, else sleeps on.
    The cut (an abort: a close would wait to flush) fails the waiting write, which ends
    the relay.
    """

    def __init__(self, request: web.Request, limit: float | None) -> None:
        self._request = request
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None
        self._timer = None if limit is None else self._loop.call_later(limit, self._check)

    async def write(self, step: Awaitable[None]) -> None:
        self._since = self._loop.time()
        try:
            await step
        finally:
            self._since = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        limit, since = self._limit, self._since
        assert limit is not None  # noqa: S101 - only armed with a limit
        waited = 0.0 if since is None else self._loop.time() - since
        if waited < limit:
            self._timer = self._loop.call_later(limit - waited, self._check)
            return
        self._timer = None
        _log.info("request.client_stalled", send_timeout_s=limit)
        stream_error(self._request, CLIENT_GONE)
        if self._request.transport is not None:
            self._request.transport.abort()  # close() would wait to flush to this client


def _write_at_once(request: web.Request) -> Callable[[bytes], bool] | None:
    """A sink that writes a chunk to the client at once when nothing is waiting to go out.

    aiohttp's ``write`` only awaits to compress (never on a relayed answer) or to
    drain, which ``drain=False`` skips, so one step of it does the whole write. A
    client with unsent bytes, or gone, gets the chunk through the awaited path.
    """
    writer = request.writer
    transport = request.transport
    if not isinstance(writer, StreamWriter):
        return None  # another writer: every chunk takes the awaited path

    def write(chunk: bytes) -> bool:
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        return _write_now(writer, chunk)

    return write


def _write_now(writer: StreamWriter, chunk: bytes) -> bool:
    """Write ``chunk`` (framed as the answer is) in one step, never waiting to drain."""
    step = writer.write(chunk, drain=False)
    try:
        # Run as a loop over its steps, which ends without the StopIteration that a
        # finished send() raises (a raise and a catch a chunk); a step means it waited.
        for _ in step.__await__():
            step.close()
            raise RuntimeError("the response writer waited on a relayed chunk")
    except ConnectionError:
        return False
    return True


def _end_cut(request: web.Request, response: web.StreamResponse, exc: BackendGone) -> None:
    """End a relayed answer its backend cut short; the log and metrics say it failed."""
    stream_error(request, exc.status)
    _answer_or_cut(request, response, exc)


def _answer_or_cut(
    request: web.Request, held: web.StreamResponse, exc: BackendGone | UpstreamTimeout
) -> None:
    """End a relayed answer that failed: with ``exc``'s envelope while none of it went out.

    Nothing went out yet while the headers wait for the first chunk: the client can
    still be told, instead of finding the connection shut. Once they are gone the status
    is promised, and a cut connection is the honest signal left; a stream of events says
    why first, in one error event (SDKs raise it as the error's message).
    """
    if not request.writer.output_size:
        _answer_instead(request, held, exc)
        return
    cut_after_event(request, held, exc.envelope()["error"])


def cut_after_event(
    request: web.Request, response: web.StreamResponse, error: dict[str, Any]
) -> None:
    """Close a begun answer's connection; a stream says why first, in one error event.

    The event is written at once, never waiting on the client, so a client that takes
    nothing holds nothing: the lease is released as the handler returns.
    """
    transport = request.transport
    if transport is None:
        return
    writer = request.writer
    if (
        _is_event_stream(response)
        and isinstance(writer, StreamWriter)
        and request.method != "HEAD"
        and not answer_whole(response)  # a timeout while its end drains: nothing may follow
    ):
        _write_now(writer, error_event(error, request.path))
    transport.close()  # after what waits to go out: the cut is the end, not a chunked end


def answer_whole(response: web.StreamResponse) -> bool:
    """Whether the relayed answer's end has been (or is being) written: nothing may follow."""
    return _WHOLE in response


def _is_event_stream(response: web.StreamResponse) -> bool:
    return response.headers.get(hdrs.CONTENT_TYPE, "").startswith("text/event-stream")


# Routes whose clients read named events only: Anthropic's SDKs skip an event with no
# name, so there the error event is named (OpenAI's SDKs raise it named or not), and
# its data says ``"type": "error"``, as every event of Anthropic's streams names its type.
_NAMED_ERRORS = frozenset({"/v1/messages"})


def error_event(error: dict[str, Any], path: str) -> bytes:
    """An error as one server-sent event, as OpenAI's streams carry one, on ``path``'s stream.

    A blank line first ends any event the backend left unfinished, so the error is an
    event of its own; between events it is a no-op. On Anthropic's route it is named
    ``error`` and typed, as Anthropic sends one: ``{"type": "error", "error": {...}}``.
    """
    if path in _NAMED_ERRORS:
        name, data = b"event: error\n", {"type": "error", "error": error}
    else:
        name, data = b"", {"error": error}
    text = json.dumps(data, separators=(",", ":")).encode()
    return b"\n\n" + name + b"data: " + text + b"\n\n"


# Of a relayed answer's headers, those swapd's own answer in its place keeps: the request
# id and CORS, which swapd sets at prepare (over a backend's own, where it sets them).
_KEPT_ON_ERROR = ("X-Request-Id", "Access-Control-Allow-Origin", "Access-Control-Expose-Headers")


def _answer_instead(
    request: web.Request, held: web.StreamResponse, exc: BackendGone | UpstreamTimeout
) -> None:
    """Answer ``exc`` in the envelope in place of ``held``, none of which has gone out.

    aiohttp has taken ``held`` as the answer (its headers wait in the writer), so the
    error is written to the connection by hand, and the connection closed after it: the
    writer's later attempt to send ``held`` finds it closing and sends nothing.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    body = b"" if request.method == "HEAD" else json.dumps(exc.envelope()).encode()
    headers = {name: held.headers[name] for name in _KEPT_ON_ERROR if name in held.headers}
    if "Access-Control-Allow-Origin" in headers:
        headers["Vary"] = "Origin"
    headers |= exc.headers()
    headers["Content-Type"] = "application/json; charset=utf-8"
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "close"
    version = request.version
    lines = [f"HTTP/{version.major}.{version.minor} {exc.status} {HTTPStatus(exc.status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    # UTF-8, as aiohttp writes header values (and it has checked these ones at prepare).
    transport.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    transport.close()


def _header_text(value: bytes) -> str:
    """A backend's header value as text for aiohttp, which writes it out as UTF-8.

    UTF-8 bytes (a file name in Content-Disposition) go out as they came. Other bytes
    are read as latin-1 and so reach the client re-encoded (byte E9 as C3 A9):
    aiohttp has no way to write raw header bytes. Backends send ASCII in practice.
    """
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _send_headers(request: web.Request) -> None:
    """Send a relayed answer's held headers now, if they have not gone with a chunk."""
    with contextlib.suppress(ConnectionError):
        request.writer.send_headers()


async def _sized_answer(
    upstream: UpstreamResponse, model: str, headers: list[tuple[str, str]]
) -> web.Response:
    """A sized answer, read whole and sent in one write."""
    try:
        payload = await upstream.read()
    except UpstreamError as exc:
        raise BackendGone(model, str(exc)) from exc
    return web.Response(status=upstream.status, body=payload, headers=headers)


# Of a backend's error text, what swapd reads for the envelope's message (which shows
# 500 characters of it); the rest is not read, and the connection is closed.
ERROR_TEXT_LIMIT = 64 * 1024
# How long swapd waits for the rest of that text once the headers are in: a backend that
# never ends its error would otherwise hold the client, with no status, for as long as it
# waits (``request_timeout`` is unset by default). What came by then is the text.
ERROR_TEXT_WAIT = 2.0


async def _error_text(upstream: UpstreamResponse, model: str) -> bytes:
    """The start of a backend's error answer that is not JSON, whatever its framing.

    ``/upstream/`` passes such an answer as sent; swapd's OpenAI routes put it in the
    envelope (:class:`BackendErrorText`).
    """
    try:
        return await error_text(upstream)
    except UpstreamError as exc:
        raise BackendGone(model, str(exc)) from exc


async def error_text(upstream: UpstreamResponse) -> bytes:
    """What a backend's error answer says, as far as it came within :data:`ERROR_TEXT_WAIT`.

    At most :data:`ERROR_TEXT_LIMIT` bytes, decompressed where the answer is in gzip or
    deflate; :class:`UpstreamError` when the backend cut it short. The rest is left
    unread: the caller's ``finish`` closes the connection.
    """
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(ERROR_TEXT_WAIT):
            while size < ERROR_TEXT_LIMIT and (chunk := await upstream.next_chunk()) is not None:
                parts.append(chunk)
                size += len(chunk)
    except TimeoutError:
        pass  # the rest never came: the connection is closed, unfinished
    text = b"".join(parts)[:ERROR_TEXT_LIMIT]
    coding = upstream.header("Content-Encoding")
    if coding is not None and coding.strip().lower() in _ZLIB_CODINGS:
        return _decompressed(text)
    return text


# Content codings of an error text that swapd reads decompressed (zlib reads both); a
# server that compresses its answers (a client's Accept-Encoding passes) compresses errors.
_ZLIB_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})


def _decompressed(text: bytes) -> bytes:
    """The start of a gzip or zlib text, up to :data:`ERROR_TEXT_LIMIT`; as sent if not one."""
    try:
        # 32 + 15: a gzip or a zlib header, whichever it is. As far as the text came.
        return zlib.decompressobj(32 + 15).decompress(text, ERROR_TEXT_LIMIT)
    except zlib.error:
        return text


def is_json(content_type: bytes | None) -> bool:
    """Whether a backend's Content-Type is JSON (``application/json``, ``...+json``)."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


class _Coalesced(web.StreamResponse):
    """A relayed answer whose headers wait for its first chunk and go out in the same write.

    aiohttp holds the headers until the first write (or ``send_headers``) when this is
    False, as it does for ``web.Response``.
    """

    _send_headers_immediately = False


def error_response(exc: RequestError) -> web.Response:
    """The one OpenAI-shaped error envelope every failure is answered with."""
    return web.json_response(exc.envelope(), status=exc.status, headers=exc.headers())
