"""Cold-load keepalive: ``: loading`` pings for a streaming request that waits for a load."""

from __future__ import annotations

import gzip
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for

from swapd.keepalive import PING_AFTER, wants_stream
from swapd.proxy import BUFFER_LIMIT

SLOW_START = str(PING_AFTER + 3)  # seconds: long enough for a ping, short for a test


def stream(
    d: Daemon, model: str, *, stream: bool = True, key: str = '"stream"'
) -> tuple[int, str, list[str]]:
    """Status, content type and every line of one chat completion."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body).replace('"stream"', key))
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, resp.headers["Content-Type"], [line for line in text.split("\n") if line]


def data(lines: list[str]) -> list[Any]:
    """The payloads of the ``data:`` lines."""
    return [
        line[6:] if line == "data: [DONE]" else json.loads(line[6:])
        for line in lines
        if line.startswith("data: ")
    ]


def test_a_cold_stream_gets_pings_then_the_backend_events(start_daemon: StartDaemon) -> None:
    """Once the load is admitted and has run a while, pings come first; then the answer."""
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    status, kind, lines = stream(d, "a")
    assert (status, kind) == (200, "text/event-stream")
    assert lines[0] == ": loading"
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert set(lines[:first_data]) == {": loading"}
    events = data(lines)
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == [
        f"A-{i}" for i in range(5)
    ]


def test_a_cold_stream_asked_for_with_an_escaped_key_gets_pings(start_daemon: StartDaemon) -> None:
    r"""``"str\u0065am": true`` is ``stream`` to the backend's JSON parser: pings come too.

    The cheap test for the key looked for its plain spelling alone: such a stream waited
    for its load in silence, and a proxy in front could time it out.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    status, kind, lines = stream(d, "a", key='"str\\u0065am"')
    assert (status, kind) == (200, "text/event-stream")
    assert lines[0] == ": loading"
    assert data(lines)[-1] == "[DONE]"


def test_a_refusal_before_admission_is_a_plain_http_error(start_daemon: StartDaemon) -> None:
    """A load admission refuses is 503 in the JSON envelope: retryable, no stream begun."""
    d = start_daemon({"big": fake_preset("BIG", memory="1000TiB")})
    status, kind, lines = stream(d, "big")
    assert (status, kind) == (503, "application/json; charset=utf-8")
    assert json.loads(lines[0])["error"]["code"] == "insufficient_memory"


def test_an_error_after_the_first_ping_is_an_error_event(start_daemon: StartDaemon) -> None:
    """The status went out with the first ping: a failed start is one data event, then the end."""
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START, "--exit-at-start", "3")})
    status, kind, lines = stream(d, "a")
    assert (status, kind) == (200, "text/event-stream")
    assert lines[0] == ": loading"
    [event] = data(lines)
    assert event["error"]["code"] == "backend_start_failed"
    assert "exited with 3" in event["error"]["message"]
    wait_for(lambda: [e["status"] for e in d.events("request.done")] == [502])  # logged last


def test_an_error_after_pings_on_the_messages_route_is_a_named_event(
    start_daemon: StartDaemon,
) -> None:
    """On Anthropic's route the error event is named ``error``: its SDKs skip unnamed events.

    Before, a load that failed after the pings reached an Anthropic client as an empty
    stream: its SDK skipped the unnamed event and raised nothing. The data holds the same
    error object as on every other route, where the event stays unnamed; on Anthropic's
    it also says ``"type": "error"``, as each event of an Anthropic stream names its type
    (clients that read events by their ``type`` found none before).
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START, "--exit-at-start", "3")})
    for path, name in (("/v1/messages", "error"), ("/v1/chat/completions", None)):
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
        body = {"model": "a", "stream": True, "max_tokens": 5, "messages": []}
        conn.request("POST", path, json.dumps(body))
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        assert resp.status == 200
        [event] = [e for e in text.split("\n\n") if "data: " in e]
        fields = dict(line.split(": ", 1) for line in event.strip("\n").split("\n"))
        assert fields.get("event") == name, event
        error = json.loads(fields["data"])
        assert error["error"]["code"] == "backend_start_failed"
        assert error.get("type") == name  # {"type": "error", ...}, as Anthropic's streams say
        wait_for(lambda: d.model("a")["state"] == "failed")  # each request starts it anew


def test_a_cold_request_that_does_not_stream_gets_no_pings(start_daemon: StartDaemon) -> None:
    """Without ``stream: true`` the answer is the backend's JSON, after the load."""
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    status, kind, lines = stream(d, "a", stream=False)
    assert (status, kind) == (200, "application/json; charset=utf-8")
    assert json.loads(lines[0])["choices"][0]["message"]["content"] == "A: x"


