"""The OpenAI-compatible surface: every route forwards, every error is OpenAI-shaped JSON."""

from __future__ import annotations

import http.client
import json
import uuid

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset

from swapd.proxy import JSON_ROUTES, MULTIPART_ROUTES


@pytest.fixture
def daemon(start_daemon: StartDaemon) -> Daemon:
    """One swapd with two fake models and a 4 KiB body limit."""
    return start_daemon(
        {"a": fake_preset("A", aliases=["alpha"]), "b": fake_preset("B")},
        {"max_running": 2, "max_body": "4KiB"},
    )


def _raw(d: Daemon, path: str, body: bytes, content_type: str) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request("POST", path, body, {"Content-Type": content_type})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def _error(body: object) -> dict[str, object]:
    assert isinstance(body, dict)
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "code", "param"}
    return error


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_every_json_route_is_forwarded_by_its_model(daemon: Daemon, route: str) -> None:
    """Each POST route finds the model in the JSON body and reaches that model's backend."""
    status, body = daemon.request("POST", route, {"model": "alpha", "input": "x", "messages": []})
    assert status == 200, body
    assert body["model"] == "alpha"
    if route not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert (body["path"], body["name"]) == (route, "A")


@pytest.mark.parametrize("route", MULTIPART_ROUTES)
def test_transcription_routes_by_the_form_field(daemon: Daemon, route: str) -> None:
    """Multipart routes (/v1/audio/transcriptions, ...) take the model from the form."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nb\r\n',
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\nRIFF....\r\n"
        ),
        f"--{boundary}--\r\n",
    ]
    body = "".join(parts).encode()
    status, data = _raw(daemon, route, body, f"multipart/form-data; boundary={boundary}")
    assert status == 200
    assert data["text"] == "B heard a.wav (8 bytes) model=b"


def test_unknown_model_is_404_listing_the_names(daemon: Daemon) -> None:
    """A model no preset defines gets a 404 that lists the configured names."""
    status, body = daemon.chat("gpt-9")
    assert status == 404
    error = _error(body)
    assert error["code"] == "model_not_found"
    assert error["message"] == "model 'gpt-9' is not configured; known models: a, b"


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"{not json", "application/json", "request body is not valid JSON"),
        (b'{"messages": []}', "application/json", 'request body has no "model" string'),
        (b'["a"]', "application/json", "request body must be a JSON object"),
        (b'{"model": 3}', "application/json", 'request body has no "model" string'),
        # Each says what it got (before: json's "Expecting value: line 1 column 1 (char 0)"
        # for an empty body, and nothing of the kind for the rest).
        (b"", "application/json", "request body is not valid JSON: it is empty"),
        (b'"a"', "application/json", "request body must be a JSON object, not a string"),
        (b'{"model": null}', "application/json", '"model" string: "model" is null'),
        (b'{"model": ""}', "application/json", '"model" string: "model" is an empty string'),
        (b'{"model": ["a"]}', "application/json", '"model" string: "model" is an array'),
    ],
    ids=[
        "bad-json",
        "no-model",
        "not-object",
        "model-not-string",
        "empty",
        "string",
        "null",
        "empty-model",
        "array-model",
    ],
)
def test_unreadable_requests_are_400(
    daemon: Daemon, body: bytes, content_type: str, message: str
) -> None:
    """Bad JSON or a missing model is a 400 saying which."""
    status, data = _raw(daemon, "/v1/chat/completions", body, content_type)
    assert status == 400
    assert message in str(_error(data)["message"])


def test_form_without_model_is_400(daemon: Daemon) -> None:
    """A transcription form with no model field is a 400."""
    body = (
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nzz\r\n--x--\r\n'
    )
    status, data = _raw(daemon, "/v1/audio/transcriptions", body, "multipart/form-data; boundary=x")
    assert status == 400
    assert _error(data)["message"] == 'form has no "model" field'


def test_body_over_the_limit_is_413(daemon: Daemon) -> None:
    """A body larger than max_body is refused with 413 before any model starts."""
    big = {"model": "a", "messages": [{"role": "user", "content": "x" * 5000}]}
    status, data = daemon.request("POST", "/v1/chat/completions", big)
    assert status == 413
    assert _error(data)["code"] == "body_too_large"
    assert daemon.model("a")["state"] == "stopped"


def test_unknown_route_is_openai_shaped_404(daemon: Daemon) -> None:
    """Routes swapd does not serve still answer with the JSON error envelope."""
    status, body = daemon.get("/v1/nothing")
    assert status == 404
    assert _error(body)["type"] == "invalid_request_error"


def test_a_backend_error_that_is_not_json_comes_in_the_envelope(daemon: Daemon) -> None:
    """The backend's own text 400 keeps its status, its text in ``error.message``.

    The scan finds the model without parsing the body, so trailing junk reaches the
    backend, whose refusal is plain text (before, relayed as such: an SDK could not read
    it). ``/upstream/`` still passes the backend's answer as sent.
    """
    body = b'{"model": "a", "messages": []} junk'
    status, data = _raw(daemon, "/v1/chat/completions", body, "application/json")
    assert status == 400
    error = _error(data)
    assert (error["code"], error["type"]) == ("backend_error", "invalid_request_error")
    assert error["message"] == "backend for 'a' answered 400: body is not JSON"
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("POST", "/upstream/a/v1/chat/completions", body)
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (400, b"body is not JSON")
    conn.close()
    assert daemon.chat("b")[0] == 200


@pytest.mark.parametrize("padding", [0, 3 * 1024 * 1024])
def test_a_chunked_backend_error_that_is_not_json_comes_in_the_envelope(
    daemon: Daemon, padding: int
) -> None:
    """An HTML 500 sent in chunks, without a length, is put in the envelope as a sized one is.

    Before, only a sized error was: a chunked one reached the client as HTML. One of 3 MiB
    is read only as far as the message needs, and the next request is answered.
    """
    status, data = daemon.request(
        "POST",
        "/v1/chat/completions",
        {"model": "a", "messages": [], "fake_chunked_error": 500, "fake_error_bytes": padding},
    )
    assert status == 500
    error = _error(data)
    assert (error["code"], error["type"]) == ("backend_error", "server_error")
    message = error["message"]
    assert isinstance(message, str)
    assert message.startswith("backend for 'a' answered 500: <html><body><h1>Internal Server")
    assert ("the backend broke" in message) is (padding == 0)
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    chunked = {"model": "a", "messages": [], "fake_chunked_error": 502}
    conn.request("POST", "/upstream/a/v1/chat/completions", json.dumps(chunked))
    resp = conn.getresponse()
    assert resp.status == 502
    assert resp.getheader("Content-Type", "").startswith("text/html")
    assert b"the backend broke" in resp.read()  # as sent
    conn.close()
    assert daemon.chat("a")[0] == 200
