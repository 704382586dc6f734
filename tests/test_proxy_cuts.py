"""A backend that breaks its answer after the 200: what the client sees, what swapd logs."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import sys
from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import Daemon, wait_for

from swapd.keepalive import PING_AFTER

RAW = Path(__file__).resolve().parent / "fakes" / "raw_backend.py"


def _preset(*extra: str, **keys: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(RAW), "--port", "${PORT}", *extra]
    return {"backend": "command", "cmd": cmd, **keys}


def _post(d: Daemon, mode: str, *, stream: bool = False) -> tuple[int, bytes, bool]:
    """Status, the body as far as it came, and whether it came whole."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    body = json.dumps({"model": "r", "mode": mode, "stream": stream})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        resp = conn.getresponse()
        try:
            return resp.status, resp.read(), True
        except http.client.IncompleteRead as exc:
            return resp.status, exc.partial, False
    finally:
        conn.close()


def _error_after_pings(d: Daemon, mode: str) -> dict[str, Any]:
    """A stream sent while the model loads: pings, then the one error event it ends with."""
    status, body, whole = _post(d, mode, stream=True)
    assert (status, whole) == (200, True)
    assert body.startswith(b": loading")
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert len(events) == 1
    error: dict[str, Any] = json.loads(events[0][len(b"data: ") :])["error"]
    return error


def _logged(d: Daemon) -> list[int]:
    return [e["status"] for e in d.events("request.done")]


def test_an_answer_the_backend_cuts_short_is_logged_as_a_failure(
    start_daemon: StartDaemon,
) -> None:
    """A sized answer the backend cuts short is logged as 502, not 200.

    2 MiB announced, 100 bytes sent: the client's answer is cut (its 200 went out), and
    the log says it failed (before, it counted as a success).
    """
    d = start_daemon({"r": _preset()})
    status, _, whole = _post(d, "cut_sized")
    assert (status, whole) == (200, False)
    wait_for(lambda: _logged(d))
    assert _logged(d) == [502]
    assert d.model("r")["in_flight"] == 0


def test_a_stream_closed_after_its_headers_is_answered_502_in_the_envelope(
    start_daemon: StartDaemon,
) -> None:
    """A backend that closes right after its SSE headers: the client gets a 502 it can read.

    The relayed headers wait for the first chunk, so none of the answer has gone out when
    the backend closes. Before, the client found the connection closed with no status
    (an empty reply); now it gets the envelope, with its request id and CORS headers,
    and the log says 502.
    """
    d = start_daemon({"r": _preset()}, {"cors_origins": ["https://app.example"]})
    assert _post(d, "ok")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=20)
    body = json.dumps({"model": "r", "mode": "close_after_headers", "stream": True})
    headers = {
        "Content-Type": "application/json",
        "X-Request-Id": "cut-1",
        "Origin": "https://app.example",
    }
    conn.request("POST", "/v1/chat/completions", body, headers)
    resp = conn.getresponse()
    error = json.loads(resp.read())["error"]
    conn.close()
    assert resp.status == 502
    assert resp.getheader("X-Request-Id") == "cut-1"
    assert resp.getheader("Access-Control-Allow-Origin") == "https://app.example"
    assert resp.getheader("Content-Type") == "application/json; charset=utf-8"
    assert error["code"] == "backend_gone"
    assert error["message"].startswith("backend for 'r' failed while serving: ")
    wait_for(lambda: len(_logged(d)) == 2)
    assert _logged(d) == [200, 502]
    assert _post(d, "ok")[0] == 200
    assert d.model("r")["in_flight"] == 0


def test_a_request_timeout_while_the_headers_wait_is_answered_504_in_the_envelope(
    start_daemon: StartDaemon,
) -> None:
    """``request_timeout`` fires after the backend's headers, before its first chunk.

    The backend answers its headers at 0.97 s of a 1 s limit: the held headers would go
    out at 1.02 s at the soonest, so none of the answer has when the limit strikes.
    Before, the client found the connection closed with no status; now it gets the
    504 envelope that a limit struck before the headers gives.
    """
    d = start_daemon({"r": _preset(request_timeout="1s")})
    assert _post(d, "ok")[0] == 200
    status, body, whole = _post(d, "late_headers", stream=True)
    assert (status, whole) == (504, True)
    assert json.loads(body)["error"]["code"] == "request_timeout"
    wait_for(lambda: len(_logged(d)) == 2)
    assert _logged(d) == [200, 504]
    assert d.model("r")["in_flight"] == 0


