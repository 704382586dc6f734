"""The model scan, large-body reads, cold-stream pings and absolute-form targets on /upstream/."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, fake_stats, wait_for

from swapd.keepalive import PING_AFTER, PING_EVERY
from swapd.proxy import WORKER_BODY, LargeBodies, model_from_json

# --------------------------------------------------------------------- 1. the model scan


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "\\"model": "b"}',  # a second key that is the string "model (quote first)
        b'{"model": "a", "\\\\\\"model": "b", "messages": []}',  # key \"model
    ],
)
def test_a_key_that_starts_with_an_escaped_quote_is_not_the_model(body: bytes) -> None:
    """The scan named "b", a key json.loads (and every backend) reads as '"model'."""
    assert json.loads(body)["model"] == "a"
    assert model_from_json(body) == "a"


def test_such_a_body_is_routed_by_the_model_its_backend_reads(start_daemon: StartDaemon) -> None:
    """End to end: the body says model a; swapd sent it to b's backend."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    body = b'{"model": "a", "\\"model": "b", "messages": [{"role": "user", "content": "x"}]}'
    assert json.loads(body)["model"] == "a"
    s = socket.create_connection(("127.0.0.1", d.port), timeout=60)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    raw = b""
    while more := s.recv(65536):
        raw += more
    s.close()
    answer = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert answer["choices"][0]["message"]["content"] == "A: x"  # was "B: x"


# ------------------------------------------------------ 2. one large parse at a time


@pytest.mark.asyncio
async def test_a_cancelled_large_read_still_holds_the_next_one_back() -> None:
    """A client that hangs up mid-parse must not let the next large parse run beside it.

    The worker thread cannot be stopped: before, the lock went with the cancelled
    request, so N hang-ups ran N parses (1.8 GiB each for a hostile 64 MiB body) at once.
    """
    bodies = LargeBodies()
    entered = {b"1": threading.Event(), b"2": threading.Event()}
    release = threading.Event()

    def slow(body: bytes) -> bytes:
        entered[body[:1]].set()
        release.wait(30)
        return body[:1]

    first = asyncio.create_task(bodies.read(b"1" * (WORKER_BODY + 1), slow))
    assert await asyncio.to_thread(entered[b"1"].wait, 10)
    first.cancel()  # aiohttp cancels the handler when its client hangs up
    await asyncio.gather(first, return_exceptions=True)
    second = asyncio.create_task(bodies.read(b"2" * (WORKER_BODY + 1), slow))
    try:
        # The first parse still runs: the second must not have started (bounded wait).
        overlapped = await asyncio.to_thread(entered[b"2"].wait, 2.0)
    finally:
        release.set()
    assert await asyncio.wait_for(second, 30) == b"2"
    assert not overlapped


# --------------------------------------------- 3. pings until the backend answers


def test_pings_go_on_until_the_backends_headers(start_daemon: StartDaemon) -> None:
    """Once pings began, the stream stays alive while the backend reads the prompt.

    llama-server sends its headers only with the first token: a long prompt after a
    cold load left the stream silent (Nginx's 60 s) although pings had started.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", str(PING_AFTER + 0.5))})
    hold = 3 * PING_EVERY  # the backend's time before its headers
    payload = {"model": "a", "stream": True, "fake_delay": hold, "messages": []}
    body = json.dumps(payload).encode()
    s = socket.create_connection(("127.0.0.1", d.port), timeout=60)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    got = b""
    while b": loading" not in got:
        more = s.recv(65536)
        assert more, got
        got += more
    port = wait_for(lambda: d.model("a")["port"], timeout=30)
    wait_for(lambda: fake_stats(port)["in_flight"] == 1, timeout=30)  # backend holds it
    s.setblocking(False)  # noqa: FBT003
    try:  # what went out before the backend had the request
        while s.recv(65536):
            pass
    except BlockingIOError:
        pass
    s.setblocking(True)  # noqa: FBT003
    s.settimeout(60)
    after = b""
    while b": loading" not in after and b"data:" not in after:
        more = s.recv(65536)
        assert more, after
        after += more
    s.close()
    assert b": loading" in after.split(b"data:")[0], after[:200]


# ------------------------------------------------- 4. /upstream/ in absolute form


def test_the_passthrough_takes_an_absolute_form_target(start_daemon: StartDaemon) -> None:
    """RFC 9112 3.2.2: a server MUST accept ``GET http://host/path``; /v1/ routes do.

    /upstream/ read the model from the raw target: 404 for model '.0.0.1:PORT'.
    """
    d: Daemon = start_daemon({"a": fake_preset("A")})
    s = socket.create_connection(("127.0.0.1", d.port), timeout=60)
    host = b"127.0.0.1:%d" % d.port
    s.sendall(
        b"GET http://"
        + host
        + b"/upstream/a/props?n=1 HTTP/1.1\r\nHost: "
        + host
        + b"\r\nConnection: close\r\n\r\n"
    )
    raw = b""
    while more := s.recv(65536):
        raw += more
    s.close()
    head, _, answer = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[-300:]
    assert json.loads(answer) == {"name": "A", "path": "/props", "query": "n=1"}
