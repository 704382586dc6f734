"""Cold-load keepalive: SSE comment pings while a streaming request waits for its model.

Nginx (60 s by default), LiteLLM and many clients give up when no byte arrives
for a while, and a cold load can take minutes before the first token. For a
streaming request (``"stream": true``, or another value vLLM reads as true:
see :func:`is_true`; on a multipart route, a ``stream`` form field) whose model
is not ready, swapd watches the load: once admission has accepted it (the model
is ``starting`` or ``waking``) and the request has waited :data:`PING_AFTER`
seconds, swapd answers 200 with ``text/event-stream`` and sends ``: loading`` every
:data:`PING_EVERY` seconds until the backend answers; then the backend's events
follow on the same stream. Before the first ping a refusal (503
``insufficient_memory``, ``queue_timeout``, ``backoff``) is still a plain HTTP
error that clients can retry elsewhere; after it, an error goes out as one
``data: {"error": ...}`` event (named ``error`` on ``/v1/messages``) and the stream ends.
A backend that answers such a stream in plain JSON (one that takes only a JSON
``true`` for a stream, say) has its JSON sent as one event, then ``data: [DONE]``;
on ``/v1/messages`` a message or an error goes out as Anthropic's named events.

Every other request takes the proxy's own path: :class:`ColdStreams` answers
itself only a stream whose pings have started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from swapd import _json as capped_json
from swapd._exchange import EXCHANGE, count, stream_error
from swapd.errors import BackendGone, RequestError, UpstreamTimeout
from swapd.events import SSE_HEADERS
from swapd.manager import Lease
from swapd.message_events import answer_events
from swapd.proxy import (
    BUFFER_LIMIT,
    Proxy,
    answer_whole,
    cut_after_event,
    error_event,
    error_text,
    form_fields,
    forwarded_headers,
    is_json,
    lease_again,
    model_from_json,
    pass_body,
    read_body,
    write_last,
)
from swapd.states import State
from swapd.upstream import NotSent, UpstreamError, UpstreamResponse

PING_AFTER = 3.0  # seconds a request waits before the first ping
PING_EVERY = 3.0
_WATCH_EVERY = 0.25
_ADMITTED = frozenset({"starting", "waking"})


# The texts vLLM's request models (pydantic, in its default lax mode) read as a true
# bool, in any case; ``"0"``, ``"false"``, ``"no"``... are false, anything else refused.
_TRUE_TEXTS = frozenset({"1", "t", "y", "on", "yes", "true"})
# Routes whose streams end with the last event, not with OpenAI's ``data: [DONE]``.
_NO_DONE = frozenset({"/v1/messages"})
# Routes whose clients read named events only: Anthropic's.
_NAMED_EVENTS = frozenset({"/v1/messages"})


def is_true(value: object) -> bool:
    """Whether vLLM reads ``value`` as a true ``stream``: ``true``, ``1``, ``"true"``..."""
    if isinstance(value, str):
        return value.isascii() and value.lower() in _TRUE_TEXTS
    if isinstance(value, bool):
        return value
    return isinstance(value, int | float) and value == 1


def wants_stream(body: bytes) -> bool:
    """Whether a JSON body that mentions ``"stream"`` asks for a streamed answer."""
    data = capped_json.loads(body)
    return isinstance(data, dict) and is_true(data.get("stream"))


def form_wants_stream(body: bytes, content_type: str) -> bool:
    """Whether a multipart form asks for a streamed answer (vLLM's transcriptions)."""
    fields = form_fields(body, content_type, b"stream")
    if not fields:
        return False
    start, end = fields[-1]  # the last of a repeated field, as vLLM's form parser reads it
    return is_true(body[start:end].decode("utf-8", "replace"))


def json_event(payload: bytes, path: str) -> bytes:
    """A JSON answer as one event: each of its lines a ``data:`` line, as SSE needs.

    Then OpenAI's ``data: [DONE]``, but on ``path``s whose streams have none. On
    ``/v1/messages`` a message, or an error, goes out as the named events Anthropic's
    SDKs read (:mod:`swapd.message_events`); they skip an unnamed one.
    """
    if path in _NAMED_EVENTS and (events := answer_events(payload)) is not None:
        return events
    lines = payload.splitlines() or [b""]
    event = b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return event if path in _NO_DONE else event + b"data: [DONE]\n\n"


class Pings:
    """The pings of one request, and the stream they open."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self._closed = False  # the relay took over: no ping may start or go out
        self._lock = asyncio.Lock()  # one writer at a time: a ping, or the takeover

    async def run(self, admitted: Callable[[], bool]) -> None:
        """Ping once ``admitted()`` holds and the request has waited :data:`PING_AFTER`."""
        start = time.monotonic()
        while not self._closed:
            await asyncio.sleep(_WATCH_EVERY)
            if time.monotonic() - start >= PING_AFTER and admitted():
                break
        while True:
            async with self._lock:
                if self._closed:
                    return
                if self.response is None:
                    self.response = web.StreamResponse(status=200, headers=SSE_HEADERS)
                    exchange = self.request.get(EXCHANGE)
                    if exchange is not None:
                        exchange.ping_stream = self.response  # not the backend's first byte
                    await self.response.prepare(self.request)
                await self.response.write(b": loading\n\n")
            await asyncio.sleep(PING_EVERY)

    async def started(self) -> bool:
        """Whether a ping went out; when none has, none ever will (the proxy answers)."""
        async with self._lock:
            if self.response is None:
                self._closed = True
            return self.response is not None

    async def take_over(self) -> web.StreamResponse | None:
        """Stop pinging; the open stream, or None when no ping went out."""
        self._closed = True
        async with self._lock:
            return self.response

    async def fail(self, response: web.StreamResponse, error: dict[str, Any]) -> None:
        """End an open stream with one error event.

        Not once the answer's end was being written (a timeout while its last write
        drained): nothing may follow that end, so the connection is closed instead. Nor
        to a client that is behind: the end would wait for it with no ``send_timeout``
        left to cut it (after a timeout cut such a wait short, aiohttp fails the next
        one at once, as cancelled), so it gets the event at once and then the close.
        """
        if answer_whole(response) or self.request.protocol.writing_paused:
            cut_after_event(self.request, response, error)
            return
        with contextlib.suppress(ConnectionError):
            await response.write(error_event(error, self.request.path))
            await response.write_eof()


class ColdStreams:
    """The proxy's JSON routes, plus pings for streaming requests that wait for a load."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.manager = proxy.manager

    async def json_route(self, request: web.Request) -> web.StreamResponse:
        """POST routes whose JSON body names the model."""
        count(request)
        proxy = self.proxy
        body = await read_body(request, proxy.max_body, proxy.body_timeout)
        model = await proxy.large_bodies.read(body, model_from_json)
        # Cheapest test first: most requests do not stream and most models are ready, so
        # the body is parsed only for a stream that may wait (not a snapshot, not a parse
        # on every streamed request: both lie on the way to the first chunk).
        if (
            (b'"stream"' in body or b"\\u" in body)  # or a key spelt with an escape
            and self.manager.slot_for(model).state is not State.READY
            and await proxy.large_bodies.read(body, wants_stream)
        ):
            return await self._cold(request, model, body, form=False)
        return await proxy.forward(request, model, body, json_body=True)

    async def multipart_route(self, request: web.Request) -> web.StreamResponse:
        """POST routes whose multipart form names the model (a transcription may stream)."""
        count(request)
        proxy = self.proxy
        body, model = await proxy.read_form(request)
        # The model's state first: a form is mostly a file, not scanned for a ready model.
        if (
            self.manager.slot_for(model).state is not State.READY
            and b"stream" in body
            and await proxy.large_bodies.read(
                body,
                functools.partial(
                    form_wants_stream, content_type=request.headers.get("Content-Type", "")
                ),
            )
        ):
            return await self._cold(request, model, body, form=True)
        return await proxy.forward(request, model, body, form=True)

    async def _cold(
        self, request: web.Request, model: str, body: bytes, *, form: bool
    ) -> web.StreamResponse:
        request["model"] = model  # clipped in the log line, not for the metrics' lookup
        pings = Pings(request)

        def admitted() -> bool:
            try:
                return self.manager.view(model).state in _ADMITTED
            except RequestError:
                return False  # removed by a reload: the lease says why

        watcher = asyncio.create_task(pings.run(admitted), name=f"pings:{model}")
        try:
            try:
                lease = await self.manager.acquire(model)  # waits for the load
            except RequestError as exc:
                return await self._refused(request, pings, exc)
            return await self._answer(request, pings, lease, body, form)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _refused(
        self, request: web.Request, pings: Pings, exc: RequestError
    ) -> web.StreamResponse:
        response = await pings.take_over()
        if response is None:
            raise exc  # no ping went out: a plain HTTP error a client can retry elsewhere
        stream_error(request, exc.status)
        await pings.fail(response, exc.envelope()["error"])
        return response

    async def _answer(
        self, request: web.Request, pings: Pings, lease: Lease, body: bytes, form: bool
    ) -> web.StreamResponse:
        held: Lease | None = lease
        try:
            if not await pings.started():
                # No ping went out: the proxy answers, as for any request. Its own lease
                # is granted at once (the model is ready), so this one goes first.
                held = None
                self.manager.release(lease)
                return await self.proxy.forward(
                    request, lease.model, body, admitted=True, json_body=not form, form=form
                )
            try:
                try:
                    return await self._relay(request, pings, lease, body, form)
                except NotSent as exc:
                    refused = exc
                # The backend died as it turned ready: the request never reached it. As
                # in the proxy, once swapd has seen the exit the request is leased again
                # and waits for the restart, the pings going on meanwhile.
                held = None
                self.manager.release(lease)
                held = lease = await lease_again(self.manager, lease, refused)
                try:
                    return await self._relay(request, pings, lease, body, form)
                except NotSent as exc:
                    raise BackendGone(lease.model, str(exc)) from exc
            except RequestError as exc:
                response = await pings.take_over()
                assert response is not None  # noqa: S101 - pings started
                stream_error(request, exc.status)
                await pings.fail(response, exc.envelope()["error"])
                return response
        finally:
            if held is not None:
                self.manager.release(held)

    async def _relay(
        self, request: web.Request, pings: Pings, lease: Lease, body: bytes, form: bool
    ) -> web.StreamResponse:
        """The backend's answer, on the stream the pings opened (they go on until it comes).

        A request that never reached the backend raises :class:`NotSent` with the pings
        still going.
        """
        limit = lease.slot.preset.request_timeout
        try:
            async with asyncio.timeout(limit):
                upstream = await self._send(request, lease, body, form)
                response = await pings.take_over()
                assert response is not None  # noqa: S101 - pings started
                try:
                    await self._copy(request, response, upstream, lease.model)
                finally:
                    upstream.finish()  # closing an unfinished answer cancels the generation
        except TimeoutError:
            assert limit is not None  # noqa: S101 - only a set limit times out
            raise UpstreamTimeout(lease.model, limit) from None
        return response

    async def _send(
        self, request: web.Request, lease: Lease, body: bytes, form: bool
    ) -> UpstreamResponse:
        if form:
            body = await self.proxy.form_for(request, lease, body)
        else:
            body = await self.proxy.body_for(lease, body)
        # The stream's headers are the pings', which name no content coding: the backend is
        # asked for its events as they are, whatever codings the client accepts.
        headers = [
            (name, value)
            for name, value in forwarded_headers(request, lease)
            if name.lower() != b"accept-encoding"
        ]
        headers.append((b"Accept-Encoding", b"identity"))
        target = request.rel_url.raw_path_qs
        try:
            return await self.proxy.pool.request(
                lease.host, lease.port, request.method, target, headers, body
            )
        except NotSent:
            raise  # the caller leases it again once swapd has seen the exit
        except UpstreamError as exc:
            raise BackendGone(lease.model, str(exc)) from exc

    async def _copy(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: UpstreamResponse,
        model: str,
    ) -> None:
        exchange = request.get(EXCHANGE)
        if exchange is not None:
            # The backend's first byte, not a ping: an error of its own is its answer too.
            exchange.first_byte = time.perf_counter()
        if upstream.status != 200:
            raise _BackendRefused(await _backend_error(upstream), upstream.status)
        if is_json(upstream.content_type):
            # Not a stream after all: SSE clients skip what is not an event, so raw JSON
            # here would read as an empty answer. It goes out as one event instead.
            payload = await _json_answer(upstream, model)
            event = json_event(payload, request.path)
            await write_last(request, response, event, self.proxy.send_timeout)
            return
        cut = await pass_body(request, response, upstream, self.proxy.send_timeout)
        if cut is not None:
            # The 200 was swapd's own, for the pings: the stream can still say what failed.
            raise BackendGone(model, str(cut))