@pytest.mark.parametrize("start_delay", ["0", SLOW_START])
def test_a_cold_stream_whose_backend_dies_as_it_turns_ready_is_leased_again(
    start_daemon: StartDaemon, tmp_path: Path, start_delay: str
) -> None:
    """The backend stops listening at its first healthy answer and exits a second later.

    The request never reached it, so, as in the proxy, swapd waits for the exit and leases
    the request again, which meets the backoff of a start that failed within 60 s of
    becoming ready: a 503, or after pings an error event, with the exit in its message.
    With pings begun the stream got ``backend_gone`` at once instead, the refused
    connection for its error.
    """
    marker = tmp_path / "vanished"
    d = start_daemon(
        {"a": fake_preset("A", "--start-delay", start_delay, "--vanish-when-ready", str(marker))}
    )
    status, kind, lines = stream(d, "a")
    assert marker.exists()  # the first start did vanish
    if start_delay == "0":  # no ping went out: a plain HTTP error
        assert status == 503
        error = json.loads(lines[0])["error"]
    else:
        assert (status, kind) == (200, "text/event-stream")
        [event] = data(lines)
        error = event["error"]
    assert error["code"] == "backoff", error
    assert "exited with 3" in error["message"]
    wait_for(lambda: d.model("a")["state"] in {"backoff", "failed"})
    assert d.model("a")["failures"] == 1
    wait_for(lambda: d.model("a")["state"] == "failed")  # the backoff of 1 s is over
    status, _, lines = stream(d, "a")  # the marker is there: the restart serves
    assert status == 200
    assert data(lines)[-1] == "[DONE]"


def test_a_cold_stream_reaches_the_client_uncompressed(start_daemon: StartDaemon) -> None:
    """A client that accepts gzip, a backend that compresses: the pinged stream is readable.

    The pings' headers are swapd's, with no Content-Encoding, so the backend is asked for
    the stream as is. Before, the client's Accept-Encoding went on, and the backend's
    gzip bytes followed the pings in a stream that says it is not compressed. A ready
    model's stream is the backend's own answer: compressed, and saying so.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    body = {"model": "a", "stream": True, "fake_compress": True, "messages": []}
    for cold in (True, False):
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        assert resp.status == 200
        assert resp.getheader("Content-Encoding") == (None if cold else "gzip")
        text = (raw if cold else gzip.decompress(raw)).decode()
        lines = [line for line in text.split("\n") if line]
        assert (lines[0] == ": loading") is cold
        assert data(lines)[-1] == "[DONE]"


# The ``stream`` values vLLM's request models (pydantic, lax mode) read as true, and some
# they read as false or refuse: only the first get pings.
@pytest.mark.parametrize(
    ("value", "streams"),
    [
        (True, True),
        (1, True),
        (1.0, True),
        *((text, True) for text in ("true", "True", "TRUE", "1", "yes", "on", "t", "y", "Y")),
        (False, False),
        (0, False),
        (2, False),
        (None, False),
        ([], False),
        ({}, False),
        *((text, False) for text in ("false", "0", "no", "off", "", " true", "truthy")),
    ],
    ids=repr,
)
def test_which_stream_values_ask_for_a_stream(value: object, streams: bool) -> None:
    """``"stream": "true"`` or ``1`` streams on vLLM as ``true`` does."""
    assert wants_stream(json.dumps({"model": "a", "stream": value}).encode()) is streams


def test_a_cold_stream_asked_for_with_a_string_or_a_number_gets_pings(
    start_daemon: StartDaemon,
) -> None:
    """vLLM streams for ``"stream": "true"`` and ``"stream": 1``: such a wait is pinged too.

    Before, only the JSON boolean counted: those streams waited for their load in silence,
    and a proxy in front could time them out.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    for value in ('"true"', "1"):
        status, kind, lines = stream(d, "a", key=f'"stream": {value}, "x"')
        assert (status, kind) == (200, "text/event-stream"), value
        assert lines[0] == ": loading", value
        assert data(lines)[-1] == "[DONE]"
        status, _ = d.request("POST", "/swapd/models/a/unload")
        assert status == 200
        wait_for(lambda: d.model("a")["state"] == "stopped")


