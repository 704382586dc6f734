"""Access control through a real swapd: keys, the Host guard, the Origin guard and CORS."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset

from swapd.auth import route_need

INFERENCE_KEY = "inference-key-0123456789"
ADMIN_KEY = "admin-key-0123456789abcdef"
INFERENCE = {"Authorization": f"Bearer {INFERENCE_KEY}"}
ADMIN = {"x-api-key": ADMIN_KEY}
ECHO = Path(__file__).resolve().parent / "fakes" / "echo_headers.py"
CONTROL = [
    ("GET", "/swapd/status"),
    ("POST", "/swapd/models/a/load"),
    ("POST", "/swapd/models/a/unload"),
    ("POST", "/swapd/unload"),
    ("GET", "/swapd/models/a/logs"),
]
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def echo_preset() -> dict[str, Any]:
    """A command preset running the header-echo backend."""
    return {"backend": "command", "cmd": [sys.executable, str(ECHO), "--port", "${PORT}"]}


def exchange(
    d: Daemon, method: str, path: str, headers: Mapping[str, str], body: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    """One request with exactly these headers; status, response headers and JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        conn.request(method, path, body, dict(headers))
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


def error_code(body: Any) -> str | None:
    """The ``code`` of an OpenAI-shaped error body."""
    assert set(body["error"]) == {"message", "type", "code", "param"}
    code: str | None = body["error"]["code"]
    return code


@pytest.fixture
def keyed(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    """swapd with an inference key inline, an admin key in a file and one allowed origin."""
    keys = tmp_path / "admin.keys"
    keys.write_text(f"# admin keys\n\n{ADMIN_KEY}\n")
    keys.chmod(0o600)
    settings = {
        "api_keys": [INFERENCE_KEY],
        "admin_keys_file": str(keys),
        "cors_origins": ["http://ok.example"],
    }
    return start_daemon({"a": fake_preset("A"), "echo": echo_preset()}, settings)


@pytest.fixture
def open_daemon(start_daemon: StartDaemon) -> Daemon:
    """swapd without keys (the local default), with one extra allowed host name pattern."""
    settings = {"allowed_hosts": ["llm.example.com", "*.corp.example"]}
    return start_daemon({"a": fake_preset("A"), "echo": echo_preset()}, settings)


def test_health_needs_no_key_host_or_origin(keyed: Daemon, open_daemon: Daemon) -> None:
    """Probes from anywhere keep working: /health ignores keys, Host and Origin."""
    hostile = {"Host": "evil.example", "Origin": "http://evil.example"}
    for d in (keyed, open_daemon):
        status, _, body = exchange(d, "GET", "/health", hostile)
        assert (status, body) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing"), *CONTROL],
)
def test_every_other_route_needs_a_key(keyed: Daemon, method: str, path: str) -> None:
    """With keys set, a request without one is 401 in the envelope, naming the scheme."""
    body = json.dumps(CHAT).encode() if method == "POST" else None
    status, headers, data = exchange(keyed, method, path, {}, body)
    assert status == 401
    assert error_code(data) == "invalid_api_key"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert keyed.model("a", headers=ADMIN)["state"] == "stopped"


def test_an_unknown_key_is_401(keyed: Daemon) -> None:
    """A key swapd does not know is refused like no key at all."""
    for headers in ({"Authorization": "Bearer nope-nope-nope"}, {"x-api-key": "nope"}):
        status, body = keyed.request("GET", "/v1/models", headers=headers)
        assert status == 401
        assert "an unknown key" in body["error"]["message"]


def test_a_known_key_in_either_header_lets_in_a_request_that_carries_two(keyed: Daemon) -> None:
    """A Bearer token of another service beside swapd's key in x-api-key, or the reverse.

    Anthropic's SDKs send both headers when a client sets both ``api_key`` and
    ``auth_token``. Before, only the Authorization header was read when it held a key, and
    such a request was refused 401 with a key swapd knows in its x-api-key. The strongest
    role among the keys counts; two unknown keys are still refused.
    """
    other = "Bearer token-for-another-service"
    for headers in (
        {"Authorization": other, "x-api-key": INFERENCE_KEY},
        {"Authorization": f"Bearer {INFERENCE_KEY}", "x-api-key": "sk-ant-another"},
        {**_basic("", "not-a-key"), "x-api-key": INFERENCE_KEY},
    ):
        status, body = keyed.request("POST", "/v1/chat/completions", CHAT, headers=headers)
        assert status == 200, (headers, body)
    both = {"Authorization": f"Bearer {INFERENCE_KEY}", "x-api-key": ADMIN_KEY}
    assert keyed.request("GET", "/swapd/status", headers=both)[0] == 200
    status, body = keyed.request(
        "GET", "/v1/models", headers={"Authorization": other, "x-api-key": "x"}
    )
    assert status == 401
    assert "an unknown key" in body["error"]["message"]


