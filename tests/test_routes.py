"""The routes clients were missing: one model's object, count_tokens, backend routes."""

from __future__ import annotations

import http.client
import json
import urllib.request
from pathlib import Path

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for

from swapd.passthrough import ENGINE_ROUTES, take_autoload

INFERENCE_KEY = "inference-key-0123456789"
ADMIN_KEY = "admin-key-0123456789abcdef"


@pytest.fixture
def two(start_daemon: StartDaemon) -> Daemon:
    """Models ``a`` (alias ``alpha``) and ``org/b``, neither loaded."""
    b = {**fake_preset("B"), "name": "org/b"}
    return start_daemon({"a": fake_preset("A", aliases=["alpha"]), "b": b})


def test_one_model_is_found_by_name_alias_or_a_name_with_a_slash(two: Daemon) -> None:
    """``GET /v1/models/{id}`` (the SDKs' models.retrieve) answers without loading anything."""
    for asked, name in (("a", "a"), ("alpha", "a"), ("org/b", "org/b")):
        status, body = two.get(f"/v1/models/{asked}")
        assert status == 200, body
        assert (body["id"], body["object"], body["status"]) == (name, "model", "stopped")
    status, body = two.get("/v1/models/nope")
    assert status == 404
    assert body["error"]["code"] == "model_not_found"
    assert {m["state"] for m in two.get("/swapd/status")[1]["models"]} == {"stopped"}


@pytest.mark.parametrize("path", ["/v1/messages/count_tokens", *ENGINE_ROUTES])
def test_routes_whose_body_names_the_model_reach_its_backend(two: Daemon, path: str) -> None:
    """Anthropic's count_tokens and the engines' own routes go to the model in the body."""
    status, body = two.request("POST", path, {"model": "alpha", "content": "hi"})
    assert status == 200, body
    assert (body["path"], body["name"]) == (path, "A")


def test_the_upstream_passthrough_reaches_any_backend_path(two: Daemon) -> None:
    """``/upstream/{model}/{path}``: any method, the query kept, names with slashes too."""
    status, body = two.get("/upstream/org/b/props?fields=a%20b&n=1")
    assert status == 200, body
    assert body == {"name": "B", "path": "/props", "query": "fields=a b&n=1"}  # as aiohttp reads it
    status, body = two.request("POST", "/upstream/alpha/tokenize", {"content": "hi"})
    assert (status, body["path"], body["name"]) == (200, "/tokenize", "A")
    status, body = two.get("/upstream/nope/props")
    assert status == 404
    assert body["error"]["code"] == "model_not_found"


def test_a_percent_encoded_name_reaches_its_model_through_the_passthrough(two: Daemon) -> None:
    """``/upstream/org%2Fb/props`` is ``org/b``, as ``/v1/models/org%2Fb`` is (before: 404)."""
    for quoted in ("org%2Fb", "org%2fb", "%6Frg/b"):
        status, body = two.get(f"/upstream/{quoted}/props")
        assert status == 200, body
        assert (body["name"], body["path"]) == ("B", "/props")
    assert two.get("/v1/models/org%2Fb")[1]["id"] == "org/b"


def test_head_and_utf8_headers_pass_through_as_the_backend_sent_them(two: Daemon) -> None:
    """HEAD ends at its headers (the answer's size kept), and UTF-8 header bytes round-trip.

    A HEAD once waited for the body its Content-Length announced; a UTF-8 file name came
    out encoded twice.
    """
    conn = http.client.HTTPConnection("127.0.0.1", two.port, timeout=30)
    conn.request("GET", "/upstream/a/props")
    got = conn.getresponse()
    body = got.read()
    disposition = got.getheader("Content-Disposition", "")
    assert disposition.encode("latin-1") == 'attachment; filename="résumé.json"'.encode()
    conn.request("HEAD", "/upstream/a/props")  # the same connection: nothing left unread
    head = conn.getresponse()
    assert head.read() == b""
    assert (head.status, head.getheader("Content-Length")) == (200, str(len(body)))
    conn.request("GET", "/upstream/a/props")
    assert json.loads(conn.getresponse().read())["path"] == "/props"
    conn.close()