def transcribe(d: Daemon, fields: dict[str, bytes]) -> tuple[int, str, list[str]]:
    """Status, content type and every line of one transcription of a small upload."""
    form = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (name.encode(), value)
        for name, value in fields.items()
    )
    form += b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    form += b"RIFF1234\r\n--b--\r\n"
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    conn.request("POST", "/v1/audio/transcriptions", form, headers)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, resp.headers["Content-Type"], [line for line in text.split("\n") if line]


def test_a_cold_streamed_transcription_gets_pings(start_daemon: StartDaemon) -> None:
    """A form whose ``stream`` field is true streams on vLLM: its wait is pinged too.

    Before, multipart routes never pinged: a streamed transcription waiting for a cold
    load stayed silent until the backend answered. The form reaches the backend as the
    proxy sends it, its model renamed; one that does not stream is answered in JSON.
    """
    preset = fake_preset("A", "--start-delay", SLOW_START, use_model_name="org/whisper")
    d = start_daemon({"a": preset})
    status, kind, lines = transcribe(d, {"model": b"a", "stream": b"true"})
    assert (status, kind) == (200, "text/event-stream")
    assert lines[0] == ": loading"
    events = data(lines)
    assert events[-1] == "[DONE]"
    heard = " ".join(e["choices"][0]["delta"]["content"] for e in events[:-1])
    assert heard == "A heard a.wav (8 bytes) model=org/whisper"
    status, _ = d.request("POST", "/swapd/models/a/unload")
    assert status == 200
    wait_for(lambda: d.model("a")["state"] == "stopped")
    status, kind, lines = transcribe(d, {"model": b"a", "stream": b"false"})
    assert (status, kind) == (200, "application/json; charset=utf-8")
    assert json.loads(lines[0]) == {"text": "A heard a.wav (8 bytes) model=org/whisper"}


def events_of(text: str) -> list[str]:
    """The data of each event of a stream (its data lines joined, as SSE clients do)."""
    found = []
    for event in text.split("\n\n"):
        lines = [line[6:] for line in event.split("\n") if line.startswith("data: ")]
        if lines:
            found.append("\n".join(lines))
    return found


def cold_json_answer(d: Daemon, path: str, **fake: Any) -> str:
    """The pinged stream of a cold request whose backend answers in JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
    body = {"model": "a", "stream": True, "fake_json_answer": True, "messages": [], **fake}
    conn.request("POST", path, json.dumps(body))
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert (resp.status, resp.headers["Content-Type"]) == (200, "text/event-stream")
    assert text.startswith(": loading\n\n")
    status, _ = d.request("POST", "/swapd/models/a/unload")
    assert status == 200
    wait_for(lambda: d.model("a")["state"] == "stopped")
    return text


def test_a_json_answer_to_a_cold_stream_is_one_data_event(start_daemon: StartDaemon) -> None:
    """A backend that answers a pinged stream in JSON: the JSON is one event, then [DONE].

    A backend that takes only a JSON ``true`` for a stream answers ``"stream": "true"`` so,
    say. Before, its JSON went raw into the stream the pings opened, where SSE clients skip
    what is not an event: the answer was empty. Every line of the JSON (here indented over
    many) is a ``data:`` line of the one event. On Anthropic's route, JSON that is neither
    a message nor an error is one event too, unnamed, and with no [DONE], which is
    OpenAI's. A JSON answer too long to hold ends the stream with an error event instead.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    text = cold_json_answer(d, "/v1/chat/completions")
    answer, done = events_of(text)
    assert json.loads(answer)["object"] == "chat.completion"
    assert "\n" in answer  # indented: many data lines
    assert done == "[DONE]"
    assert text.endswith("\n\n")
    text = cold_json_answer(d, "/v1/messages", fake_content="not blocks")
    [answer] = events_of(text)
    assert json.loads(answer)["content"] == "not blocks"
    assert "event:" not in text
    [event] = events_of(cold_json_answer(d, "/v1/chat/completions", fake_json_pad=BUFFER_LIMIT))
    assert json.loads(event)["error"]["code"] == "backend_gone"


