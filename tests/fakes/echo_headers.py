"""A backend that answers every POST with the request headers it received, as raw bytes.

Run ``python tests/fakes/echo_headers.py --port P``. Tests use it to see exactly
what swapd forwards: which headers, and whether their bytes arrive unchanged.
"""

from __future__ import annotations

import argparse
import base64

from aiohttp import web


async def health(_request: web.Request) -> web.Response:
    """Ready at once."""
    return web.json_response({"status": "ok"})


async def echo(request: web.Request) -> web.Response:
    """The headers as (name, value) pairs, base64 so that any byte survives JSON."""
    await request.read()
    pairs = [
        [base64.b64encode(name).decode(), base64.b64encode(value).decode()]
        for name, value in request.raw_headers
    ]
    return web.json_response({"model": "echo", "headers": pairs, "path": request.raw_path})


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
