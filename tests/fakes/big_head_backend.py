"""A raw-socket backend whose answer heads are just over swapd's 64 KiB cap.

Each POST's JSON "mode" says how: ``sized`` (a 65,537-byte head and a 2-byte body in one
write), ``sse`` (a 65,537-byte chunked event-stream head in one write, its events a
moment later), ``split`` (a 100,000-byte head in 4 KiB writes), ``ok`` (a small answer).

    python tests/fakes/big_head_backend.py --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fakes.raw_backend import read_request

CAP = 64 * 1024


def head_block(total: int, framing: bytes) -> bytes:
    """A status line and headers, blank line included, of exactly ``total`` bytes."""
    start = b"HTTP/1.1 200 OK\r\n" + framing
    pad = total - len(start) - len(b"X-Pad: \r\n\r\n")
    return start + b"X-Pad: " + b"a" * pad + b"\r\n\r\n"


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: requests until it closes."""
    try:
        while True:
            path, body = await read_request(reader)
            mode = "health" if path == "/health" else json.loads(body).get("mode", "ok")
            if mode == "sized":
                writer.write(head_block(CAP + 1, b"Content-Length: 2\r\n") + b"ok")
            elif mode == "sse":
                framing = b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                writer.write(head_block(CAP + 1, framing))
                await writer.drain()
                await asyncio.sleep(0.2)
                event = b"data: {}\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            elif mode == "split":
                answer = head_block(100_000, b"Content-Length: 2\r\n") + b"ok"
                for i in range(0, len(answer), 4096):
                    writer.write(answer[i : i + 4096])
                    await writer.drain()
                    await asyncio.sleep(0.005)
            else:
                answer = b"ok" if mode == "health" else b'{"ok": true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    """Listen on --port until killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = await asyncio.start_server(serve, "127.0.0.1", args.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