def named_events(text: str) -> list[tuple[str | None, Any]]:
    """Each event of a stream: its name (None when it has none) and its parsed data."""
    found = []
    for event in text.split("\n\n"):
        fields = [line.split(": ", 1) for line in event.split("\n") if ": " in line]
        data = "\n".join(value for name, value in fields if name == "data")
        if data:
            name = next((value for field, value in fields if field == "event"), None)
            found.append((name, json.loads(data)))
    return found


# A message with every kind of block whose fields Anthropic streams, and one it sends whole.
BLOCKS = [
    {"type": "thinking", "thinking": "Let me see.\nTwo lines.", "signature": "c2lnbmVk"},
    {"type": "redacted_thinking", "data": "b3BhcXVl"},
    {"type": "text", "text": "Here is the weather: ", "citations": None},
    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Zürich", "n": 2}},
]


def test_a_json_message_to_a_cold_stream_on_the_messages_route_is_its_stream_of_events(
    start_daemon: StartDaemon,
) -> None:
    """A backend's JSON message after the pings goes out as Anthropic streams a message.

    Before, it went out as one unnamed event, which Anthropic's SDKs skip: the client saw
    an empty stream. Now each event is named, and the deltas rebuild every block.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    events = named_events(cold_json_answer(d, "/v1/messages", fake_content=BLOCKS))
    assert all(name == data["type"] for name, data in events), events
    start, delta, stop = "content_block_start", "content_block_delta", "content_block_stop"
    assert [name for name, _ in events] == [
        "message_start",
        *(start, delta, delta, stop),  # thinking, then its signature
        *(start, stop),  # redacted thinking: whole at the start
        *(start, delta, stop),
        *(start, delta, stop),
        "message_delta",
        "message_stop",
    ]
    first = events[0][1]["message"]
    assert (first["content"], first["stop_reason"], first["role"]) == ([], None, "assistant")
    rebuilt: list[dict[str, Any]] = []
    for _, data in events:  # as the SDKs accumulate a stream
        if data["type"] == "content_block_start":
            assert data["index"] == len(rebuilt)
            rebuilt.append(dict(data["content_block"]))
        elif data["type"] == "content_block_delta":
            block, change = rebuilt[data["index"]], data["delta"]
            kind = change["type"]
            if kind == "input_json_delta":
                block["input"] = json.loads(change["partial_json"])
            else:
                field = {"text_delta": "text", "thinking_delta": "thinking"}.get(kind, "signature")
                block[field] = block.get(field, "") + change[field]
    assert rebuilt == BLOCKS
    [end] = [data for _, data in events if data["type"] == "message_delta"]
    assert end["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert end["usage"] == {"input_tokens": 3, "output_tokens": 5}
    assert events[-1] == ("message_stop", {"type": "message_stop"})


def test_a_json_error_to_a_cold_stream_on_the_messages_route_is_an_error_event(
    start_daemon: StartDaemon,
) -> None:
    """A backend's ``{"type": "error"}`` JSON after the pings is ``event: error``, as sent.

    Before, it was one unnamed event, which Anthropic's SDKs skip: no error was raised.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    events = named_events(cold_json_answer(d, "/v1/messages", fake_anthropic_error="busy"))
    error = {"type": "overloaded_error", "message": "busy"}
    assert events == [("error", {"type": "error", "error": error})]
