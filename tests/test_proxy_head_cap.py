"""A backend answer whose head is over swapd's 64 KiB cap is a 502, however it arrives."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon

FAKE = Path(__file__).resolve().parent / "fakes" / "big_head_backend.py"


def _preset() -> dict[str, Any]:
    return {"backend": "command", "cmd": [sys.executable, str(FAKE), "--port", "${PORT}"]}


def _post(d: Daemon, mode: str) -> tuple[str, int, bytes]:
    """The status line, the size of the head and the body, read off a raw socket."""
    body = json.dumps({"model": "b", "mode": mode}).encode()
    with socket.create_connection(("127.0.0.1", d.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (d.port, len(body), body)
        )
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), len(head), rest


@pytest.mark.parametrize("mode", ["sized", "sse", "split"])
def test_a_head_over_the_cap_is_a_502(start_daemon: StartDaemon, mode: str) -> None:
    """A 65,537-byte head in one read is a 502 JSON error, as a 100 KB one in many reads is.

    Before: ``sized`` was a 200 with the 64 KiB header relayed; ``sse`` was an empty reply
    (no status line) or a 200 with the whole stream, as the reads fell; ``split`` was a
    502 already. Then an ordinary request is answered.
    """
    d = start_daemon({"b": _preset()})
    status_line, _, _ = _post(d, mode)
    assert status_line.split(" ")[1:2] == ["502"], f"{mode}: {status_line!r}"
    assert _post(d, "ok")[0] == "HTTP/1.1 200 OK"
