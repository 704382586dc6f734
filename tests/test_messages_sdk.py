"""Anthropic's Messages API (``/v1/messages``) through swapd, read by the real ``anthropic`` SDK.

The SDK is a test dependency (the ``dev`` extra), not one of swapd's own. The wire
format these tests rely on is also checked without it in ``test_keepalive.py``.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for
from test_keepalive import BLOCKS, SLOW_START

KEY = "inference-key-0123456789"
OTHER_TOKEN = "token-for-another-service"  # noqa: S105 - a test token, known to no one
ECHO = Path(__file__).resolve().parent / "fakes" / "echo_headers.py"
HI = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0}


Connect = Callable[..., Any]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Make Anthropic clients of a swapd, closed at teardown; they do not retry.

    A retry would hide the first answer, which is what these tests look at.
    """
    made: list[Any] = []

    def make(d: Daemon, **options: Any) -> Any:
        options.setdefault("api_key", "unused")
        sdk = anthropic.Anthropic(base_url=f"http://127.0.0.1:{d.port}", max_retries=0, **options)
        made.append(sdk)
        return sdk

    yield make
    for sdk in made:
        sdk.close()


def unload(d: Daemon, model: str) -> None:
    """Stop ``model``, so that its next request is a cold load again."""
    status, _ = d.request("POST", f"/swapd/models/{model}/unload")
    assert status == 200
    wait_for(lambda: d.model(model)["state"] == "stopped")


def test_a_cold_stream_answered_in_json_reaches_the_sdk_whole(
    start_daemon: StartDaemon, connect: Connect
) -> None:
    """After the pings, a backend's JSON message is streamed: both SDK ways get all of it.

    Before, it went out as one unnamed event, which the SDK skips: ``messages.stream``
    raised for a stream with no ``message_start``, and ``create(stream=True)`` gave no
    events at all.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    extra = {"fake_json_answer": True, "fake_content": BLOCKS}
    sdk = connect(d)
    with sdk.messages.stream(model="a", max_tokens=9, messages=HI, extra_body=extra) as stream:
        message = stream.get_final_message()
    assert [block.to_dict() for block in message.content] == BLOCKS
    assert (message.stop_reason, message.usage.output_tokens) == ("tool_use", 5)
    unload(d, "a")
    events = list(
        sdk.messages.create(
            model="a", max_tokens=9, messages=HI, stream=True, extra_body={"fake_json_answer": True}
        )
    )
    assert (events[0].type, events[-1].type) == ("message_start", "message_stop")
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == "A: hi"


def test_a_cold_stream_answered_with_a_json_error_raises_it_in_the_sdk(
    start_daemon: StartDaemon, connect: Connect
) -> None:
    """A backend's ``{"type": "error"}`` JSON after the pings is raised, with its message.

    Before, the SDK skipped the unnamed event and the stream ended empty, without an error.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", SLOW_START)})
    extra = {"fake_anthropic_error": "busy"}
    with (
        pytest.raises(anthropic.APIStatusError) as raised,
        connect(d).messages.stream(
            model="a", max_tokens=9, messages=HI, extra_body=extra
        ) as stream,
    ):
        stream.get_final_message()
    assert (raised.value.api_message, raised.value.type) == ("busy", "overloaded_error")


