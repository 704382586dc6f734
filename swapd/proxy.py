"""OpenAI-compatible routes: find the model, lease a ready backend, pass the exchange through.

Bodies are forwarded as the bytes the client sent (never re-encoded), and
responses as the chunks the backend sends: a streamed answer reaches the
client chunk by chunk, and a client that hangs up closes the upstream
connection, which cancels the generation.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable

from aiohttp import web
from multidict import CIMultiDict

from swapd import _json as capped_json
from swapd.errors import (
    BackendGone,
    BadRequest,
    BodyTooLarge,
    RequestError,
    RequestTimeout,
    UpstreamTimeout,
    clip,
)
from swapd.manager import Manager
from swapd.upstream import UpstreamError, UpstreamPool, UpstreamResponse

JSON_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/rerank",
)
MULTIPART_ROUTES = ("/v1/audio/transcriptions",)
# Headers that describe one hop, not the message (RFC 9110 section 7.6.1), plus ones aiohttp sets.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# The client's credentials for swapd: never forwarded (a backend's own key is swapd's to send).
_PRIVATE = frozenset({"authorization", "x-api-key", "cookie"})
_NOT_FORWARDED = frozenset(name.encode() for name in _HOP | _PRIVATE)
# Sized answers up to this are read whole and sent in one write; larger ones are passed
# through chunk by chunk with backpressure, like streams, so swapd never holds them whole.
BUFFER_LIMIT = 1 << 20


def _named_in_connection(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names that ``Connection`` declares hop-by-hop (RFC 9110 section 7.6.1)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_FIELD_NAME = re.compile(rb'name="([^"]*)"', re.IGNORECASE)


def model_from_json(body: bytes) -> str:
    """The ``model`` of a JSON request body, or :class:`BadRequest` saying what is wrong."""
    data = capped_json.loads(body)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest('request body has no "model" string')
    return model


def model_from_multipart(body: bytes, content_type: str) -> str:
    """The ``model`` field of a multipart/form-data body."""
    match = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/form-data") or match is None:
        raise BadRequest("expected a multipart/form-data body with a boundary")
    delimiter = b"--" + match.group(1).encode()
    for part in body.split(delimiter)[1:]:
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        for line in head.split(b"\r\n"):
            if not line.lower().startswith(b"content-disposition:"):
                continue
            name = _FIELD_NAME.search(line)
            if name and name.group(1) == b"model":
                model = value.rstrip(b"\r\n").decode("utf-8", "replace").strip()
                if model:
                    return model
    raise BadRequest('form has no "model" field')


async def read_body(request: web.Request, limit: int, timeout: float | None = None) -> bytes:
    """The whole body, or :class:`BodyTooLarge` as soon as it passes ``limit``.

    :class:`RequestTimeout` when it has not all arrived within ``timeout`` seconds.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    try:
        async with asyncio.timeout(timeout):
            return await _read_all(request, limit)
    except TimeoutError as exc:
        raise RequestTimeout(timeout or 0) from exc


async def _read_all(request: web.Request, limit: int) -> bytes:
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise BodyTooLarge(limit)
    while not request.content.at_eof():
        more = await request.content.read(limit + 1 - len(body))
        if not more:
            break
        body += more
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return body


class Proxy:
    """The request path: parse, lease, forward."""

    def __init__(
        self,
        manager: Manager,
        pool: UpstreamPool,
        max_body: int,
        body_timeout: float | None = None,
    ) -> None:
        self.manager = manager
        self.pool = pool
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def json_route(self, request: web.Request) -> web.StreamResponse:
        """POST routes whose JSON body names the model."""
        body = await read_body(request, self.max_body, self.body_timeout)
        return await self.forward(request, model_from_json(body), body)

    async def multipart_route(self, request: web.Request) -> web.StreamResponse:
        """POST routes whose multipart form names the model."""
        body = await read_body(request, self.max_body, self.body_timeout)
        model = model_from_multipart(body, request.headers.get("Content-Type", ""))
        return await self.forward(request, model, body)

    async def forward(self, request: web.Request, model: str, body: bytes) -> web.StreamResponse:
        """Send the request to a leased backend and pass the answer back unbuffered."""
        request["model"] = clip(model)
        async with self.manager.lease(model) as lease:
            # The client's header bytes as sent: decoding and re-encoding them could fail.
            dropped = _NOT_FORWARDED | _named_in_connection(request.raw_headers)
            headers = [(k, v) for k, v in request.raw_headers if k.lower() not in dropped]
            launch = lease.slot.launch
            if launch is not None:
                headers.extend(launch.headers)  # the backend's own key, known only to swapd
            limit = lease.slot.preset.request_timeout
            try:
                async with asyncio.timeout(limit):
                    try:
                        upstream = await self.pool.request(
                            lease.host,
                            lease.port,
                            request.method,
                            request.rel_url.raw_path_qs,
                            headers,
                            body,
                        )
                    except UpstreamError as exc:
                        raise BackendGone(lease.model, str(exc)) from exc
                    try:
                        return await self._relay(request, upstream, lease.model)
                    finally:
                        # Closing (not reusing) an unfinished upstream cancels the generation.
                        upstream.finish()
            except TimeoutError:
                assert limit is not None  # noqa: S101 - only a set limit times out
                if request.get("relay_started"):
                    # Headers are gone already: a cut connection is the only signal left.
                    if request.transport is not None:
                        request.transport.close()
                    return web.Response(status=504)
                raise UpstreamTimeout(lease.model, limit) from None

    @staticmethod
    async def _relay(
        request: web.Request, upstream: UpstreamResponse, model: str
    ) -> web.StreamResponse:
        hop = _HOP | {n.decode("latin-1") for n in _named_in_connection(_raw(upstream.headers))}
        out_headers = [(k, v) for k, v in upstream.headers if k.lower() not in hop]
        content_type = upstream.header("Content-Type") or ""
        streaming = content_type.startswith("text/event-stream")
        length = upstream.header("Content-Length")
        small = length is not None and length.isdigit() and int(length) <= BUFFER_LIMIT
        if not streaming and small:
            # A sized answer: read it whole and send it in one write.
            try:
                payload = await upstream.read()
            except UpstreamError as exc:
                raise BackendGone(model, str(exc)) from exc
            return web.Response(
                status=upstream.status, body=payload, headers=CIMultiDict(out_headers)
            )
        response = web.StreamResponse(status=upstream.status, headers=CIMultiDict(out_headers))
        if length is not None and length.isdigit() and not streaming:
            response.content_length = int(length)
        request["relay_started"] = True
        if streaming:
            # Tell Nginx (and similar) not to buffer server-sent events.
            response.headers["X-Accel-Buffering"] = "no"
            response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        try:
            async for chunk in upstream.iter_chunks():
                await response.write(chunk)
        except UpstreamError:
            # Headers are gone already: the only honest signal left is a cut connection.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response


def _raw(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def error_response(exc: RequestError) -> web.Response:
    """The one OpenAI-shaped error envelope every failure is answered with."""
    return web.json_response(exc.envelope(), status=exc.status, headers=exc.headers())