def _events_then_cut(d: Daemon, mode: str) -> list[bytes]:
    """A stream of a ready model that swapd cuts: the events that reached the client."""
    assert _post(d, "ok")[0] == 200  # ready: no pings, the backend's own 200
    status, body, whole = _post(d, mode, stream=True)
    assert (status, whole) == (200, False)
    return [e for e in body.split(b"\n\n") if e]


def _error_of(event: bytes) -> dict[str, Any]:
    assert event.startswith(b"data: ")
    error: dict[str, Any] = json.loads(event[len(b"data: ") :])["error"]
    return error


def test_a_stream_its_backend_cuts_midway_says_why_before_the_cut(
    start_daemon: StartDaemon,
) -> None:
    """One event, half the next, then the backend closes: an error event, then the cut.

    The 200 went out with the first event; the half event is ended by a blank line, so
    the error is an event of its own (SDKs raise its message), and the connection is
    still cut rather than ended, so no client takes the answer for whole.
    """
    d = start_daemon({"r": _preset()})
    events = _events_then_cut(d, "cut_mid_stream")
    assert events[0] == b'data: {"n": 1}'
    assert events[1] == b'data: {"n": '
    assert _error_of(events[2])["code"] == "backend_gone"
    assert len(events) == 3
    wait_for(lambda: len(_logged(d)) == 2)
    assert _logged(d) == [200, 502]


def test_a_request_timeout_midway_through_a_stream_says_so_before_the_cut(
    start_daemon: StartDaemon,
) -> None:
    """request_timeout on a stream that has begun: a request_timeout event, then the cut."""
    d = start_daemon({"r": _preset(request_timeout="1s")})
    events = _events_then_cut(d, "stall_partial")
    assert [_error_of(e)["code"] for e in events[1:]] == ["request_timeout"]
    wait_for(lambda: len(_logged(d)) == 2)
    assert _logged(d) == [200, 504]


def test_a_stream_cut_after_pings_ends_with_one_error_event(start_daemon: StartDaemon) -> None:
    """After pings, a backend that fails right after its headers is one error event.

    The stream then ends whole (before, it was cut with no event).
    """
    d = start_daemon({"r": _preset("--start-delay", str(PING_AFTER + 2))})
    assert _error_after_pings(d, "close_after_headers")["code"] == "backend_gone"
    wait_for(lambda: _logged(d))  # logged once the answer has ended, maybe after it arrived
    assert _logged(d) == [502]


def test_an_error_event_after_a_stalled_partial_event_is_an_event_of_its_own(
    start_daemon: StartDaemon,
) -> None:
    """A timeout's error event after a half-sent event is an event of its own.

    request_timeout on a ping stream whose backend stalled mid-event: the error event
    starts after a blank line, so an SSE client reads it (before, it was glued onto the
    unfinished line).
    """
    slow = str(PING_AFTER + 2)
    d = start_daemon({"r": _preset("--start-delay", slow, request_timeout="2s")})
    status, body, whole = _post(d, "stall_partial", stream=True)
    assert (status, whole) == (200, True)
    lines = body.decode().split("\n")
    errors = [line for line in lines if line.startswith('data: {"error"')]
    assert len(errors) == 1
    assert json.loads(errors[0][len("data: ") :])["error"]["code"] == "request_timeout"


def test_an_error_whose_text_never_ends_is_answered(start_daemon: StartDaemon) -> None:
    """A chunked HTML 500 that stops midway is a 500 in the envelope, not a hang.

    No ``request_timeout``: before, swapd waited for the rest of the text (the envelope
    needs it) for as long as the client did, and the client saw no status at all.
    """
    d = start_daemon({"r": _preset()})
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=20)
    body = json.dumps({"model": "r", "mode": "stall_error"})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    error = json.loads(resp.read())["error"]
    conn.close()
    assert (resp.status, error["code"]) == (500, "backend_error")
    assert error["message"] == "backend for 'r' answered 500: <html><body>the backend broke"
    assert _post(d, "ok")[0] == 200
    assert d.model("r")["in_flight"] == 0


