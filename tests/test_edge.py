"""The edge through a real swapd: timeouts, the connection cap, and hostile input.

Every connection here is to loopback; the slowloris test opens a bounded number of
them for a bounded time.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, hook_env, wait_for

ECHO = Path(__file__).resolve().parent / "fakes" / "echo_headers.py"
SLOWLORIS_CONNECTIONS = 300
# The slowloris clients stop after this long whatever happens; swapd cuts them far sooner.
SLOWLORIS_BOUND_S = 30.0


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One swapd for the module, with two-second header, body and keep-alive timeouts."""
    echo = {"backend": "command", "cmd": [sys.executable, str(ECHO), "--port", "${PORT}"]}
    settings = {
        "header_timeout": "2s",
        "body_timeout": "2s",
        "keepalive_timeout": "2s",
        "max_connections": 400,
    }
    d = Daemon(tmp_path_factory.mktemp("edge"), {"a": fake_preset("A"), "echo": echo}, settings)
    d.start()
    yield d
    assert not d.cleanup(), "processes outlived swapd"


def connect(d: Daemon) -> socket.socket:
    """A TCP connection to the daemon."""
    return socket.create_connection(("127.0.0.1", d.port), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (bounded by the socket timeout)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lower-case names) and JSON body of one raw HTTP answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def send_raw(d: Daemon, data: bytes) -> tuple[int, dict[str, str], Any]:
    """Send bytes on a fresh connection and parse the answer."""
    with connect(d) as sock:
        sock.sendall(data)
        return parse(read_all(sock))


def count(d: Daemon, event: str) -> int:
    """How many log events of this name the daemon has written."""
    return len(d.events(event))


def connections(d: Daemon) -> dict[str, Any]:
    """The daemon's connection counts from /swapd/status."""
    status, body = d.get("/swapd/status")
    assert status == 200, body
    found: dict[str, Any] = body["connections"]
    return found


def test_slowloris_is_cut_at_the_header_timeout(edge: Daemon) -> None:
    """300 clients sending headers at one byte a second are all cut, and swapd serves meanwhile."""
    request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow" + b"w" * 40
    before = connections(edge)["timed_out"]["headers"]
    socks = [connect(edge) for _ in range(SLOWLORIS_CONNECTIONS)]
    opened = time.monotonic()
    sent = [0] * len(socks)
    cut_after: dict[int, float] = {}
    served_meanwhile = []
    try:
        while len(cut_after) < len(socks) and time.monotonic() - opened < SLOWLORIS_BOUND_S:
            for i, sock in enumerate(socks):
                if i in cut_after:
                    continue
                if select.select([sock], [], [], 0)[0]:
                    cut_after[i] = time.monotonic() - opened  # EOF or reset: swapd let go
                    continue
                try:
                    sock.send(request[sent[i] : sent[i] + 1])
                    sent[i] += 1
                except OSError:
                    cut_after[i] = time.monotonic() - opened
            served_meanwhile.append(edge.get("/health")[0])
            time.sleep(1.0)
    finally:
        for sock in socks:
            sock.close()
    assert len(cut_after) == SLOWLORIS_CONNECTIONS, "some slow clients were never cut"
    assert max(sent) < len(request), "a slow client got its headers in"
    assert set(served_meanwhile) == {200}
    after = wait_for(lambda: (c := connections(edge))["open"] <= 1 and c)
    assert after["timed_out"]["headers"] - before >= SLOWLORIS_CONNECTIONS
    spans = sorted(cut_after.values())
    print(
        f"slowloris: {len(spans)} connections cut after {spans[0]:.1f}s to {spans[-1]:.1f}s "
        f"(median {spans[len(spans) // 2]:.1f}s; header_timeout 2s, polled each 1s)"
    )


