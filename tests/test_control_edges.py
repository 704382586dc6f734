"""The admin surface at its edges: stuck followers at shutdown, what the CLI reaches and reads."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import FAKE_UPSTREAM, fake_preset, free_port, wait_for
from test_cli import swapd

from swapd._client import url_of
from swapd._render import table
from swapd.config import Endpoint

if TYPE_CHECKING:
    from conftest import StartDaemon

# A helper in the backend's group prints 400 KB a second, then the fake serves.
LOOP = """
import sys
import time

line = "x" * 8000 + "\\n"
while True:
    sys.stdout.write(line * 50)
    sys.stdout.flush()
    time.sleep(0.05)
"""
SPEW = """
import os
import subprocess
import sys

subprocess.Popen([sys.executable, sys.argv[3]])
os.execv(sys.executable, [sys.executable, sys.argv[1], "--port", sys.argv[2]])
"""


# A web app that answers every path 200 with a page (one also on 8080: a UI, a login page).
OTHER_APP = """
import sys

from aiohttp import web


async def page(request):
    return web.Response(text="<html>app</html>", content_type="text/html")


app = web.Application()
app.router.add_route("*", "/{p:.*}", page)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


# A proxy in front whose upstream is down answers every path with its own JSON error.
PROXY_ERROR = """
import json
import sys

from aiohttp import web


async def down(request):
    return web.json_response(json.loads(sys.argv[2]), status=502)


app = web.Application()
app.router.add_route("*", "/{p:.*}", down)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


# Another program's JSON API on the port: 200 with its own objects, and events of its own.
OTHER_JSON_APP = """
import sys

from aiohttp import web


async def answer(request):
    if request.query.get("follow") == "true" or request.path == "/swapd/events":
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"event: line\\ndata: hello there\\n\\n")
        return response
    return web.json_response({"ok": True, "version": "1.0"})