@pytest.mark.parametrize("start_delay", ["0", SLOW_START])
def test_a_backends_own_events_reach_the_sdk_after_pings_or_none(
    start_daemon: StartDaemon, connect: Connect, start_delay: str
) -> None:
    """The backend's event stream reaches the SDK, after ``: loading`` pings on a cold load.

    The SDK skips the pings (SSE comments); a ready model's JSON answer passes as sent.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", start_delay)})
    sdk = connect(d)
    with sdk.messages.stream(model="a", max_tokens=9, messages=HI) as stream:
        assert "".join(stream.text_stream) == "A: hi"
    message = sdk.messages.create(model="a", max_tokens=9, messages=HI)
    assert [block.text for block in message.content] == ["A: hi"]


def test_swapds_own_errors_raise_sdk_errors_with_swapds_message(
    start_daemon: StartDaemon, connect: Connect
) -> None:
    """Unknown model, no room, a failed start after pings: each a clear SDK exception.

    Before the first ping the error is the HTTP status in swapd's envelope, which the SDK
    reads (``api_message``); after it, a named ``error`` event that the SDK raises.
    """
    d = start_daemon(
        {
            "big": fake_preset("BIG", memory="1000TiB"),
            "dies": fake_preset("D", "--start-delay", SLOW_START, "--exit-at-start", "3"),
        }
    )
    sdk = connect(d)
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.create(model="nope", max_tokens=9, messages=HI)
    assert str(missing.value.api_message).startswith("model 'nope' is not configured")
    for stream in (False, True):
        with pytest.raises(anthropic.InternalServerError) as full:
            sdk.messages.create(model="big", max_tokens=9, messages=HI, stream=stream)
        assert full.value.status_code == 503
        assert "insufficient_memory" in str(full.value.body)
    with (
        pytest.raises(anthropic.APIStatusError) as failed,
        sdk.messages.stream(model="dies", max_tokens=9, messages=HI) as events,
    ):
        events.get_final_message()
    assert "exited with 3" in str(failed.value.api_message)


def test_a_queue_timeout_reaches_the_sdk_as_a_503_with_its_message(
    start_daemon: StartDaemon, connect: Connect
) -> None:
    """A load that waits past ``queue_timeout`` for a busy model: a 503 the SDK raises."""
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B")},
        {"max_running": 1, "queue_timeout": "1s", "max_wait": "60s"},
    )
    sdk = connect(d)
    sdk.messages.create(model="a", max_tokens=9, messages=HI)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(
            sdk.messages.create, model="a", max_tokens=9, messages=HI, extra_body={"fake_delay": 4}
        )
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        with pytest.raises(anthropic.InternalServerError) as timed_out:
            sdk.messages.create(model="b", max_tokens=9, messages=HI, stream=True)
        assert busy.result().content[0].text == "A: hi"
    assert timed_out.value.status_code == 503
    assert timed_out.value.response.headers.get("Retry-After")
    assert "busy models to finish: a" in str(timed_out.value.api_message)


def test_the_sdks_keys_open_swapd_by_either_header(
    start_daemon: StartDaemon, connect: Connect
) -> None:
    """``api_key``, ``auth_token`` and an ``x-api-key`` header each carry swapd's key.

    This SDK sends ``api_key`` as a Bearer token; older ones, and Anthropic's TypeScript
    SDK, send it as ``x-api-key``, beside the Bearer of an ``auth_token`` when both are
    set: swapd's key in either header lets the request in. Without one the SDK raises
    AuthenticationError with swapd's message.
    """
    d = start_daemon({"a": fake_preset("A")}, {"api_keys": [KEY]})
    for sdk in (
        connect(d, api_key=KEY),
        connect(d, api_key=None, auth_token=KEY),
        connect(d, api_key=None, default_headers={"x-api-key": KEY}),
        connect(d, api_key=None, auth_token=OTHER_TOKEN, default_headers={"x-api-key": KEY}),
    ):
        assert sdk.messages.create(model="a", max_tokens=9, messages=HI).content[0].text
    with pytest.raises(anthropic.AuthenticationError) as refused:
        connect(d, api_key="wrong").messages.create(model="a", max_tokens=9, messages=HI)
    assert "carries an unknown key" in str(refused.value.api_message)


def test_anthropic_headers_reach_the_backend_and_the_key_does_not(
    start_daemon: StartDaemon, connect: Connect
) -> None:
    """``anthropic-version`` and ``anthropic-beta`` pass on; ``x-api-key`` stops at swapd.

    The model is found after the messages, where the SDK writes it, past a tool input
    that has a ``model`` of its own; the beta client's ``?beta=true`` reaches the backend.
    """
    preset = {"backend": "command", "cmd": [sys.executable, str(ECHO), "--port", "${PORT}"]}
    d = start_daemon({"echo": preset}, {"api_keys": [KEY]})
    messages: list[Any] = [
        *HI,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"model": "x"}}],
        },
    ]
    raw = connect(d, api_key=KEY).messages.with_raw_response.create(
        model="echo",
        max_tokens=9,
        messages=messages,
        extra_headers={"anthropic-beta": "tools-2024-04-04"},
    )
    seen = raw.http_response.json()
    headers = {
        base64.b64decode(name).decode().lower(): base64.b64decode(value).decode()
        for name, value in seen["headers"]
    }
    sent = raw.http_response.request.headers
    assert headers["anthropic-version"] == sent["anthropic-version"]
    assert headers["anthropic-beta"] == "tools-2024-04-04"
    assert "x-api-key" not in headers
    assert "authorization" not in headers
    body = json.loads(base64.b64decode(seen["body"]))
    assert body["model"] == "echo"
    assert list(body).index("model") > list(body).index("messages")
    assert seen["path"] == "/v1/messages"
    beta = connect(d, api_key=KEY).beta.messages.with_raw_response.create(
        model="echo", max_tokens=9, messages=HI
    )
    sent_to = beta.http_response.request.url
    assert beta.http_response.json()["path"] == sent_to.raw_path.decode()  # the query kept


@pytest.mark.llama
def test_llama_server_answers_the_sdk_through_swapd(
    start_daemon: StartDaemon, connect: Connect, tiny_gguf: Path
) -> None:
    """A real llama-server: a message, a stream and count_tokens, through swapd by the SDK.

    Greedy decoding keeps the answer the same on every run: llama-server leaves out a
    stream's ``message_start`` when its first tokens are bytes of an unfinished UTF-8
    character, which the random weights sample now and then.
    """
    preset = {"backend": "llama-server", "model": str(tiny_gguf), "args": ["-c", "256"]}
    d = start_daemon({"tiny": preset}, {"api_keys": [KEY]})
    sdk = connect(d, api_key=KEY)
    message = sdk.messages.create(model="tiny", max_tokens=4, messages=HI, extra_body=GREEDY)
    assert message.type == "message"
    assert message.usage.output_tokens > 0
    with sdk.messages.stream(model="tiny", max_tokens=4, messages=HI, extra_body=GREEDY) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason in {"max_tokens", "end_turn"}
    assert sdk.messages.count_tokens(model="tiny", messages=HI).input_tokens > 0