@pytest.mark.parametrize(
    "path",
    [
        "/sleep?level=1",
        "/wake_up",
        "/collective_rpc",
        "/sleep/",
        # spelled so that a backend reads /sleep or /wake_up all the same
        "//sleep",
        "/%73leep?level=1",
        "/wake%5Fup",
        "/x/../sleep",
        "/./sleep",
        "/%2e%2e/sleep",
        "/sleep;x",
        "/api/sleep",  # a backend under a root path (vLLM's --root-path) routes it as /sleep
        "/api/%73leep",
        "//x/sleep",
    ],
)
def test_routes_swapd_drives_itself_are_refused_through_the_passthrough(
    two: Daemon, path: str
) -> None:
    """vLLM's sleep and wake (swapd's tiers rest on them) and its RPC routes stay swapd's."""
    status, body = two.request("POST", f"/upstream/a{path}", {})
    assert status == 403
    assert body["error"]["code"] == "upstream_route_reserved"
    assert two.model("a")["state"] == "stopped"  # refused before any lease


@pytest.mark.parametrize(
    "path", ["/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache", "/server_info"]
)
def test_vllms_development_routes_are_refused_for_a_vllm_model(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path, path: str
) -> None:
    """On only because swapd asks vLLM for sleep mode (VLLM_SERVER_DEV_MODE=1)."""
    model = tmp_path / "hf-model"
    model.mkdir()
    v = {"backend": "vllm", "model": str(model), "binary": vllm_binary}
    d = start_daemon({"v": v})
    status, body = d.request("POST", f"/upstream/v{path}", {})
    assert status == 403
    assert body["error"]["code"] == "upstream_route_reserved"
    assert d.model("v")["state"] == "stopped"  # refused before any lease


def test_another_engines_route_of_a_vllm_development_name_passes(two: Daemon) -> None:
    """SGLang's ``GET /server_info`` is its own: reserved for vLLM models only (before: 403)."""
    status, body = two.get("/upstream/a/server_info?x=1")
    assert status == 200, body
    assert (body["name"], body["path"], body["query"]) == ("A", "/server_info", "x=1")


def test_a_path_that_would_read_as_a_host_reaches_the_backend_as_a_path(two: Daemon) -> None:
    """``//x/props`` once went out as a host ``x`` and the path ``/props``: now ``/x/props``.

    A fragment, which has no place in a request, is refused.
    """
    status, body = two.get("/upstream/a//x/props")
    assert status == 404, body  # the backend's own answer: it has no /x/props
    assert two.model("a")["state"] == "ready"
    status, body = two.get("/upstream/a//props")
    assert (status, body["path"]) == (200, "/props")
    conn = http.client.HTTPConnection("127.0.0.1", two.port, timeout=30)
    conn.request("POST", "/upstream/a/sleep#x", b"{}")
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 400
    assert "#" in answer["error"]["message"]


def test_the_passthrough_leases_like_any_request(start_daemon: StartDaemon) -> None:
    """It loads the model, counts as a use (TTL) and needs an inference key once keys exist."""
    keys = {"api_keys": [INFERENCE_KEY], "admin_keys": [ADMIN_KEY]}
    d = start_daemon({"a": fake_preset("A", ttl="1h")}, keys)
    assert d.get("/upstream/a/props")[0] == 401
    key = {"Authorization": f"Bearer {INFERENCE_KEY}"}
    request = urllib.request.Request(d.url + "/upstream/a/props", headers=key)  # noqa: S310
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
        assert resp.status == 200
        assert resp.headers["X-Request-Id"]
    view = d.model("a", {"x-api-key": ADMIN_KEY})
    assert view["state"] == "ready"
    assert view["last_used"] is not None
    assert view["ttl_left"] is not None