app = web.Application()
app.router.add_route("*", "/{p:.*}", answer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def listening(port: int) -> bool:
    """Whether something accepts connections on the loopback port."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def another_program(tmp_path: Path, source: str, *args: str) -> Iterator[str]:
    """Run ``source`` (an aiohttp app taking its port, then ``args``); yield its URL."""
    port = free_port()
    server = tmp_path / f"app-{port}.py"
    server.write_text(source)
    app = subprocess.Popen([sys.executable, str(server), str(port), *args])
    try:
        wait_for(lambda: listening(port))
        yield f"http://127.0.0.1:{port}"
    finally:
        app.kill()
        app.wait()


def spewing(tmp_path: Path) -> dict[str, Any]:
    """A command preset whose backend prints fast and for good."""
    (tmp_path / "loop.py").write_text(LOOP)
    (tmp_path / "spew.py").write_text(SPEW)
    cmd = [sys.executable, str(tmp_path / "spew.py"), str(FAKE_UPSTREAM), "${PORT}"]
    return {"backend": "command", "cmd": [*cmd, str(tmp_path / "loop.py")]}


def test_a_follower_that_stops_reading_does_not_hold_shutdown(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A `swapd logs -f | less` left on screen: its stream is cut, the drain does not wait.

    Its handler waits in a write that its full socket never ends; before, shutdown waited
    out the whole ``shutdown_timeout`` with no request in flight.
    """
    d = start_daemon({"spew": spewing(tmp_path)}, {"shutdown_timeout": "5m"})
    assert d.request("POST", "/swapd/models/spew/load")[0] == 200
    stuck = socket.create_connection(("127.0.0.1", d.port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    path = "/swapd/models/spew/logs?follow=true&lines=0"
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n\r\n"
    stuck.sendall(request.encode())
    try:
        time.sleep(3)  # the socket's buffers fill: the handler waits in its write
        assert d.stop() == 0  # within the fixture's wait, far short of 5 minutes
    finally:
        stuck.close()


def test_the_cli_reaches_a_swapd_listening_on_every_ipv6_address() -> None:
    """``[::]`` binds IPv6 alone (the loop sets IPV6_V6ONLY): the CLI asks ``[::1]``."""
    assert url_of(Endpoint("::", 8080, ())) == "http://[::1]:8080"
    assert url_of(Endpoint("0.0.0.0", 8080, ())) == "http://127.0.0.1:8080"
    assert url_of(Endpoint("", 8080, ())) == "http://127.0.0.1:8080"


def test_the_cli_says_so_when_something_else_answers(tmp_path: Path) -> None:
    """Another web app on the port answers 200 with HTML: a clear line, no traceback."""
    with another_program(tmp_path, OTHER_APP) as url:
        for verb in (["status"], ["unload", "--all"], ["reload"], ["logs", "x", "-f"]):
            result = swapd(*verb, "--url", url)
            assert result.returncode == 1, verb
            assert "Traceback" not in result.stderr, result.stderr
            assert "is swapd listening there?" in result.stderr


def test_a_proxys_own_json_error_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Kong's ``{"message": ...}`` or ``{"error": "Bad Gateway"}`` is not swapd's envelope.

    ``swapd load`` read the message out of it as if it were, and died with a KeyError or
    a TypeError; ``reload`` did the same for a body with ``errors`` but no ``error``.
    """
    for body in ('{"message": "no upstream"}', '{"error": "Bad Gateway"}', '{"errors": ["x"]}'):
        with another_program(tmp_path, PROXY_ERROR, body) as url:
            for verb in (["load", "a"], ["reload"], ["status"]):
                result = swapd(*verb, "--url", url)
                assert result.returncode == 1, verb
                assert "Traceback" not in result.stderr, result.stderr
                assert f"answered 502: {body}" in result.stderr, result.stderr


def test_another_programs_json_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """200 with JSON that is not swapd's, or events that are not JSON: a clear line.

    ``status`` and ``plan`` died with a KeyError, ``logs -f`` in ``json.loads``.
    """
    with another_program(tmp_path, OTHER_JSON_APP) as url:
        verbs = (
            ["status"],
            ["plan"],
            ["unload", "a"],
            ["unload", "--all"],
            ["reload"],
            ["logs", "a"],
        )
        for verb in verbs:
            result = swapd(*verb, "--url", url)
            assert result.returncode == 1, verb
            assert "Traceback" not in result.stderr, result.stderr
            assert "is swapd listening there?" in result.stderr, result.stderr
        result = swapd("logs", "a", "-f", "--url", url)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr, result.stderr
        assert "sent an event that is not swapd's JSON: hello there" in result.stderr


def test_a_name_with_dot_segments_is_not_folded_into_another(start_daemon: StartDaemon) -> None:
    """``swapd unload org/../m`` names no model; the path the CLI sent was folded to ``m``."""
    d = start_daemon({"m": fake_preset("M")})
    assert d.chat("m")[0] == 200
    unload = swapd("unload", "org/../m", "--url", d.url)
    assert unload.returncode == 1
    assert "'org/../m' is not configured" in unload.stderr
    load = swapd("load", "org/./m", "--url", d.url)
    assert load.returncode == 1
    assert "'org/./m' is not configured" in load.stderr
    assert d.model("m")["state"] == "ready"


def test_load_fails_when_the_model_is_not_ready_at_the_end(start_daemon: StartDaemon) -> None:
    """Ready, then unloaded before the answer: `swapd load` exits 1, as not ready."""
    d = start_daemon({"slow": fake_preset("slow", "--start-delay", "3")})
    results: list[subprocess.CompletedProcess[str]] = []
    loader = threading.Thread(target=lambda: results.append(swapd("load", "slow", "--url", d.url)))
    loader.start()
    wait_for(lambda: d.model("slow")["state"] == "starting")
    assert d.request("POST", "/swapd/unload")[0] == 200  # an operator's `unload --all`
    loader.join()
    assert results[0].returncode == 1, results[0].stdout
    assert "not ready" in results[0].stderr


def test_a_followed_log_that_swapd_ends_says_so_and_exits_1(start_daemon: StartDaemon) -> None:
    """The stream ended without the user: a line says why it may have, and the exit is 1."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    argv = [sys.executable, "-m", "swapd", "logs", "a", "-f", "--url", d.url]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as follow:
        assert follow.stdout is not None
        assert "listening on" in follow.stdout.readline()
        assert d.stop() == 0
        assert follow.wait(timeout=30) == 1
        assert follow.stderr is not None
        assert "the log stream ended" in follow.stderr.read()


def test_logs_give_up_on_a_swapd_that_takes_the_connection_but_never_answers(
    start_daemon: StartDaemon,
) -> None:
    """A stopped swapd still completes the handshake: `swapd logs` waited for good."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        result = swapd("logs", "a", "--url", d.url)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert result.returncode == 1
    assert result.stderr.startswith(f"swapd: {d.url} took the connection but did not answer")


def test_plan_gives_up_on_a_stuck_swapd_instead_of_planning_alone(
    start_daemon: StartDaemon,
) -> None:
    """A swapd that runs but never answers is no swapd "not running": no local plan.

    ``swapd plan --config`` planned from the config alone and said swapd was not running,
    where the README says plan gives up.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        result = swapd("plan", "--url", d.url, "--config", str(d.config_path))
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert result.returncode == 1
    assert result.stderr.startswith(f"swapd: {d.url} took the connection but did not answer")
    assert "not running" not in result.stderr


def test_a_url_without_a_scheme_is_read_as_http(start_daemon: StartDaemon) -> None:
    """``--url 127.0.0.1:8080``, as a listen address is written, reaches swapd."""
    d = start_daemon({"a": fake_preset("A")})
    assert swapd("status", "--url", f"127.0.0.1:{d.port}").returncode == 0


def test_an_empty_model_in_the_feed_query_is_refused(start_daemon: StartDaemon) -> None:
    """``?model=`` names no model: a 400 saying so, not every model's feed."""
    d = start_daemon({"a": fake_preset("A")})
    status, body = d.get("/swapd/events?model=")
    assert status == 400
    assert "names no model" in body["error"]["message"]


def test_a_table_without_rows_is_its_header() -> None:
    """A plan with no devices would have no rows: the header alone, no error."""
    assert table(["device", "free"], []) == "device  free"
