"""OpenAI-compatible routes: find the model, lease a ready backend, pass the exchange through.

Bodies are forwarded as the bytes the client sent (never re-encoded), and
responses as the chunks the backend sends: a streamed answer reaches the
client chunk by chunk, and a client that hangs up closes the upstream
connection, which cancels the generation.
"""

from __future__ import annotations

import json
import re

from aiohttp import web
from multidict import CIMultiDict

from swapd.errors import BackendGone, BadRequest, BodyTooLarge, RequestError
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
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_FIELD_NAME = re.compile(rb'name="([^"]*)"', re.IGNORECASE)


def model_from_json(body: bytes) -> str:
    """The ``model`` of a JSON request body, or :class:`BadRequest` saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
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


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or :class:`BodyTooLarge` as soon as it passes ``limit``."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
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

    def __init__(self, manager: Manager, pool: UpstreamPool, max_body: int) -> None:
        self.manager = manager
        self.pool = pool
        self.max_body = max_body

    async def json_route(self, request: web.Request) -> web.StreamResponse:
        """POST routes whose JSON body names the model."""
        body = await read_body(request, self.max_body)
        return await self.forward(request, model_from_json(body), body)

    async def multipart_route(self, request: web.Request) -> web.StreamResponse:
        """POST routes whose multipart form names the model."""
        body = await read_body(request, self.max_body)
        model = model_from_multipart(body, request.headers.get("Content-Type", ""))
        return await self.forward(request, model, body)

    async def forward(self, request: web.Request, model: str, body: bytes) -> web.StreamResponse:
        """Send the request to a leased backend and pass the answer back unbuffered."""
        request["model"] = model
        async with self.manager.lease(model) as lease:
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
            try:
                upstream = await self.pool.request(
                    lease.host, lease.port, request.method, request.path_qs, headers, body
                )
            except UpstreamError as exc:
                raise BackendGone(lease.model, str(exc)) from exc
            try:
                return await self._relay(request, upstream, lease.model)
            finally:
                # Closing (not reusing) an unfinished upstream cancels the generation.
                upstream.finish()

    @staticmethod
    async def _relay(
        request: web.Request, upstream: UpstreamResponse, model: str
    ) -> web.StreamResponse:
        out_headers = [(k, v) for k, v in upstream.headers if k.lower() not in _HOP]
        content_type = upstream.header("Content-Type") or ""
        streaming = content_type.startswith("text/event-stream")
        if not streaming and upstream.header("Content-Length") is not None:
            # A sized answer: read it whole and send it in one write.
            try:
                payload = await upstream.read()
            except UpstreamError as exc:
                raise BackendGone(model, str(exc)) from exc
            return web.Response(
                status=upstream.status, body=payload, headers=CIMultiDict(out_headers)
            )
        response = web.StreamResponse(status=upstream.status, headers=CIMultiDict(out_headers))
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


def error_response(exc: RequestError) -> web.Response:
    """The one OpenAI-shaped error envelope every failure is answered with."""
    envelope = {
        "error": {"message": exc.message, "type": exc.kind, "code": exc.code, "param": None}
    }
    return web.json_response(envelope, status=exc.status, headers=exc.headers())