def test_a_timeout_after_pings_to_a_client_that_stopped_reading_is_logged_as_one(
    start_daemon: StartDaemon,
) -> None:
    """``request_timeout`` on a ping stream whose client reads nothing while the backend floods.

    The timeout cut swapd's wait for the client short; ending the stream then waited on
    the same client again, which aiohttp failed at once as cancelled: the request was
    logged and counted as a client that hung up (499), not as its timeout (504). A client
    that is behind gets the error event without a wait, and the connection is closed
    after it, as on a ready model's stream.
    """
    slow = str(PING_AFTER + 2)
    d = start_daemon({"r": _preset("--start-delay", slow, request_timeout="2s")})
    body = json.dumps({"model": "r", "mode": "flood", "stream": True}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # falls behind at once
    client.connect(("127.0.0.1", d.port))
    client.settimeout(60)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
    client.sendall(head % len(body) + b"\r\n" + body)
    got = b""
    while b": loading" not in got:
        more = client.recv(4096)
        assert more, got
        got += more
    wait_for(lambda: _logged(d), timeout=60)  # read nothing more until the request is done
    assert _logged(d) == [504]
    assert d.model("r")["in_flight"] == 0
    while more := client.recv(1 << 20):
        got += more
    client.close()
    errors = [line for line in got.split(b"\n") if line.startswith(b'data: {"error"')]
    assert [_error_of(e)["code"] for e in errors] == ["request_timeout"]


def test_after_pings_an_error_whose_text_never_ends_is_one_error_event(
    start_daemon: StartDaemon,
) -> None:
    """A stream that waited for a load, answered with an HTML 500 that stops midway.

    No ``request_timeout``: before, swapd read the error's text whole and the stream hung
    after its pings for as long as the client waited.
    """
    d = start_daemon({"r": _preset("--start-delay", str(PING_AFTER + 2))})
    error = _error_after_pings(d, "stall_error")
    assert error["code"] == "backend_error"
    assert error["message"] == "backend answered 500: <html><body>the backend broke"
    assert _post(d, "ok")[0] == 200
    assert d.model("r")["in_flight"] == 0


def test_after_pings_an_error_nested_too_deep_to_parse_is_one_error_event(
    start_daemon: StartDaemon,
) -> None:
    """A stream that waited for a load, answered with a JSON 500 nested 5,000 deep.

    Before, reading the backend's error object raised RecursionError out of the ping
    stream: swapd wrote a 500 answer's headers into the stream its pings had opened.
    Now the text is the message of one error event, as for any error that is not an
    error object.
    """
    d = start_daemon({"r": _preset("--start-delay", str(PING_AFTER + 2))})
    error = _error_after_pings(d, "deep_error")
    assert error["code"] == "backend_error"
    assert error["message"].startswith("backend answered 500: [[[")
    wait_for(lambda: _logged(d))
    assert _logged(d) == [500]
    assert d.model("r")["in_flight"] == 0


def test_a_status_below_100_is_a_502_not_relayed(start_daemon: StartDaemon) -> None:
    """A backend's ``HTTP/1.1 000``: a 502 in the envelope, logged as a failure.

    The parser takes any three digits. Before, swapd relayed the status as it was, and
    the client read ``HTTP/1.1 0`` (no status line HTTP allows), logged as a success.
    """
    d = start_daemon({"r": _preset()})
    status, body, whole = _post(d, "status_000")
    assert (status, whole) == (502, True)
    error = json.loads(body)["error"]
    assert error["code"] == "backend_gone"
    assert "status 000" in error["message"]
    wait_for(lambda: _logged(d))
    assert _logged(d) == [502]
    assert _post(d, "ok")[0] == 200


def test_a_compressed_error_text_is_read_decompressed(start_daemon: StartDaemon) -> None:
    """An HTML 500 in gzip (a server that compresses its answers): its words in the message.

    Before, the envelope's message (and after pings, the error event's) held the gzip
    bytes as replacement characters. ``/upstream/`` passes it on compressed, as sent.
    """
    d = start_daemon({"r": _preset("--start-delay", str(PING_AFTER + 2))})
    error = _error_after_pings(d, "gzip_error")
    assert error["code"] == "backend_error"
    assert error["message"].startswith("backend answered 500: <html><body>the backend broke ")
    status, body, whole = _post(d, "gzip_error")
    assert (status, whole) == (500, True)
    error = json.loads(body)["error"]
    assert (error["code"], error["message"]) == (
        "backend_error",
        "backend for 'r' answered 500: <html><body>the backend broke </body></html>",
    )
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=20)
    conn.request("POST", "/upstream/r/x", json.dumps({"mode": "gzip_error"}))
    resp = conn.getresponse()
    assert resp.getheader("Content-Encoding") == "gzip"
    assert b"the backend broke" in gzip.decompress(resp.read())
    conn.close()
