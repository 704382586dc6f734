"""A backend that answers every POST with the request headers and body it received, as raw bytes.

Run ``python tests/fakes/echo_headers.py --port P``. Tests use it to see exactly
what swapd forwards: which headers, and whether their bytes arrive unchanged. The
body comes back too, up to :data:`BODY_ECHO_LIMIT` bytes; a JSON body with
``"stream": true`` gets the same answer as one server-sent event, then ``[DONE]``.
"""

from __future__ import annotations

import argparse
import base64
import json

from aiohttp import web

# Bodies up to this come back whole; larger ones only as their size.
BODY_ECHO_LIMIT = 1 << 20


async def health(_request: web.Request) -> web.Response:
    """Ready at once."""
    return web.json_response({"status": "ok"})


async def echo(request: web.Request) -> web.StreamResponse:
    """The headers as (name, value) pairs and the body, base64 so that any byte survives JSON."""
    body = await request.read()
    pairs = [
        [base64.b64encode(name).decode(), base64.b64encode(value).decode()]
        for name, value in request.raw_headers
    ]
    answer = {
        "model": "echo",
        "headers": pairs,
        "path": request.raw_path,
        "body_size": len(body),
        "body": base64.b64encode(body).decode() if len(body) <= BODY_ECHO_LIMIT else None,
    }
    if not _streams(body):
        return web.json_response(answer)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: " + json.dumps(answer).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _streams(body: bytes) -> bool:
    if b'"stream"' not in body:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


def main() -> None:
    """Serve on loopback until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