def test_an_idle_keep_alive_connection_is_closed(edge: Daemon) -> None:
    """After an answer, a connection that sends nothing is closed after keepalive_timeout."""
    before = connections(edge)["timed_out"]["idle"]
    with connect(edge) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        ready, _, _ = select.select([sock], [], [], 30)
        assert ready, "the idle connection was never closed"
        assert read_all(sock) == b""
    assert connections(edge)["timed_out"]["idle"] > before


def test_a_slow_body_gets_408_and_the_connection_closes(edge: Daemon) -> None:
    """A body that stops arriving is answered 408 in the envelope after body_timeout."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    status, headers, body = send_raw(edge, head + b'{"model": "a", ')
    assert status == 408
    assert body["error"]["code"] == "body_timeout"
    assert headers["connection"] == "close"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            431,
            None,
        ),
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))
            + b"\r\n",
            431,
            None,
        ),
        (
            (
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"zz\r\nabc\r\n0\r\n\r\n"
            ),
            400,
            "malformed_http",
        ),
        (
            (
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
            "malformed_http",
        ),
    ],
    ids=["100KB-header", "10000-headers", "bad-chunk-size", "length-and-chunked"],
)
def test_http_parse_errors_are_json_and_one_log_line(
    edge: Daemon, data: bytes, status: int, code: str | None
) -> None:
    """Unparsable HTTP gets a 4xx in the JSON envelope and one log event, never a traceback."""
    before = count(edge, "http.invalid")
    got, headers, body = send_raw(edge, data)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert body["error"]["code"] == (code or "headers_too_large")
    assert "\n" not in body["error"]["message"]
    assert len(body["error"]["message"]) < 300
    wait_for(lambda: count(edge, "http.invalid") == before + 1)
    assert "Traceback" not in edge.log_path.read_text()


def test_deeply_nested_json_is_400(edge: Daemon) -> None:
    """JSON nested 5,000 levels deep is refused before parsing; 100 levels are forwarded."""
    deep = {"model": "echo", "x": json.loads("[" * 100 + "]" * 100)}
    assert edge.request("POST", "/v1/chat/completions", deep)[0] == 200
    body = b'{"model": "echo", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, _, data = send_raw(
        edge,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert (status, data["error"]["code"]) == (400, "json_too_deep")
    assert "Traceback" not in edge.log_path.read_text()


# Loaded by swapd's interpreter (``sitecustomize``): the nesting check of a body over
# 1 MiB waits until the test lets it go, as a slow parse of a huge body would.
HELD_BODY_CHECK = """
import pathlib
import time

import swapd._json

checked = swapd._json.check_depth
folder = pathlib.Path({folder!r})


def held(body):
    if len(body) > 1024 * 1024:
        (folder / "entered").touch()
        give_up = time.monotonic() + 60
        while not (folder / "release").exists() and time.monotonic() < give_up:
            time.sleep(0.01)
    return checked(body)


swapd._json.check_depth = held
"""


def test_a_large_body_is_read_for_its_model_off_the_event_loop(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """While a 2 MiB body is checked and read for its model, swapd answers other requests.

    Those steps ran on the event loop: a 60 MiB chat took 0.25 s, and a body whose model
    lies far from both ends is parsed whole, during which nobody else was served.
    """
    hook = tmp_path / "hook"
    d = start_daemon(
        {"a": fake_preset("A")}, env=hook_env(hook, HELD_BODY_CHECK.format(folder=str(hook)))
    )
    big = {"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}], "model": "a"}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(d.request, "POST", "/v1/chat/completions", big)
        try:
            wait_for((hook / "entered").exists)
            # A loop held by the check would not answer until the hook gave up.
            assert d.request("GET", "/health", timeout=20)[0] == 200
        finally:
            (hook / "release").touch()
        assert pending.result()[0] == 200


def test_header_bytes_outside_latin1_are_forwarded_unchanged(edge: Daemon) -> None:
    """Header values that are not Latin-1, or not even UTF-8, reach the backend byte for byte."""
    body = b'{"model": "echo"}'
    status, _, data = send_raw(
        edge,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"X-Utf8: \xe2\x9c\x93\r\nX-Bytes: \xff\xfe\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert status == 200, data
    got = {base64.b64decode(k): base64.b64decode(v) for k, v in data["headers"]}
    assert got[b"X-Utf8"] == b"\xe2\x9c\x93"
    assert got[b"X-Bytes"] == b"\xff\xfe"


def test_a_request_id_must_be_a_plain_token(edge: Daemon) -> None:
    """A client's X-Request-Id is echoed when it is visible ASCII, refused (400) otherwise."""
    head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    status, headers, _ = send_raw(edge, head + b"X-Request-Id: trace-42\r\n\r\n")
    assert (status, headers["x-request-id"]) == (200, "trace-42")
    status, headers, body = send_raw(edge, head + b"X-Request-Id: \xe2\x9c\x93\r\n\r\n")
    assert status == 400
    assert "X-Request-Id" in body["error"]["message"]
    assert headers["x-request-id"].isascii()


