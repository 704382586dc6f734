"""Hostile input at the edge: the header cap's corners, Expect, forms, keys, fragments, encodings.

Each test was written against a way through or around the edge's rules; its docstring says
what the older code did.
"""

from __future__ import annotations

import gzip
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, fake_preset, wait_for
from test_edge import connect, read_all

from swapd.auth import presented_keys
from swapd.config import load_config
from swapd.errors import ConfigErrors
from swapd.keys import KeyRing
from swapd.limits import HEADER_BYTES_MAX

ECHO = Path(__file__).resolve().parent / "fakes" / "echo_headers.py"
INFERENCE_KEY = "inference-key-0123456789"
ADMIN_KEY = "admin-key-0123456789abcdef"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One swapd without keys (the local default), with the fake and the echo backend."""
    echo = {"backend": "command", "cmd": [sys.executable, str(ECHO), "--port", "${PORT}"]}
    d = Daemon(tmp_path_factory.mktemp("hostile"), {"a": fake_preset("A"), "echo": echo})
    d.start()
    yield d
    assert not d.cleanup(), "processes outlived swapd"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One swapd with an inference and an admin key."""
    settings = {"api_keys": [INFERENCE_KEY], "admin_keys": [ADMIN_KEY]}
    d = Daemon(tmp_path_factory.mktemp("hostile-keyed"), {"a": fake_preset("A")}, settings)
    d.start()
    yield d
    assert not d.cleanup(), "processes outlived swapd"


def answers(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every HTTP answer in ``raw`` (interim 1xx ones too): status, headers, body."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", "0"))
        found.append((int(lines[0].split()[1]), headers, rest[:size]))
        raw = rest[size:]
    return found


def send_raw(d: Daemon, data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send bytes on a fresh connection; every answer until swapd closes it."""
    with connect(d) as sock:
        sock.sendall(data)
        return answers(read_all(sock))


def test_the_read_that_ends_the_headers_counts_toward_the_64_kib_cap(plain: Daemon) -> None:
    """Header lines past 64 KiB in all are 431, also when the last read holds the blank line.

    ``EdgeHandler._headers_too_large`` stops counting as soon as a read contains the
    blank line, without adding that read's bytes: 60 KB of header lines, then one more
    8 KB line with the blank line in the next send, is 68 KB of headers, served 200.
    """
    with connect(plain) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 5000) for i in range(12))
        )
        sock.sendall(b"X-Last: " + b"y" * 8000 + b"\r\n\r\n")
        got = answers(read_all(sock))
    head_bytes = 12 * (len(b"X-Filler-00: \r\n") + 5000) + 8000
    assert head_bytes > HEADER_BYTES_MAX
    assert [status for status, _, _ in got] == [431]


def test_a_pipelined_request_with_a_large_body_is_served(plain: Daemon) -> None:
    """The cap counts the pipelined request's head, not its body (200 KB here)."""

    def chat(delay: float, text: str) -> bytes:
        body = json.dumps(
            {"model": "a", "messages": [{"role": "user", "content": text}], "fake_delay": delay}
        ).encode()
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    last = chat(0, "x" * 200_000).replace(b"Host:", b"Connection: close\r\nHost:", 1)
    got = send_raw(plain, chat(1, "hi") + last)
    assert [status for status, _, _ in got] == [200, 200]


def _chat(delay: float, text: str, *, close: bool = False) -> bytes:
    body = json.dumps(
        {"model": "a", "messages": [{"role": "user", "content": text}], "fake_delay": delay}
    ).encode()
    extra = b"Connection: close\r\n" if close else b""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + extra
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def test_pipelined_post_whose_body_comes_after_the_running_request_started(plain: Daemon) -> None:
    """The pipelined request's head comes with the first one, its 200 KB body a moment later.

    The body is counted as no head (a version of the pipelined head count did: a false 431).
    """
    # warm the model so the first request runs for its fake_delay only
    with connect(plain) as sock:
        sock.sendall(_chat(0, "warm", close=True))
        assert answers(read_all(sock))[0][0] == 200
    second = _chat(0, "x" * 200_000, close=True)
    with connect(plain) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_chat(1.5, "hi") + second[:2000])
        time.sleep(0.5)  # the first request's handler is running now
        sock.sendall(second[2000:])
        got = answers(read_all(sock))
    assert [status for status, _, _ in got] == [200, 200], got


