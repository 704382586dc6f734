"""The shipped Nginx snippet, run by a real nginx in front of swapd on loopback.

nginx comes from Debian (``apt-get install nginx-light``; ``.ci/run`` installs it). The
test runs it in the foreground as one process (``master_process off``) with its files
in the test's folder, and the snippet as shipped but for its two addresses.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, fake_stats, free_port, wait_for
from test_cli import swapd

SNIPPET = Path(__file__).resolve().parent.parent / "systemd" / "nginx-swapd.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(
        NGINX is None, reason="nginx is not installed (apt-get install nginx-light)"
    ),
]
MIB = 1 << 20


def nginx_conf(folder: Path, listen: int, swapd: int, read_timeout: str | None) -> str:
    """The snippet, listening on loopback and pointing at this swapd, in a minimal nginx.conf."""
    snippet = SNIPPET.read_text()
    for old, new in (
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{swapd};"),
        ("listen 80;", f"listen 127.0.0.1:{listen};"),
    ):
        assert old in snippet, f"the snippet no longer has {old!r}"
        snippet = snippet.replace(old, new)
    if read_timeout is not None:  # a short read timeout, so a test need not wait a minute
        snippet = snippet.replace(
            "proxy_read_timeout 3600s;", f"proxy_read_timeout {read_timeout};"
        )
    temps = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
master_process off;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} info;
events {{ worker_connections 512; }}
http {{
    access_log {folder / "access.log"};
{temps}
{snippet}
}}
"""


class Nginx:
    """A running nginx in front of one swapd."""

    def __init__(self, folder: Path, swapd: Daemon, read_timeout: str | None = None) -> None:
        assert NGINX is not None
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = folder / "nginx.conf"
        conf.write_text(nginx_conf(folder, self.port, swapd.port, read_timeout))
        with (folder / "stderr.log").open("wb") as stderr:
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(folder), "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.folder = folder
        wait_for(self._listening, timeout=30)

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            msg = f"nginx exited: {(self.folder / 'stderr.log').read_text()}"
            raise AssertionError(msg)
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def connect(self) -> http.client.HTTPConnection:
        """A client connection to nginx."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def stop(self) -> None:
        """Stop nginx and wait for it."""
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Start nginx processes in front of daemons; stop them at teardown."""
    started: list[Nginx] = []

    def start(swapd: Daemon, read_timeout: str | None = None) -> Nginx:
        nginx = Nginx(tmp_path / f"nginx{len(started)}", swapd, read_timeout)
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        nginx.stop()


def post(
    conn: http.client.HTTPConnection, path: str, body: dict[str, Any], **headers: str
) -> http.client.HTTPResponse:
    """Send one JSON POST and return the response (headers read, body not)."""
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **headers})
    return conn.getresponse()


def chat(model: str, **extra: Any) -> dict[str, Any]:
    """A chat completion body."""
    return {"model": model, "messages": [{"role": "user", "content": "x"}], **extra}


def test_sse_chunks_pass_as_they_are_produced(start_daemon: StartDaemon, front: Any) -> None:
    """Each chunk reaches the client through nginx before the stream is over: no buffering."""
    d = start_daemon({"a": fake_preset("A", "--chunks", "4", "--chunk-interval", "1")})
    nginx = front(d)
    conn = nginx.connect()
    resp = post(conn, "/v1/chat/completions", chat("a", stream=True), **{"X-Request-Id": "n-1"})
    assert resp.status == 200
    assert resp.headers["X-Request-Id"] == "n-1"
    arrived, produced = [], []
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: {"):
            arrived.append(time.time())
            produced.append(json.loads(line[6:])["produced_at"])
    conn.close()
    assert len(produced) == 4
    assert arrived[0] < produced[-1]  # the first chunk came while the last was not yet made
    assert all(a >= p for a, p in zip(arrived, produced, strict=True))


def test_large_bodies_pass(start_daemon: StartDaemon, front: Any) -> None:
    """An 8 MiB prompt goes through nginx to the backend and its 8 MiB answer comes back."""
    d = start_daemon({"a": fake_preset("A")})
    conn = front(d).connect()
    prompt = "x" * (8 * MIB)
    resp = post(conn, "/v1/completions", {"model": "a", "prompt": prompt})
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 200
    assert body["choices"][0]["text"] == f"A: {prompt}"


def test_a_client_that_hangs_up_cancels_the_backend_request(
    start_daemon: StartDaemon, front: Any
) -> None:
    """Closing the connection to nginx closes nginx's to swapd, and swapd's to the backend."""
    d = start_daemon({"a": fake_preset("A", "--chunks", "500", "--chunk-interval", "0.05")})
    assert d.chat("a")[0] == 200
    conn = front(d).connect()
    resp = post(conn, "/v1/chat/completions", chat("a", stream=True))
    assert resp.readline().startswith(b"data: ")
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: fake_stats(d.model("a")["port"])["cancelled"] == 1, timeout=30)
    wait_for(lambda: d.model("a")["in_flight"] == 0)


def test_pings_keep_a_cold_stream_alive_past_nginx_read_timeout(
    start_daemon: StartDaemon, front: Any
) -> None:
    """A load longer than proxy_read_timeout: the stream lives on pings; a plain request 504s."""
    d = start_daemon({"a": fake_preset("A", "--start-delay", "8")})
    nginx = front(d, read_timeout="5s")
    conn = nginx.connect()
    resp = post(conn, "/v1/chat/completions", chat("a", stream=True))
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200
    assert text.startswith(": loading\n\n")
    assert text.rstrip().endswith("data: [DONE]")
    assert d.request("POST", "/swapd/models/a/unload")[0] == 200
    conn = nginx.connect()
    resp = post(conn, "/v1/chat/completions", chat("a"))
    resp.read()
    conn.close()
    assert resp.status == 504  # nginx's own: nothing came within its read timeout


def test_control_routes_answer_local_clients(start_daemon: StartDaemon, front: Any) -> None:
    """/swapd/* is allowed from loopback (denied elsewhere by the snippet)."""
    d = start_daemon({"a": fake_preset("A")})
    conn = front(d).connect()
    conn.request("GET", "/swapd/status")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 200
    assert [m["name"] for m in body["models"]] == ["a"]


def test_the_cli_says_in_one_line_that_nginx_found_no_swapd(
    start_daemon: StartDaemon, front: Any
) -> None:
    r"""swapd down behind Nginx: its 502 page is named by its title, on one line.

    The page went out whole, seven lines each ending in a written-out ``\x0d``.
    """
    d = start_daemon({"a": fake_preset("A")})
    url = f"http://127.0.0.1:{front(d).port}"
    assert d.stop() == 0
    for verb in (["status"], ["load", "a"], ["logs", "a", "-f"]):
        result = swapd(*verb, "--url", url)
        assert result.returncode == 1, verb
        assert result.stderr.count("\n") == 1, result.stderr
        assert f"{url} answered 502: 502 Bad Gateway (an HTML page" in result.stderr
