"""A finished connection goes with its last reference, not at the next full collection.

swapd runs here with Python's cyclic collector off (a hook, not part of swapd): whatever a
request leaves in a reference cycle then stays for good, and the hook counts it. With the
collector on, such objects wait for a full collection, which Python runs only once the
objects that survived earlier ones grew by a quarter: in a long-running daemon, memory
that a soak saw grow for 20 minutes.

Three cycles were found this way: a client connection's handler and its body reader
(every connection), a streamed answer kept in its request's state (every client hang-up),
and a backend connection with its HTTP parser, or with an error raised from it (every
connection to a backend that swapd or the backend closed: each llama-server stream, each
readiness poll refused). And one reference: a failed load's error, kept as its model's last
error, held the frames of every request that waited on it.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import Daemon, fake_preset, hook_env, wait_for

_COUNT_HOOK = """
import gc, json, os, sys, threading, time
def _count_on_request():
    trigger = os.environ["SWAPD_TEST_COUNT_TRIGGER"]
    names = ("EdgeHandler", "_Connection", "_Coalesced", "Request", "UpstreamResponse")
    while True:
        time.sleep(0.1)
        if os.path.exists(trigger):
            os.remove(trigger)
            counts = dict.fromkeys(names, 0)
            for o in gc.get_objects():
                if type(o).__name__ in counts:
                    counts[type(o).__name__] += 1
            with open(trigger + ".count", "w") as fh:
                fh.write(json.dumps(counts))
if sys.argv[1:2] == ["serve"]:
    gc.disable()
    threading.Thread(target=_count_on_request, daemon=True).start()
"""
ROUNDS = 20


def _alive(trigger: Path) -> dict[str, int]:
    counted = trigger.with_name(trigger.name + ".count")
    counted.unlink(missing_ok=True)
    trigger.touch()
    found: dict[str, int] = json.loads(wait_for(lambda: counted.exists() and counted.read_text()))
    return found


def _body(model: str, *, stream: bool) -> str:
    return json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]}
    )


def _stream_and_hang_up(d: Daemon, model: str) -> None:
    body = _body(model, stream=True)
    request = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    with socket.create_connection(("127.0.0.1", d.port), timeout=30) as sock:
        sock.sendall(request.encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 200")


def _whole(d: Daemon, model: str, *, stream: bool) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", _body(model, stream=stream))
        answer = conn.getresponse()
        assert answer.status == 200
        answer.read()
    finally:
        conn.close()


def test_connections_leave_no_reference_cycles(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Whole answers, streams, hang-ups and backends that die leave nothing behind.

    ``a`` keeps its connections alive; ``b`` streams slowly, so a hang-up comes mid-answer;
    ``c`` dies on every second request, with the request unanswered, and starts again.
    """
    trigger = tmp_path / "count"
    env = hook_env(tmp_path / "hook", _COUNT_HOOK)
    env["SWAPD_TEST_COUNT_TRIGGER"] = str(trigger)
    presets: dict[str, Any] = {
        "a": fake_preset("A", "--chunks", "5", "--chunk-interval", "0"),
        "b": fake_preset("B", "--chunks", "50", "--chunk-interval", "0.05"),
        "c": fake_preset("C", "--chunks", "20", "--chunk-interval", "0.01", "--crash-after", "1"),
    }
    d = start_daemon(presets, {"max_running": 3}, env=env)
    for _ in range(ROUNDS):
        _whole(d, "a", stream=False)
        _whole(d, "a", stream=True)
        _stream_and_hang_up(d, "b")
    for _ in range(3):  # each death backs off (1, 2, 4 s) before the next start
        wait_for(lambda: d.chat("c")[0] == 200, timeout=60)  # a start and its first answer
        assert d.chat("c")[0] == 502  # the second request kills it before it answers
    wait_for(lambda: all(d.model(m)["in_flight"] == 0 for m in presets))
    alive = _alive(trigger)
    # The status calls' own connection is open while counting; each backend keeps one
    # connection in the pool (and its liveness probe's).
    assert alive["EdgeHandler"] <= 2, alive
    assert alive["Request"] <= 2, alive
    assert alive["_Coalesced"] == 0, alive
    assert alive["UpstreamResponse"] <= 1, alive
    assert alive["_Connection"] <= 2 * len(presets), alive


def test_a_failed_load_keeps_no_request_alive(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A load's error, kept as the model's last error, holds no request that waited on it.

    Its traceback ran through each waiting request's handler: kept with it, the frames held
    that request and its connection until the model's next error.
    """
    trigger = tmp_path / "count"
    env = hook_env(tmp_path / "hook", _COUNT_HOOK)
    env["SWAPD_TEST_COUNT_TRIGGER"] = str(trigger)
    presets = {n: fake_preset(n.upper(), "--exit-at-start", "1") for n in ("a", "b", "c")}
    d = start_daemon(presets, env=env)
    for name in presets:
        status, body = d.chat(name)
        assert (status, body["error"]["code"]) == (502, "backend_start_failed"), body
        assert d.model(name)["error"] is not None
    alive = _alive(trigger)
    assert alive["Request"] == 0, alive
    assert alive["EdgeHandler"] <= 1, alive


def test_a_failed_load_keeps_no_cold_stream_alive(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Nor does it hold a stream whose pings had begun, answered by its own handler.

    Each load fails after the first ping (3 s), so the error goes out as an event on the
    stream the pings opened, never through the envelope's middleware.
    """
    trigger = tmp_path / "count"
    env = hook_env(tmp_path / "hook", _COUNT_HOOK)
    env["SWAPD_TEST_COUNT_TRIGGER"] = str(trigger)
    late = ("--start-delay", "3.5", "--listen-late", "--exit-at-start", "1")
    presets = {n: fake_preset(n.upper(), *late) for n in ("a", "b")}
    d = start_daemon(presets, env=env)
    for name in presets:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", _body(name, stream=True))
            answer = conn.getresponse()
            text = answer.read().decode()
        finally:
            conn.close()
        assert answer.status == 200  # the pings' stream
        assert ": loading" in text, text
        assert "backend_start_failed" in text, text
        assert d.model(name)["error"] is not None
    alive = _alive(trigger)
    assert alive["Request"] == 0, alive
    assert alive["EdgeHandler"] <= 1, alive