def test_pipelined_post_behind_a_post_whose_body_ends_mid_read(plain: Daemon) -> None:
    """One read holds the end of the running request's body and the next request's head.

    The pipelined request's body in the reads after it is no head either.
    """
    with connect(plain) as sock:
        sock.sendall(_chat(0, "warm", close=True))
        assert answers(read_all(sock))[0][0] == 200
    first = _chat(1.5, "y" * 50_000)
    second = _chat(0, "x" * 200_000, close=True)
    with connect(plain) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(first[:-100])
        time.sleep(0.5)  # the first handler runs and waits for the end of its body
        sock.sendall(first[-100:] + second[:2000])
        time.sleep(0.3)
        sock.sendall(second[2000:])
        got = answers(read_all(sock))
    assert [status for status, _, _ in got] == [200, 200], [g[0] for g in got]


def test_a_chunked_body_in_tiny_chunks_is_no_head(plain: Daemon) -> None:
    """A chunked upload's framing (here 5 bytes a byte, 150 KB in all) counts as no head."""
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "z" * 30_000}]})
    chunks = b"".join(b"1\r\n%s\r\n" % bytes([c]) for c in body.encode())
    got = send_raw(
        plain,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n",
    )
    assert [status for status, _, _ in got] == [200]


def test_an_unknown_expectation_is_ignored_and_the_request_served(plain: Daemon) -> None:
    """``Expect: bogus`` was a text/plain 417 from aiohttp, outside the envelope.

    RFC 9110 lets a server ignore an expectation it does not know: the request is served,
    in the envelope, with its request id.
    """
    body = b'{"model": "a", "messages": []}'
    got = send_raw(
        plain,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Expect: bogus\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    status, headers, raw = got[-1]
    assert status == 200, raw
    assert "x-request-id" in headers, headers
    assert headers["content-type"].startswith("application/json"), raw


def test_an_accepted_body_is_asked_for_with_100_continue(plain: Daemon) -> None:
    """A request that passes the checks gets its 100 Continue once the body is wanted."""
    body = b'{"model": "a", "messages": []}'
    with connect(plain) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), first
        sock.sendall(body)
        got = answers(first + read_all(sock))
    assert [status for status, _, _ in got] == [100, 200]


@pytest.mark.parametrize(
    ("extra", "status"),
    [(b"", 401), (b"Authorization: Bearer " + INFERENCE_KEY.encode() + b"\r\n", 413)],
    ids=["no-key", "over-max-body"],
)
def test_a_refused_request_is_not_told_to_send_its_body(
    keyed: Daemon, extra: bytes, status: int
) -> None:
    """``Expect: 100-continue`` is answered with the refusal, not with 100 Continue first.

    aiohttp's expect handler runs before the middleware: the client is invited to upload
    a gigabyte that the key check (401) or ``max_body`` (413) refuses anyway.
    """
    with connect(keyed) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1000000000\r\n" + extra + b"\r\n"
        )
        first = sock.recv(65536)
    assert first.split(b"\r\n", 1)[0].split()[1] == str(status).encode(), first[:200]


def test_a_multipart_boundary_that_is_not_utf8_is_a_400(plain: Daemon) -> None:
    r"""A boundary with a byte that is not UTF-8 is refused as a bad form, not a 500.

    aiohttp decodes header values with surrogateescape; ``model_from_multipart`` encodes
    the boundary with strict UTF-8 and the UnicodeEncodeError becomes ``internal_error``.
    """
    got = send_raw(
        plain,
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=\xff\r\nContent-Length: 2\r\n\r\nxx",
    )
    status, _, raw = got[0]
    assert status == 400, raw
    assert "Traceback" not in plain.log_path.read_text()


