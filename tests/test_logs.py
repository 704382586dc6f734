"""Logs: JSON on every line, backend output on its own level and never with a request id."""

from __future__ import annotations

import http.client
import json
import signal
import time
from pathlib import Path

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, hook_env, wait_for


def lines(d: Daemon) -> list[str]:
    """Everything swapd wrote to stdout and stderr."""
    return d.log_path.read_text().splitlines()


def test_every_line_is_a_json_event(start_daemon: StartDaemon) -> None:
    """Loads, a crash, a reload, a bad request and a stop: nothing but JSON objects."""
    d = start_daemon({"a": fake_preset("A", "--crash-after", "1"), "b": fake_preset("B")})
    assert d.chat("a")[0] == 200
    assert d.chat("a")[0] == 502  # the backend dies on the second request
    assert d.request("POST", "/v1/chat/completions", "not an object")[0] == 400
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.events("config.reload"))
    assert d.stop() == 0
    text = lines(d)
    assert text
    for line in text:
        assert isinstance(json.loads(line), dict), line
    assert d.events("swapd.listen")


@pytest.mark.parametrize(
    ("backend_log", "shown"), [("info", True), ("debug", False), ("off", False)]
)
def test_backend_log_sets_the_level_of_backend_output_alone(
    start_daemon: StartDaemon, backend_log: str, *, shown: bool
) -> None:
    """With log_level info, backend lines show at info only; swapd's own events stay."""
    d = start_daemon({"a": fake_preset("A")}, {"backend_log": backend_log})
    assert d.chat("a")[0] == 200
    assert d.events("model.load.done")
    assert wait_for(lambda: [e["status"] for e in d.events("request.done")]) == [200]
    output = d.events("backend.output")
    assert bool(output) is shown
    for event in output:
        assert event["model"] == "a"
        assert "request_id" not in event
    # The ring buffer behind `swapd logs` keeps them either way.
    assert any("listening on" in line for line in d.get("/swapd/models/a/logs")[1]["lines"])


def test_backend_lines_show_at_debug_when_swapd_logs_debug(start_daemon: StartDaemon) -> None:
    """``backend_log: debug`` with ``log_level: debug``: the lines are there, at debug."""
    d = start_daemon({"a": fake_preset("A")}, {"backend_log": "debug", "log_level": "debug"})
    assert d.chat("a")[0] == 200
    assert {e["level"] for e in d.events("backend.output")} == {"debug"}


def test_backend_events_never_carry_a_request_id(start_daemon: StartDaemon) -> None:
    """The request that loaded a model lends its id to the load, not to the backend's lines."""
    d = start_daemon({"a": fake_preset("A")})
    status, _ = d.request(
        "POST", "/v1/chat/completions", {"model": "a"}, headers={"X-Request-Id": "r-1"}
    )
    assert status == 200
    backend = [e for e in _all(d) if str(e.get("event", "")).startswith("backend.")]
    assert {e["event"] for e in backend} >= {"backend.spawn", "backend.output"}
    assert all("request_id" not in e for e in backend)
    wait_for(lambda: any(e.get("request_id") == "r-1" for e in d.events("request.done")))


def test_a_streamed_answer_carries_the_request_id(start_daemon: StartDaemon) -> None:
    """X-Request-Id is on every answer, streams included (the client's own when it sent one)."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    for sent in ("client-id-7", None):
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        headers = {"X-Request-Id": sent} if sent else {}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        assert resp.headers["Content-Type"] == "text/event-stream"
        got = resp.headers["X-Request-Id"]
        assert got == sent if sent else got
        resp.read()
        conn.close()


def _all(d: Daemon) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines(d)]


def test_a_lines_count_that_is_not_a_plain_number_is_a_400(
    start_daemon: StartDaemon,
) -> None:
    """``?lines=²`` (a digit to str.isdigit), -1, +5, 5.0: a 400 that says so.

    Not a 500, nor a quiet 100. A count past what the log keeps is all of it; none
    given is 100.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    for lines in ("%C2%B2", "-1", "%2B5", "5.0", "x"):
        status, body = d.get(f"/swapd/models/a/logs?lines={lines}")
        assert (status, body["error"]["type"]) == (400, "invalid_request_error"), body
        assert "lines must be a whole number" in body["error"]["message"]
    everything = d.get("/swapd/models/a/logs?lines=500")[1]["lines"]
    for lines in ("9" * 5000, "1000000000"):
        status, body = d.get(f"/swapd/models/a/logs?lines={lines}")
        assert (status, body["lines"]) == (200, everything)
    assert len(d.get("/swapd/models/a/logs?lines=1")[1]["lines"]) == 1
    assert d.get("/swapd/models/a/logs")[1]["lines"] == everything[-100:]


# Loaded by swapd's interpreter (``sitecustomize``): while ``flag`` exists, an event
# stream's headers wait 2 s before they go out, the window in which a follow's first
# lines are being written.
SLOW_STREAM_START = """
import asyncio
import pathlib

from aiohttp import web

prepare = web.StreamResponse.prepare
flag = pathlib.Path({flag!r})


async def slowly(self, request):
    if flag.exists() and self.content_type == "text/event-stream":
        await asyncio.sleep(2)
    return await prepare(self, request)


web.StreamResponse.prepare = slowly
"""


def test_a_follow_misses_no_line_printed_while_it_starts(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Lines a backend prints while a follow writes its first lines come after them.

    The follow took its cursor only after the first lines were written, so whatever was
    printed meanwhile was skipped.
    """
    hook = tmp_path / "hook"
    flag = hook / "slow"
    d = start_daemon(
        {"a": fake_preset("A")}, env=hook_env(hook, SLOW_STREAM_START.format(flag=str(flag)))
    )
    assert d.chat("a")[0] == 200
    flag.touch()
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        conn.putrequest("GET", "/swapd/models/a/logs?follow=true&lines=1")
        conn.endheaders()
        # Within the 2 s before the stream starts: a new process prints a line.
        assert d.request("POST", "/swapd/models/a/unload")[0] == 200
        assert d.chat("a")[0] == 200
        response = conn.getresponse()
        flag.unlink()
        seen: list[str] = []
        give_up = time.monotonic() + 20  # keep-alive comments come between lines meanwhile
        while len(seen) < 2 and time.monotonic() < give_up:
            line = response.fp.readline().decode()
            if line.startswith("data:"):
                seen.append(line)
        assert len(seen) == 2, seen  # the old process's line, then the new one's
        assert all("listening on" in line for line in seen)
    finally:
        conn.close()
