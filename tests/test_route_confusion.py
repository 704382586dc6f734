"""A request is routed to the model its backend will read, never by bytes a parser reads otherwise.

And a monitor's passive scrape takes nothing from clients. Real swapd, fake backends.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from daemon import Daemon, fake_preset, wait_for

from swapd.errors import BadRequest
from swapd.proxy import model_from_json, model_from_multipart

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import StartDaemon

FORM = "multipart/form-data; boundary=bnd"


def post(d: Daemon, path: str, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    """POST raw bytes; the status and the JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": content_type})
        resp = conn.getresponse()
        answer: dict[str, Any] = json.loads(resp.read())
        return resp.status, answer
    finally:
        conn.close()


def test_a_json_body_in_utf16_is_refused(start_daemon: StartDaemon) -> None:
    """A Python backend reads UTF-16 JSON; swapd's scan reads bytes: the two would differ.

    Here the bytes ``,"model":"b","`` are seven characters inside a string of a body whose
    model is ``a``: routed by the scan, a's request would have gone to b.
    """
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    hidden = b',"model":"b","'.decode("utf-16-be")
    body = ('{"model":"a","x":"' + "p" * 600 + hidden + '"}').encode("utf-16-be")
    assert json.loads(body)["model"] == "a"
    status, answer = post(d, "/v1/score", body, "application/json")
    assert status == 400
    assert "UTF-8" in answer["error"]["message"]
    assert d.model("b")["state"] == "stopped"


@pytest.mark.parametrize(
    "start", [b"\xff\xfe{", b"\xfe\xff\x00{", b"{\x00", b"\x00\x00\x00{", b"\xff\xfe\x00\x00{"]
)
def test_json_in_utf16_or_utf32_is_refused_whatever_its_start(start: bytes) -> None:
    """Byte order marks, or a NUL in the first four bytes: what json.loads reads as UTF-16/32."""
    with pytest.raises(BadRequest, match="UTF-8"):
        model_from_json(start + b'"model":"a"}')


def test_a_form_is_cut_at_delimiters_that_start_a_line(start_daemon: StartDaemon) -> None:
    """The boundary's bytes inside a file are no delimiter: the form's own model field wins."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    hidden = b'RIFF....--bnd\r\nContent-Disposition: form-data; name="model"\r\n\r\nb\r\n'
    form = (
        b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + hidden + b"\r\n"
        b'--bnd\r\nContent-Disposition: form-data; name="model"\r\n\r\na\r\n--bnd--\r\n'
    )
    status, answer = post(d, "/v1/audio/transcriptions", form, FORM)
    assert status == 200, answer
    assert answer["text"].startswith("A heard")
    assert d.model("b")["state"] == "stopped"


def form(*fields: bytes) -> bytes:
    """A form of these parts (each its Content-Disposition parameters and value)."""
    parts = [b"--bnd\r\nContent-Disposition: form-data; " + f + b"\r\n" for f in fields]
    return b"".join(parts) + b"--bnd--\r\n"


def test_a_form_with_two_model_fields_is_refused() -> None:
    """Form parsers differ on which of two fields counts: neither is guessed."""
    body = form(b'name="model"\r\n\r\na', b'name="model"\r\n\r\nb')
    with pytest.raises(BadRequest, match="more than one"):
        model_from_multipart(body, FORM)


def test_a_bare_field_name_is_read() -> None:
    """``name=model`` without quotes is a valid parameter (RFC 2183)."""
    assert model_from_multipart(form(b"name=model\r\n\r\nwhisper"), FORM) == "whisper"


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data; boundary=bnd; boundary=other",
        "multipart/form-data; xboundary=bnd",
        "multipart/form-datax; boundary=bnd",
    ],
)
def test_a_form_type_without_one_clear_boundary_is_refused(content_type: str) -> None:
    """Two boundaries (parsers differ on which), or none under its own name."""
    with pytest.raises(BadRequest, match="one boundary"):
        model_from_multipart(form(b'name="model"\r\n\r\na'), content_type)


def test_an_encoded_upstream_prefix_names_the_model_after_it(start_daemon: StartDaemon) -> None:
    """``/%75pstream/a/props`` is routed as ``/upstream/a/props``: to a, not to ``m``."""
    d = start_daemon({"a": fake_preset("A"), "m": fake_preset("M")})
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    try:
        conn.request("GET", "/%75pstream/a/props")
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert d.model("a")["state"] == "ready"
    assert d.model("m")["state"] == "stopped"


def test_a_passive_scrape_takes_no_queue_place(start_daemon: StartDaemon) -> None:
    """concurrency 1, max_queue 1: a request runs, a monitor's scrape waits behind it.

    The next client still gets the one queue place, not a 429.
    """
    d = start_daemon({"a": fake_preset("A", concurrency=1, max_queue=1)})
    assert d.chat("a")[0] == 200
    results: dict[str, Any] = {}

    def run(name: str, call: Callable[[], Any]) -> None:
        results[name] = call()

    slow = threading.Thread(target=run, args=("slow", lambda: d.chat("a", fake_delay=3)))
    slow.start()
    wait_for(lambda: d.model("a")["in_flight"] == 1)
    scrape = threading.Thread(
        target=run, args=("scrape", lambda: d.get("/upstream/a/props?autoload=false"))
    )
    scrape.start()
    # Nothing shows a passive wait (that is the point): give the scrape time to reach it.
    time.sleep(0.5)
    assert scrape.is_alive()
    status, body = d.chat("a")
    slow.join()
    scrape.join()
    assert status == 200, body
    assert results["slow"][0] == 200
    assert results["scrape"][0] == 200