def test_a_key_with_a_trailing_newline_is_refused_where_it_is_written(tmp_path: Path) -> None:
    r"""A YAML block scalar (``- |``) gives ``"sk-abc\n"``, a key no header can carry.

    ``keys._KEY`` ends in ``$``, which also matches before a final newline, so the key
    passes the "visible ASCII, no spaces" rule; its digest then matches nothing a
    client can send (header values are stripped), and access is locked out with no
    error at start or in ``swapd check``.
    """
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "m.yaml").write_text('backend: command\ncmd: ["true", "${PORT}"]\n')
    path = tmp_path / "swapd.yaml"
    path.write_text("api_keys:\n  - |\n    sk-abc-0123456789\n")
    try:
        config = load_config(path)
    except ConfigErrors:
        return  # refused where it is written: what the docs promise
    assert config.api_keys == ("sk-abc-0123456789\n",)  # loaded as written...
    # ...and the key, as any client sends it, is not one swapd knows.
    ring = KeyRing.of(config.api_keys, ())
    (key,) = presented_keys({"Authorization": "Bearer sk-abc-0123456789"})
    assert ring.role(key) is not None


def test_a_fragment_after_the_query_is_refused_on_the_passthrough(plain: Daemon) -> None:
    """README: on ``/upstream/`` "a ``#`` is refused (400)"; after a ``?`` it is forwarded.

    ``backend_path`` checks only the path; the query is split off first, so
    ``/upstream/echo/x?a#b`` reaches the backend as ``/x?a#b``.
    """
    got = send_raw(
        plain,
        b"POST /upstream/echo/x?a#b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Length: 0\r\n\r\n",
    )
    status, _, raw = got[0]
    assert status == 400, raw


