"""The proxy path: hop-by-hop headers, request_timeout, large sized answers passed through."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
from conftest import StartDaemon
from daemon import fake_preset, fake_stats, wait_for

ECHO = Path(__file__).resolve().parent / "fakes" / "echo_headers.py"
MIB = 1 << 20


def test_headers_named_in_connection_are_not_forwarded(start_daemon: StartDaemon) -> None:
    """``Connection: X-Hop`` makes X-Hop hop-by-hop: it stops at swapd, others pass."""
    d = start_daemon(
        {"echo": {"backend": "command", "cmd": [sys.executable, str(ECHO), "--port", "${PORT}"]}}
    )
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    body = json.dumps({"model": "echo"}).encode()
    conn.request(
        "POST",
        "/v1/chat/completions",
        body,
        {
            "Content-Type": "application/json",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "for swapd only",
            "Proxy-Connection": "keep-alive",
            "X-Kept": "for the backend",
        },
    )
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, data
    got = {base64.b64decode(k).lower(): base64.b64decode(v) for k, v in data["headers"]}
    assert b"x-hop" not in got
    assert b"proxy-connection" not in got
    assert got[b"x-kept"] == b"for the backend"


def test_expect_100_continue_stops_at_swapd(start_daemon: StartDaemon) -> None:
    """swapd has the whole body before it forwards: the backend is not asked to wait for it.

    A forwarded ``Expect: 100-continue`` makes a backend (llama-server's cpp-httplib)
    send an interim 100 before its answer.
    """
    d = start_daemon(
        {"echo": {"backend": "command", "cmd": [sys.executable, str(ECHO), "--port", "${PORT}"]}}
    )
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    body = json.dumps({"model": "echo", "pad": "x" * 2048}).encode()
    conn.request(
        "POST",
        "/v1/chat/completions",
        body,
        {"Content-Type": "application/json", "Expect": "100-continue"},
    )
    resp = conn.getresponse()  # skips swapd's own 100 Continue
    data = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, data
    got = {base64.b64decode(k).lower() for k, _ in data["headers"]}
    assert b"expect" not in got
    assert b"content-type" in got


def test_request_timeout_answers_504_and_cancels_the_generation(
    start_daemon: StartDaemon,
) -> None:
    """A backend that does not answer within request_timeout: 504, and its request is cut."""
    d = start_daemon({"a": fake_preset("A", request_timeout="1s")})
    assert d.chat("a")[0] == 200
    status, body = d.chat("a", "x", fake_delay=60)
    assert status == 504
    assert body["error"]["code"] == "request_timeout"
    wait_for(lambda: fake_stats(d.model("a")["port"])["cancelled"] == 1)
    assert d.model("a")["in_flight"] == 0


def test_a_large_sized_answer_is_passed_through_not_held(start_daemon: StartDaemon) -> None:
    """A 96 MiB answer with Content-Length reaches a slow client whole; swapd never holds it.

    The client reads 1 MiB at a time with pauses, so a proxy that buffered the answer
    would hold all of it at once; swapd's RSS is sampled meanwhile.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    assert d.proc is not None
    swapd = psutil.Process(d.proc.pid)
    base = swapd.memory_info().rss
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, swapd.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    body = json.dumps({"model": "a", "prompt": "x", "fake_bytes": 96 * MIB}).encode()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Length") == str(96 * MIB)
    received = 0
    while chunk := resp.read(MIB):
        received += len(chunk)
        time.sleep(0.005)
    conn.close()
    done.set()
    sampler.join()
    assert received == 96 * MIB
    assert peak - base < 32 * MIB, f"swapd grew by {(peak - base) / MIB:.0f} MiB"


def test_a_streams_status_reaches_the_client_before_a_late_first_chunk(
    start_daemon: StartDaemon,
) -> None:
    """Headers wait for the first chunk to share its write, but not for a slow one.

    The backend sends its headers at once and its first chunk a second later (a long
    prompt): the client has the status before that chunk was even produced, and the
    whole stream follows.
    """
    d = start_daemon({"a": fake_preset("A", "--chunks", "3", "--chunk-interval", "0.01")})
    assert d.chat("a")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    chat = {
        "model": "a",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "fake_first_chunk_delay": 3.0,
    }
    conn.request("POST", "/v1/chat/completions", json.dumps(chat).encode())
    resp = conn.getresponse()  # returns once the status line and headers are in
    headers_at = time.time()
    assert resp.status == 200
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    lines = [line for line in resp.read().decode().splitlines() if line.startswith("data: {")]
    conn.close()
    first = json.loads(lines[0][len("data: ") :])
    assert len(lines) == 3
    assert headers_at < first["produced_at"]


def test_a_long_stream_to_a_client_that_falls_behind_arrives_whole_and_in_order(
    start_daemon: StartDaemon,
) -> None:
    """Chunks written at once while the client keeps up, and queued while it is behind.

    The client's receive buffer is tiny and it reads nothing for a second, so swapd's
    writes back up mid-stream and the rest waits (and pauses the backend); every event
    then arrives once, in the backend's order.
    """
    events = 20_000
    d = start_daemon({"a": fake_preset("A", "--chunks", str(events), "--chunk-interval", "0")})
    assert d.chat("a")[0] == 200
    body = json.dumps(
        {"model": "a", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(60)
    client.connect(("127.0.0.1", d.port))
    client.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (d.port, len(body), body.encode())
    )
    time.sleep(1.0)
    received = bytearray()
    while data := client.recv(1 << 16):
        received += data
    client.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert received.endswith(b"\r\n0\r\n\r\n")
    stream = _unchunked(bytes(received))
    numbers = [int(n) for n in re.findall(rb'"content": "A-(\d+)"', stream)]
    assert numbers == list(range(events))
    assert stream.endswith(b"data: [DONE]\n\n")


def _unchunked(answer: bytes) -> bytes:
    """The body of a raw chunked HTTP/1.1 answer, decoded.

    A chunk's size line can fall in the middle of an event (swapd writes what each of
    the backend's reads brought), so events are looked for in the decoded body only.
    """
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    body = bytearray()
    at = 0
    while True:
        line_end = rest.index(b"\r\n", at)
        size = int(rest[at:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(body)
        start = line_end + 2
        assert rest[start + size : start + size + 2] == b"\r\n", "a chunk not ended by CRLF"
        body += rest[start : start + size]
        at = start + size + 2


def test_a_compressed_body_reaches_the_backend_decoded_and_a_broken_one_is_400(
    start_daemon: StartDaemon,
) -> None:
    """aiohttp decodes a gzip body as it reads it: the backend gets it without the coding.

    Forwarded with ``Content-Encoding: gzip`` still on, the backend could not read it;
    a body that is not gzip after all was swapd's own 500.
    """
    d = start_daemon(
        {"echo": {"backend": "command", "cmd": [sys.executable, str(ECHO), "--port", "${PORT}"]}}
    )
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    for body, expected in ((gzip.compress(b'{"model": "echo"}'), 200), (b"not gzip", 400)):
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body, headers)
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        assert resp.status == expected, data
        if expected == 200:
            got = {base64.b64decode(k).lower() for k, _ in data["headers"]}
            assert b"content-encoding" not in got
        else:
            assert "cannot be read" in data["error"]["message"]


def test_a_client_that_stops_reading_a_stream_is_cut_after_send_timeout(
    start_daemon: StartDaemon,
) -> None:
    """A client that takes no byte for ``send_timeout`` is cut, and its lease freed.

    Nothing bounded it before: the stream's writes waited for the client for good, and the
    model kept the request in flight (its ``concurrency`` place, and no eviction).
    """
    d = start_daemon(
        {"a": fake_preset("A", "--chunks", "200000", "--chunk-interval", "0")},
        {"send_timeout": "1s"},
    )
    assert d.chat("a")[0] == 200
    body = json.dumps(
        {"model": "a", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", d.port))
    try:
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (d.port, len(body), body.encode())
        )
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        # The client reads nothing from here on.
        wait_for(lambda: d.events("request.client_stalled"), timeout=30)
        wait_for(lambda: d.model("a")["in_flight"] == 0)
        [done] = [e for e in d.events("request.done") if e.get("status") == 499]
        assert done["path"] == "/v1/chat/completions"
    finally:
        client.close()
    assert d.chat("a")[0] == 200  # the model serves on