class _BackendRefused(RequestError):
    """The backend answered the streamed request with an error of its own."""

    def __init__(self, error: dict[str, Any], status: int) -> None:
        self.status = status
        self.error = error
        super().__init__(str(error.get("message", "")))

    def envelope(self) -> dict[str, Any]:
        """The backend's own error object."""
        return {"error": self.error}


async def _json_answer(upstream: UpstreamResponse, model: str) -> bytes:
    """A backend's JSON answer, read whole: at most :data:`BUFFER_LIMIT` bytes."""
    if upstream.content_length is not None and upstream.content_length > BUFFER_LIMIT:
        reason = f"its JSON answer of {upstream.content_length} bytes is more than swapd reads"
        raise BackendGone(model, reason)
    try:
        return await upstream.read(BUFFER_LIMIT)
    except UpstreamError as exc:
        raise BackendGone(model, str(exc)) from exc


async def _backend_error(upstream: UpstreamResponse) -> dict[str, Any]:
    """The backend's error object, or one made from its status and text."""
    try:
        raw = await error_text(upstream)  # bounded: a backend may never end it
    except UpstreamError as exc:
        raw = str(exc).encode()
    # Not JSON, or nested past what the parser recurses into: the text is the message.
    with contextlib.suppress(ValueError, RecursionError):
        data = json.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return dict(data["error"])
    return {
        "message": f"backend answered {upstream.status}: {raw[:500].decode('utf-8', 'replace')}",
        "type": "server_error",
        "code": "backend_error",
        "param": None,
    }
