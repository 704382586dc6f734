"""Bodies at the edge: large ones in one write, chunked ones, and one left unread.

None of a body's bytes counts toward the 64 KiB header cap.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from daemon import Daemon, fake_preset

HOST = b"Host: 127.0.0.1\r\n"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One swapd without keys, with the fake backend; bodies time out after 5 s."""
    d = Daemon(tmp_path_factory.mktemp("bodies"), {"a": fake_preset("A")}, {"body_timeout": 5})
    d.start()
    # warm the model: every later request runs at once (or for its fake_delay)
    assert d.chat("a")[0] == 200
    yield d
    assert not d.cleanup(), "processes outlived swapd"


def connect(d: Daemon, timeout: float = 20) -> socket.socket:
    """A connection to swapd that sends each write at once."""
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until swapd closes; what came so far when the socket times out."""
    out = b""
    try:
        while chunk := sock.recv(1 << 20):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def statuses(raw: bytes) -> list[int]:
    """The status of every (sized) answer in ``raw``."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        size = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                size = int(value)
        found.append(int(lines[0].split()[1]))
        raw = rest[size:]
    return found


def exchange(d: Daemon, *pieces: bytes, pause: float = 0.0, timeout: float = 20) -> list[int]:
    """Send ``pieces`` (``pause`` apart) from a thread; the statuses of every answer."""
    with connect(d, timeout) as sock:

        def send() -> None:
            for i, piece in enumerate(pieces):
                if i and pause:
                    time.sleep(pause)
                try:
                    sock.sendall(piece)
                except OSError:
                    return

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = statuses(read_all(sock))
        sender.join(5)
    return got


def chat(delay: float = 0, text: str = "hi", *, close: bool = False) -> bytes:
    """A raw chat request for the fake backend."""
    body = json.dumps(
        {"model": "a", "messages": [{"role": "user", "content": text}], "fake_delay": delay}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        + HOST
        + (b"Connection: close\r\n" if close else b"")
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def test_one_large_post_on_a_new_connection_is_served(plain: Daemon) -> None:
    """A single 1 MB chat request, sent in one write, is answered 200.

    A version of the pipelined-head count took the body's reads before the handler started
    for a head: 408, then a 431 behind it.
    """
    got = [exchange(plain, chat(text="q" * 1_000_000, close=True)) for _ in range(3)]
    assert got == [[200]] * 3


def test_a_large_chunked_upload_on_a_new_connection_is_served(plain: Daemon) -> None:
    """The same with a 1 MB chunked body (64 KiB chunks) in one write."""
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "c" * 1_000_000}]})
    raw = body.encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(raw[i : i + 65536]), raw[i : i + 65536])
        for i in range(0, len(raw), 65536)
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Connection: close\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    got = [exchange(plain, request) for _ in range(3)]
    assert got == [[200]] * 3


def test_the_body_of_a_request_answered_early_is_no_head(plain: Daemon) -> None:
    """A request answered before its body is read (404 here) gets one answer, not two.

    aiohttp reads the unread body away after the answer; its bytes were counted as the
    next request's head: past 64 KiB a 431 followed the 404 on the same connection.
    """
    body = b"x" * 300_000
    head = b"POST /v1/no-such-route HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % len(body)
    follow = b"GET /health HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
    got = exchange(plain, head, body, follow, pause=0.3)
    assert 431 not in got, got