def test_long_model_names_are_cut_in_errors_and_logs(edge: Daemon) -> None:
    """A 1 MB model name is not echoed whole: the 404 and its log line stay short."""
    name = "m" * 1_000_000
    status, body = edge.request("POST", "/v1/chat/completions", {"model": name, "messages": []})
    assert status == 404
    assert len(body["error"]["message"]) < 400
    assert "999880 more characters" in body["error"]["message"]
    # Logged once the answer is out, maybe after it arrived.
    done = wait_for(lambda: [e for e in edge.events("request.done") if e["status"] == 404])
    assert len(json.dumps(done[-1])) < 1000


def test_content_types_stay_lenient(edge: Daemon) -> None:
    """`curl -d` sends form encoding; without an Origin the JSON body is still served."""
    body = b'{"model": "echo"}'
    status, _, _ = send_raw(
        edge,
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert status == 200


def _answered_or_closed(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _probe(d: Daemon) -> tuple[int, dict[str, str], Any]:
    return send_raw(d, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")


def test_connections_over_the_cap_are_refused_with_503(start_daemon: StartDaemon) -> None:
    """With max_connections held open, the next connection gets 503; a freed slot serves again."""
    d = start_daemon({"a": fake_preset("A")}, {"max_connections": 4, "header_timeout": "60s"})
    held: list[socket.socket] = []

    def refused() -> dict[str, Any] | None:
        # Top up to four held connections (dropping any swapd refused), then try a fifth.
        for sock in [s for s in held if _answered_or_closed(s)]:
            held.remove(sock)
            sock.close()
        while len(held) < 4:
            sock = connect(d)
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # headers never finished
            held.append(sock)
        status, headers, body = _probe(d)
        return {"headers": headers, "body": body} if status == 503 else None

    try:
        answer = wait_for(refused)
        assert answer["body"]["error"]["code"] == "too_many_connections"
        assert answer["headers"]["retry-after"] == "1"
        held.pop().close()
        wait_for(lambda: _probe(d)[0] == 200)
    finally:
        for sock in held:
            sock.close()
    assert d.events("connection.refused")
    near = d.events("connection.limit.near")
    assert near
    assert near[0]["max_connections"] == 4


def test_the_cap_is_lowered_to_fit_the_descriptor_limit() -> None:
    """Under a 600-descriptor limit, 1,024 connections (two descriptors each) are cut to 172."""
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))\n"
        "from swapd.logs import configure\n"
        "configure('info', json=True)\n"
        "from swapd.limits import fit_fd_limit\n"
        "print(fit_fd_limit(1024))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    warning = json.loads(out[0])
    assert warning["event"] == "connection.limit.lowered"
    assert (warning["lowered_to"], warning["fd_limit"]) == (172, 600)
    assert out[1] == "(172, 600)"


def test_at_the_cap_the_longest_idle_connection_makes_room(start_daemon: StartDaemon) -> None:
    """Kept-alive connections that only wait do not lock a new client out.

    A client that sent one request on each of max_connections connections and kept them
    open held every slot for keepalive_timeout (75 s); the idlest is now closed instead.
    """
    d = start_daemon({"a": fake_preset("A")}, {"max_connections": 4, "header_timeout": "60s"})
    held = []
    try:
        for _ in range(4):
            sock = connect(d)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b" 200 " in sock.recv(65536)  # answered, and kept alive
            held.append(sock)
        status, _, _ = _probe(d)
        assert status == 200
        assert connections(d)["closed_for_room"] >= 1
        wait_for(lambda: any(_answered_or_closed(sock) and not sock.recv(1) for sock in held))
    finally:
        for sock in held:
            sock.close()
    assert d.events("connection.made_room")


def test_headers_past_64_kib_in_all_are_431_and_a_large_body_is_not_counted(
    start_daemon: StartDaemon,
) -> None:
    """Header lines within aiohttp's caps (8 KiB, 128 lines) but 100 KiB in all: 431.

    Without a cap on the whole, each connection could hold a megabyte of unfinished
    headers for header_timeout. A body sent in the same write as its headers does not
    count toward the cap.
    """
    d = start_daemon({"a": fake_preset("A")})
    sock = connect(d)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for i in range(20):
        sock.sendall(b"X-Filler-%d: %s\r\n" % (i, b"x" * 5000))
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "headers_too_large"
    body = json.dumps({"model": "a", "prompt": "x" * (1 << 20)}).encode()
    sock = connect(d)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


# Loaded into the daemon: when the trigger file appears, count the connection handlers
# still alive after a full collection and write the number beside it.
_HANDLER_COUNT_HOOK = """
import gc, os, sys, threading, time
def _count_on_request():
    trigger = os.environ["SWAPD_TEST_COUNT_TRIGGER"]
    while True:
        time.sleep(0.1)
        if os.path.exists(trigger) and sys.argv[1:2] == ["serve"]:
            os.remove(trigger)
            gc.collect()
            alive = sum(1 for o in gc.get_objects() if type(o).__name__ == "EdgeHandler")
            with open(trigger + ".count", "w") as fh:
                fh.write(str(alive))
threading.Thread(target=_count_on_request, daemon=True).start()
"""
LEFT_CONNECTIONS = 60


def test_a_connection_the_client_left_keeps_no_state(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A connection its client closed mid-answer leaves nothing behind in swapd.

    Streams the client hung up on, and ``/swapd/events`` subscribers that went away, ended
    their handler after the connection was gone; the keep-alive timer armed then held each
    connection's handler, its buffers and its request for ``keepalive_timeout`` (75 s).
    """
    trigger = tmp_path / "count"
    env = hook_env(tmp_path / "hook", _HANDLER_COUNT_HOOK)
    env["SWAPD_TEST_COUNT_TRIGGER"] = str(trigger)
    stream = ("--chunks", "50", "--chunk-interval", "0.05")
    d = start_daemon({"a": fake_preset("A", *stream)}, env=env)
    chat = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    body = json.dumps(chat)
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    events = b"GET /swapd/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for i in range(LEFT_CONNECTIONS):
        with connect(d) as sock:
            sock.sendall(request if i % 2 else events)
            assert sock.recv(100).startswith(b"HTTP/1.1 200")  # answering: then the hang-up
    wait_for(lambda: d.model("a")["in_flight"] == 0 and connections(d)["open"] <= 1)
    trigger.touch()
    counted = trigger.with_name("count.count")
    alive = int(wait_for(lambda: counted.exists() and counted.read_text()))
    # The status polls above may still be closing; the hung-up ones must all be gone.
    assert alive <= 2, f"{alive} connection handlers outlived {LEFT_CONNECTIONS} connections"