def _basic(user: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def test_an_inference_key_serves_inference_by_either_header(keyed: Daemon) -> None:
    """An inference key works as a Bearer token, as x-api-key, and as a Basic password."""
    basic = (_basic("", INFERENCE_KEY), _basic("anyone", INFERENCE_KEY))
    for headers in (INFERENCE, {"x-api-key": INFERENCE_KEY}, *basic):
        status, body = keyed.request("POST", "/v1/chat/completions", CHAT, headers=headers)
        assert status == 200, body
        assert keyed.request("GET", "/v1/models", headers=headers)[0] == 200


@pytest.mark.parametrize(
    "headers",
    [
        _basic(INFERENCE_KEY, ""),  # the key as the user name: not where it is read
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic \xe9\xe9\xe9\xe9"},  # not ASCII: not base64 either
        {"Authorization": f"Basic {base64.b64encode(INFERENCE_KEY.encode()).decode()}"},
    ],
)
def test_a_basic_authorization_without_the_key_as_its_password_is_401(
    keyed: Daemon, headers: dict[str, str]
) -> None:
    """No colon, no password, or no base64 (non-ASCII bytes included): no key, not a 500."""
    status, body = keyed.request("POST", "/v1/chat/completions", CHAT, headers=headers)
    assert status == 401
    assert error_code(body) == "invalid_api_key"


@pytest.mark.parametrize(("method", "path"), CONTROL)
def test_an_inference_key_is_403_on_control_routes(keyed: Daemon, method: str, path: str) -> None:
    """/swapd/* needs an admin key: an inference key gets 403 and changes nothing."""
    status, body = keyed.request(method, path, headers=INFERENCE)
    assert status == 403
    assert error_code(body) == "admin_key_required"
    assert keyed.model("a", headers=ADMIN)["state"] == "stopped"


def test_an_admin_key_serves_control_and_inference(keyed: Daemon) -> None:
    """The admin key (read from admin_keys_file) loads models, sees pids and ports, and chats."""
    status, body = keyed.request("POST", "/swapd/models/a/load", headers=ADMIN)
    assert status == 200, body
    model = keyed.model("a", headers=ADMIN)
    assert model["state"] == "ready"
    assert model["pid"] > 0
    assert model["port"] > 0
    assert keyed.request("POST", "/v1/chat/completions", CHAT, headers=ADMIN)[0] == 200


def test_metrics_follows_the_admin_rule(keyed: Daemon) -> None:
    """/metrics asks for an admin key before any route answers: 401, 403, then past the check."""
    assert keyed.request("GET", "/metrics")[0] == 401
    status, body = keyed.request("GET", "/metrics", headers=INFERENCE)
    assert (status, error_code(body)) == (403, "admin_key_required")
    status, body = keyed.request("GET", "/metrics", headers=ADMIN)
    assert status == 200
    assert "swapd_model_state" in body


def test_metrics_public_skips_the_key_but_not_the_origin(start_daemon: StartDaemon) -> None:
    """With metrics_public, /metrics needs no key (any key passes), while other routes still do."""
    settings = {"api_keys": [INFERENCE_KEY], "admin_keys": [ADMIN_KEY], "metrics_public": True}
    d = start_daemon({"a": fake_preset("A")}, settings)
    for headers in ({}, INFERENCE, ADMIN):
        status, body = d.request("GET", "/metrics", headers=headers)
        assert status == 200
        assert "swapd_model_state" in body
    assert d.request("GET", "/v1/models")[0] == 401
    status, body = d.request("GET", "/metrics", headers={"Origin": "http://evil.example"})
    assert (status, error_code(body)) == (403, "origin_not_allowed")


def test_route_needs_cover_every_control_spelling() -> None:
    """Control paths need an admin key however they are spelled; /health needs nothing."""
    assert route_need("/health", metrics_public=False) == "nothing"
    assert route_need("//swapd/status", metrics_public=False) == "admin"
    assert route_need("/swapd", metrics_public=False) == "admin"
    assert route_need("/metrics/", metrics_public=False) == "admin"
    assert route_need("/metrics", metrics_public=True) == "checks"
    assert route_need("/v1/models", metrics_public=True) == "inference"


def test_client_credentials_are_never_forwarded(keyed: Daemon) -> None:
    """Authorization, x-api-key and Cookie stop at swapd; other headers pass byte for byte."""
    headers = {
        **INFERENCE,
        "x-api-key": INFERENCE_KEY,
        "Cookie": "session=secret",
        "Content-Type": "application/json",
    }
    conn = http.client.HTTPConnection("127.0.0.1", keyed.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.putheader("X-Note", "caf\u00e9 \u2713".encode())  # UTF-8 bytes, not Latin-1
    body = json.dumps({"model": "echo"}).encode()
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, data
    got = {base64.b64decode(k).lower(): base64.b64decode(v) for k, v in data["headers"]}
    assert not {b"authorization", b"x-api-key", b"cookie"} & set(got)
    assert got[b"x-note"] == "caf\u00e9 \u2713".encode()
    assert INFERENCE_KEY.encode() not in b"".join(got.values())
    assert INFERENCE_KEY not in keyed.log_path.read_text()


def test_a_foreign_origin_is_403_on_control_and_inference_routes(keyed: Daemon) -> None:
    """A web page of a foreign origin is refused even with a valid admin key."""
    foreign = {**ADMIN, "Origin": "http://evil.example"}
    for method, path in [("POST", "/v1/chat/completions"), *CONTROL]:
        status, body = keyed.request(method, path, CHAT, headers=foreign)
        assert (status, error_code(body)) == (403, "origin_not_allowed"), path
    assert keyed.model("a", headers=ADMIN)["state"] == "stopped"


def test_a_cross_origin_text_plain_post_cannot_unload(open_daemon: Daemon) -> None:
    """The no-preflight browser trick (text/plain POST) is refused without keys too."""
    assert open_daemon.request("POST", "/swapd/models/a/load")[0] == 200
    page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    status, _, body = exchange(open_daemon, "POST", "/swapd/models/a/unload", page, b"x")
    assert (status, error_code(body)) == (403, "origin_not_allowed")
    status, _, body = exchange(open_daemon, "POST", "/v1/completions", page, b'{"model":"a"}')
    assert status == 403
    assert open_daemon.model("a")["state"] == "ready"


def test_a_listed_origin_gets_cors_headers_and_preflights(keyed: Daemon) -> None:
    """A page from cors_origins may call swapd: preflight 204 without a key, then CORS headers."""
    preflight = {
        "Origin": "http://ok.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = exchange(keyed, "OPTIONS", "/v1/chat/completions", preflight)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "http://ok.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    page = {**INFERENCE, "Origin": "http://ok.example", "Content-Type": "application/json"}
    status, headers, _ = exchange(
        keyed, "POST", "/v1/chat/completions", page, json.dumps(CHAT).encode()
    )
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "http://ok.example"
    assert "X-Request-Id" in headers["Access-Control-Expose-Headers"]
    # Errors carry them too, so the page can read why it was refused.
    status, headers, _ = exchange(keyed, "GET", "/swapd/status", page)
    assert status == 403
    assert headers["Access-Control-Allow-Origin"] == "http://ok.example"


def test_cors_is_off_unless_origins_are_listed(open_daemon: Daemon) -> None:
    """Without cors_origins no answer carries CORS headers, and a preflight is refused."""
    status, headers, _ = exchange(open_daemon, "GET", "/v1/models", {})
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers
    preflight = {"Origin": "http://any.example", "Access-Control-Request-Method": "POST"}
    assert exchange(open_daemon, "OPTIONS", "/v1/chat/completions", preflight)[0] == 403


@pytest.mark.parametrize("path", ["/v1/models", "/swapd/status", "/v1/nothing"])
def test_a_foreign_host_is_421_without_keys(open_daemon: Daemon, path: str) -> None:
    """DNS rebinding reaches swapd under a foreign name: without keys that Host gets 421."""
    status, _, body = exchange(open_daemon, "GET", path, {"Host": "evil.example"})
    assert (status, error_code(body)) == (421, "host_not_allowed")


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:{port}", "127.0.0.1:{port}", "LLM.example.com", "a.corp.example:80"],
)
def test_own_names_and_allowed_hosts_are_served(open_daemon: Daemon, host: str) -> None:
    """The listen address, localhost and allowed_hosts (with *.domain patterns) are served."""
    status, _, _ = exchange(open_daemon, "GET", "/v1/models", {"Host": host.format(port=1)})
    assert status == 200


def test_keys_replace_the_host_check(keyed: Daemon) -> None:
    """With keys and no allowed_hosts, any Host is served to a caller that has a key."""
    status, _, _ = exchange(keyed, "GET", "/v1/models", {**INFERENCE, "Host": "llm.internal"})
    assert status == 200


def status_cli(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``swapd status`` with these arguments."""
    return subprocess.run(
        [sys.executable, "-m", "swapd", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_the_cli_takes_a_key_from_flag_env_or_config(keyed: Daemon) -> None:
    """`swapd status` works with --key, with SWAPD_KEY, and with --config (admin_keys_file).

    An empty SWAPD_KEY or SWAPD_URL kept the config from being read once the other was given.
    """
    without = status_cli("--url", keyed.url, env={"SWAPD_KEY": ""})
    assert without.returncode == 1
    assert "answered 401" in without.stderr
    assert "SWAPD_KEY" in without.stderr
    inference = status_cli("--url", keyed.url, "--key", INFERENCE_KEY)
    assert inference.returncode == 1
    assert "answered 403" in inference.stderr
    for args, env in (
        (("--url", keyed.url, "--key", ADMIN_KEY), {}),
        (("--url", keyed.url), {"SWAPD_KEY": ADMIN_KEY}),
        (("--config", str(keyed.config_path)), {"SWAPD_KEY": ""}),
        # Empty variables are unset: the config gives the key (and the address).
        (("--url", keyed.url, "--config", str(keyed.config_path)), {"SWAPD_KEY": ""}),
        (("--config", str(keyed.config_path), "--key", ""), {"SWAPD_URL": "", "SWAPD_KEY": ""}),
    ):
        done = status_cli(*args, "--json", env=env)
        assert done.returncode == 0, done.stderr
        assert {m["name"] for m in json.loads(done.stdout)["models"]} == {"a", "echo"}


def test_the_cli_reaches_a_running_swapd_whatever_its_presets_say_now(keyed: Daemon) -> None:
    """A preset broken since swapd started does not keep the CLI from it.

    A key file it cannot read is named when swapd refuses the call.
    """
    (keyed.root / "presets" / "typo.yaml").write_text("cmd: [x]\nttl: soon\n")
    done = status_cli("--config", str(keyed.config_path), "--json", env={"SWAPD_KEY": ""})
    assert done.returncode == 0, done.stderr
    assert {m["name"] for m in json.loads(done.stdout)["models"]} == {"a", "echo"}
    keys = keyed.root / "admin.keys"
    keyed.settings = {**keyed.settings, "admin_keys_file": str(keys)}  # not there
    keyed.write()
    refused = status_cli("--config", str(keyed.config_path), env={"SWAPD_KEY": ""})
    assert refused.returncode == 1
    assert "answered 401" in refused.stderr
    assert "admin key could not be read" in refused.stderr
    assert str(keys) in refused.stderr


def test_a_page_on_another_site_cannot_make_the_browser_load_a_model(open_daemon: Daemon) -> None:
    """A no-cors fetch (an <img>, a link) carries no Origin, but says where it comes from.

    Without keys, ``<img src="http://127.0.0.1:PORT/upstream/a/props">`` on any page
    loaded the model (and could evict the user's): Fetch Metadata names it cross-site.
    """
    image = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    for site in ("cross-site", "same-site"):
        status, _, body = exchange(
            open_daemon, "GET", "/upstream/a/props", image | {"Sec-Fetch-Site": site}
        )
        assert (status, error_code(body)) == (403, "origin_not_allowed")
    assert open_daemon.model("a")["state"] == "stopped"
    typed = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}  # the user's own address bar
    status, _, body = exchange(open_daemon, "GET", "/upstream/a/props", typed)
    assert (status, body["path"]) == (200, "/props")


def _open_stream(d: Daemon, path: str, headers: Mapping[str, str]) -> socket.socket:
    """A stream's connection, its answer's head read."""
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=30)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
    seen = b""
    while b"\r\n\r\n" not in seen:
        seen += sock.recv(65536)
    assert seen.startswith(b"HTTP/1.1 200"), seen
    return sock


def _ends_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the stream ends (its last chunk, or the connection closed) within ``seconds``."""
    sock.settimeout(seconds)
    seen = b""
    try:
        while more := sock.recv(65536):
            seen += more
            if seen.endswith(b"0\r\n\r\n"):
                return True
    except TimeoutError:
        return False
    return True


def test_a_stream_ends_when_a_reload_removes_its_key(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Events and followed logs opened with an admin key end once a reload drops that key.

    The key was checked once, as each stream began: a stream opened with a key taken
    away from its holder kept sending pids, ports and the backend's output for good.
    """
    keys = tmp_path / "admin.keys"
    keys.write_text(f"{ADMIN_KEY}\n")
    keys.chmod(0o600)
    d = start_daemon({"a": fake_preset("A")}, {"admin_keys_file": str(keys)})
    streams = [
        _open_stream(d, path, ADMIN)
        for path in ("/swapd/events", "/swapd/models/a/logs?follow=true&lines=1")
    ]
    try:
        new_key = "admin-key-rotated-0123456789"
        keys.write_text(f"{new_key}\n")
        assert d.request("POST", "/swapd/reload", headers=ADMIN)[0] == 200
        assert d.request("POST", "/swapd/models/a/load", headers={"x-api-key": new_key})[0] == 200
        for sock in streams:
            assert _ends_within(sock, 5.0)
        kept = _open_stream(d, "/swapd/events", {"x-api-key": new_key})
        streams.append(kept)
        assert not _ends_within(kept, 1.5)  # a key still listed keeps its stream
    finally:
        for sock in streams:
            sock.close()