def test_two_content_encodings_are_refused(plain: Daemon) -> None:
    """Two ``Content-Encoding`` headers: aiohttp decoded by the last, swapd asked the first.

    With ``identity`` then ``gzip`` the decoded body went on still labelled gzip, and the
    backend tried to gunzip plain JSON. One coding or none is all swapd takes.
    """
    body = gzip.compress(b'{"model": "echo"}')
    spawned = len(plain.events("backend.spawn"))
    got = send_raw(
        plain,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    status, _, raw = got[0]
    assert status == 400, raw
    assert "Content-Encoding" in json.loads(raw)["error"]["message"]
    assert len(plain.events("backend.spawn")) == spawned  # refused before any load


def test_a_large_body_right_behind_its_head_is_no_head(plain: Daemon) -> None:
    """8 MiB of body in the reads after its head: none of it counts toward the header cap.

    A version of the pipelined count took the reads that came before the handler started
    (no body known yet) for a pipelined head: the request was refused, then timed out (408).
    """
    prompt = "x" * (8 * 1024 * 1024)
    body = json.dumps({"model": "a", "prompt": prompt}).encode()
    got = send_raw(
        plain,
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert [status for status, _, _ in got] == [200]


def test_a_body_that_does_not_decode_is_a_400_and_one_log_line(plain: Daemon) -> None:
    """``Content-Encoding: gzip`` over a body that is not gzip: a 400, and no traceback.

    The 400 was right, but then aiohttp read the rest of the body away, met the same error
    again and logged it as an "Unhandled exception" with a multi-line traceback, once per
    such request.
    """
    before = plain.log_path.read_text().count("Traceback")
    unhandled = len(plain.events("Unhandled exception"))
    body = b'{"model": "echo"}'
    got = send_raw(
        plain,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    status, _, raw = got[0]
    assert status == 400, raw
    message = json.loads(raw)["error"]["message"]
    assert "cannot be read" in message
    assert "400, message" not in message  # aiohttp's own rendering of its exception
    assert "\n" not in message
    assert plain.log_path.read_text().count("Traceback") == before
    assert len(plain.events("Unhandled exception")) == unhandled


def test_a_bad_chunk_size_after_the_first_chunks_is_a_400_at_once(plain: Daemon) -> None:
    """A broken chunk size in a later read of the body: a 400, not a wait for more body.

    aiohttp queued the parse error as the next request's and left the running request's body
    waiting for bytes the broken stream would never bring: the client got no answer until
    ``body_timeout`` (120 s by default) and then a 408 that blamed its speed.
    """
    body = b'{"model": "echo"}'
    with connect(plain) as sock:
        sock.settimeout(20)  # well short of body_timeout
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(body), body)
        )
        time.sleep(0.3)  # read on its own: the body is being read when the bad size comes
        sock.sendall(b"zz\r\n")
        got = answers(read_all(sock))
    status, _, raw = got[0]
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["code"] == "malformed_http", error
    assert "chunk" in error["message"]


SECRET = "session-secret-0123456789"  # noqa: S105 - a stand-in, sent to be kept out


@pytest.mark.parametrize(
    "data",
    [
        # A Cookie over aiohttp's 8 KiB a line (a browser's, for another app on localhost).
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Cookie: sid=%s; pad=%s\r\n\r\n" % (SECRET.encode(), b"p" * 9000),
        # A key whose header line runs over the same cap.
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer %s%s\r\n\r\n" % (SECRET.encode(), b"k" * 9000),
        # A trailer over it, after a chunked body.
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
        b"X-Token: %s%s\r\n\r\n" % (SECRET.encode(), b"t" * 9000),
    ],
    ids=["cookie", "authorization", "trailer"],
)
def test_a_header_line_too_long_is_not_quoted_in_the_answer_or_the_log(
    plain: Daemon, data: bytes
) -> None:
    """A header line over 8 KiB gets its 431 without its own bytes in the answer or the log.

    aiohttp's reason quotes the line's first 100 bytes, which swapd passed on into the
    envelope and the ``http.invalid`` line: a Cookie or a key went to the log.
    """
    before = len(plain.events("http.invalid"))
    status, _, raw = send_raw(plain, data)[0]
    assert status == 431, raw
    assert json.loads(raw)["error"]["code"] == "headers_too_large"
    assert SECRET.encode() not in raw
    wait_for(lambda: len(plain.events("http.invalid")) > before)
    assert SECRET not in plain.log_path.read_text()


def test_a_header_aiohttps_python_parser_refuses_is_not_quoted(tmp_path: Path) -> None:
    """Where aiohttp runs its Python parser, a refused header value is not echoed or logged.

    That parser quotes a value with a NUL byte in its reason (``Invalid HTTP header: b'...'``):
    an Authorization's key went back in the 400 and into the ``http.invalid`` line. It meets
    a trailer over 8 KiB as the body is read, and quoted that in its 400 too.
    """
    d = Daemon(tmp_path, {"a": fake_preset("A")}, env={"AIOHTTP_NO_EXTENSIONS": "1"})
    d.start()
    try:
        status, _, raw = send_raw(
            d,
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer %s\x00\r\n\r\n" % SECRET.encode(),
        )[0]
        assert status == 400, raw
        assert json.loads(raw)["error"]["code"] == "malformed_http"
        assert SECRET.encode() not in raw
        wait_for(lambda: d.events("http.invalid"))
        status, _, raw = send_raw(
            d,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
            b"X-Token: %s%s\r\n\r\n" % (SECRET.encode(), b"t" * 9000),
        )[0]
        assert status in {400, 431}, raw
        assert SECRET.encode() not in raw
        assert SECRET not in d.log_path.read_text()
    finally:
        assert not d.cleanup(), "processes outlived swapd"