def test_a_method_a_route_does_not_take_is_405_with_allow(start_daemon: StartDaemon) -> None:
    """In the envelope, and saying which methods the route takes (RFC 9110 requires Allow)."""
    d = start_daemon({"a": fake_preset("A")})
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request("DELETE", "/swapd/status")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 405
    assert body["error"]["type"] == "invalid_request_error"
    assert "GET" in (resp.getheader("Allow") or "")
    # The message says what was asked and what works (before: only "Method Not Allowed").
    assert "DELETE /swapd/status takes GET" in body["error"]["message"]


def test_an_unknown_route_names_itself_in_the_404(start_daemon: StartDaemon) -> None:
    """A trailing slash or a typo reads as such, not as a bare "Not Found"."""
    d = start_daemon({"a": fake_preset("A")})
    status, body = d.request("POST", "/v1/chat/completions/", {"model": "a"})
    assert status == 404
    assert body["error"]["code"] is None
    assert body["error"]["message"] == "Not Found: no route POST /v1/chat/completions/"


def test_a_passive_upstream_request_never_loads_its_model(two: Daemon) -> None:
    """``?autoload=false`` on a stopped model: 409 ``model_not_loaded``, and nothing starts."""
    status, body = two.get("/upstream/a/props?autoload=false")
    assert status == 409
    assert body["error"]["code"] == "model_not_loaded"
    assert "is stopped" in body["error"]["message"]
    assert two.events("backend.spawn") == []
    assert two.get("/upstream/a/props?autoload=maybe")[0] == 400
    assert two.model("a")["state"] == "stopped"


def test_a_passive_upstream_request_reaches_a_ready_model_without_its_autoload(
    two: Daemon,
) -> None:
    """Served while ready; the backend sees the rest of the query; its last use stays."""
    assert two.chat("a")[0] == 200
    used = two.model("a")["last_used"]
    status, body = two.get("/upstream/a/props?n=1&autoload=false&m=2")
    assert (status, body["query"]) == (200, "n=1&m=2")
    status, body = two.get("/upstream/a/props?autoload=true")
    assert (status, body["query"]) == (200, "")
    assert two.model("a")["last_used"] > used  # an autoload=true request is a use
    used = two.model("a")["last_used"]
    assert two.get("/upstream/a/props?autoload=0")[0] == 200
    # The view reads last_used on the wall clock, worked out anew each time: the same use
    # reads a few hundred nanoseconds apart, a new one at least a round trip later.
    assert two.model("a")["last_used"] == pytest.approx(used, abs=1e-4)


def test_passive_scrapes_do_not_keep_a_model_past_its_ttl(start_daemon: StartDaemon) -> None:
    """A monitor scraping ``/upstream/a/metrics?autoload=false`` lets the TTL run out.

    Each scrape ends before the next; before, each one started the TTL over and the model
    stayed loaded for as long as it was watched.
    """
    d = start_daemon({"a": fake_preset("A", ttl="2s")})
    assert d.chat("a")[0] == 200

    def scraped_until_stopped() -> bool:
        status, _ = d.get("/upstream/a/props?autoload=false")
        return status == 409

    wait_for(scraped_until_stopped)  # 409 from the moment it is no longer ready
    wait_for(lambda: d.model("a")["state"] == "stopped")
    # The TTL stopped it. A scrape that came while the expiry read memory defers it to
    # that scrape's end (the model was busy), so it may expire more than once.
    assert {e["model"] for e in d.events("model.ttl.expire")} == {"a"}


def test_a_percent_encoded_autoload_is_read_as_autoload() -> None:
    """``%61utoload=false`` is the same parameter: passive, and not sent on to the backend."""
    assert take_autoload("%61utoload=false&n=1") == ("n=1", False)
    assert take_autoload("n=1&autoload=%66alse") == ("n=1", False)
    assert take_autoload("n=%25autoload") == ("n=%25autoload", True)
