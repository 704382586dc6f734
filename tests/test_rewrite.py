"""Request rewriting: ``use_model_name`` and ``filters`` (strip_params, set_params) per preset.

The backend is a real subprocess that echoes the bytes it received; only JSON routes
are rewritten, and a preset without the keys forwards the client's bytes unchanged.
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon

from swapd.config import load_config
from swapd.errors import BadRequest, ConfigErrors
from swapd.rewrite import Filters, rewrite

ECHO = Path(__file__).resolve().parent / "fakes" / "echo_headers.py"
ECHO_CMD = [sys.executable, str(ECHO), "--port", "${PORT}"]
REWRITING = {
    "backend": "command",
    "cmd": ECHO_CMD,
    "aliases": ["qwen"],
    "use_model_name": "Qwen/Qwen3-8B",
    "filters": {
        "strip_params": ["top_k", "min_p"],
        "set_params": {"temperature": 0.6, "chat_template_kwargs": {"enable_thinking": False}},
    },
}
PLAIN = {"backend": "command", "cmd": ECHO_CMD}
OK_PRESET = 'backend: command\ncmd: ["true", "${PORT}"]\n'


def send(
    d: Daemon, path: str, body: bytes, content_type: str = "application/json"
) -> tuple[int, bytes]:
    """POST ``body`` as these exact bytes; the status and the answer's bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def received(answer: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The body and headers the echo backend got, from its JSON answer or its one event."""
    if answer.startswith((b"data: ", b": loading")):
        event = next(
            line for line in answer.split(b"\n") if line.startswith(b"data: {")
        ).removeprefix(b"data: ")
        echoed = json.loads(event)
    else:
        echoed = json.loads(answer)
    headers = {base64.b64decode(k).lower(): base64.b64decode(v) for k, v in echoed["headers"]}
    return base64.b64decode(echoed["body"]), headers


def chat_body(model: str, **extra: Any) -> bytes:
    """A chat request the client's way, with the keys the filters act on."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi \u2713"}],
        "top_k": 20,
        "min_p": 0.05,
        "temperature": 1.0,
        "seed": 7,
        **extra,
    }
    return json.dumps(body).encode()


def assert_rewritten(sent: dict[str, Any], got: bytes, headers: dict[bytes, bytes]) -> None:
    """The backend got the renamed model, no stripped key, the set keys, the rest as sent."""
    data = json.loads(got)
    assert data["model"] == "Qwen/Qwen3-8B"
    assert "top_k" not in data
    assert "min_p" not in data
    assert data["temperature"] == 0.6
    assert data["chat_template_kwargs"] == {"enable_thinking": False}
    assert (data["messages"], data["seed"]) == (sent["messages"], sent["seed"])
    assert int(headers[b"content-length"]) == len(got)  # sized for the new body


def test_the_backend_gets_the_renamed_model_and_filtered_body(start_daemon: StartDaemon) -> None:
    """By name and by alias: use_model_name replaces the model, strip and set apply."""
    d = start_daemon({"rw": REWRITING})
    for model in ("rw", "qwen"):
        body = chat_body(model)
        status, answer = send(d, "/v1/chat/completions", body)
        assert status == 200, answer
        assert_rewritten(json.loads(body), *received(answer))
    # Every JSON route, the llama-server ones swapd adds too.
    for path in ("/v1/completions", "/v1/embeddings", "/tokenize"):
        status, answer = send(d, path, chat_body("qwen"))
        assert status == 200, answer
        assert json.loads(received(answer)[0])["model"] == "Qwen/Qwen3-8B"


def test_a_streamed_request_is_rewritten(start_daemon: StartDaemon) -> None:
    """``"stream": true`` to a ready model: the backend's stream carries the rewritten body."""
    d = start_daemon({"rw": REWRITING})
    body = chat_body("qwen", stream=True)
    status, answer = send(d, "/v1/chat/completions", body)
    assert status == 200, answer
    assert answer.endswith(b"data: [DONE]\n\n")
    assert_rewritten(json.loads(body), *received(answer))


def test_a_stream_that_waited_behind_pings_is_rewritten(start_daemon: StartDaemon) -> None:
    """A cold stream gets ``: loading`` pings, then the backend's answer to the rewritten body.

    The backend takes 4 s to start, past the 3 s after which pings begin: the request is
    sent on the pings' own path, not the proxy's.
    """
    slow = f"sleep 4 && exec {sys.executable} {ECHO} --port ${{PORT}}"
    d = start_daemon({"rw": {**REWRITING, "cmd": ["/bin/sh", "-c", slow]}})
    body = chat_body("rw", stream=True)
    status, answer = send(d, "/v1/chat/completions", body)
    assert status == 200, answer
    assert answer.startswith(b": loading\n\n")
    assert_rewritten(json.loads(body), *received(answer))


def test_a_preset_without_rewriting_forwards_the_exact_bytes(start_daemon: StartDaemon) -> None:
    """No use_model_name, no filters: the body is not parsed again nor re-serialised.

    Odd spacing, key order, ``1.0e0`` and an escaped character would all change if it were.
    """
    d = start_daemon({"plain": PLAIN, "rw": REWRITING})
    body = b'{ "model" :  "plain",\n  "top_k":1 , "x": 1.0e0, "s": "\\u00e9" }  '
    status, answer = send(d, "/v1/chat/completions", body)
    assert status == 200, answer
    got, headers = received(answer)
    assert got == body
    assert int(headers[b"content-length"]) == len(body)


def test_upstream_bodies_go_as_sent(start_daemon: StartDaemon) -> None:
    """``/upstream/`` is never rewritten: the backend gets the client's bytes."""
    d = start_daemon({"rw": REWRITING})
    body = b'{"model": "rw", "top_k": 1}'
    status, answer = send(d, "/upstream/rw/v1/chat/completions", body)
    assert status == 200, answer
    assert received(answer)[0] == body


def test_a_form_gets_the_renamed_model_and_nothing_else(start_daemon: StartDaemon) -> None:
    """A multipart form's ``model`` field is renamed by use_model_name, as a JSON body's is.

    A backend that knows only its own name (vLLM's ``--served-model-name``, a server that
    loads what the form names) would answer 404 to the client's alias. Every other byte
    of the form goes as sent: the filters act on JSON bodies only. A preset without
    use_model_name forwards the form as it came.
    """
    d = start_daemon({"rw": REWRITING, "plain": PLAIN})
    form = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        b"RIFF\x00model\r\n"
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n%s\r\n'
        b'--b\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n1\r\n--b--\r\n'
    )
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits"):
        status, answer = send(d, path, form % b" qwen ", "multipart/form-data; boundary=b")
        assert status == 200, answer
        got, headers = received(answer)
        assert got == form % b"Qwen/Qwen3-8B"
        assert int(headers[b"content-length"]) == len(got)
    sent = form % b"plain"
    status, answer = send(d, "/v1/audio/transcriptions", sent, "multipart/form-data; boundary=b")
    assert status == 200, answer
    assert received(answer)[0] == sent


def test_a_body_that_is_not_valid_json_is_refused(start_daemon: StartDaemon) -> None:
    """A body whose model the scan finds but that does not parse: 400, as at the edge."""
    d = start_daemon({"rw": REWRITING})
    status, answer = send(d, "/v1/chat/completions", b'{"model": "rw", "top_k": }')
    assert status == 400, answer
    assert "not valid JSON" in json.loads(answer)["error"]["message"]


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"NaN"])
def test_a_number_no_json_can_write_back_is_refused_never_sent_as_infinity(number: bytes) -> None:
    """A body whose number no JSON can write back is a 400, never sent as ``Infinity``.

    ``1e400`` parses as infinity (``NaN`` as nan); before, it went out as ``Infinity``.
    """
    body = b'{"model": "rw", "logit_bias": {"1": ' + number + b"}}"
    with pytest.raises(BadRequest, match="cannot be written back as JSON"):
        rewrite(body, "Qwen/Qwen3-8B", Filters(strip=("top_k",)))


def test_a_reload_of_the_filters_applies_in_place(start_daemon: StartDaemon) -> None:
    """New filters and a new use_model_name apply at once, on the same backend process."""
    d = start_daemon({"rw": REWRITING})
    assert send(d, "/v1/chat/completions", chat_body("rw"))[0] == 200
    before = d.model("rw")["pid"]
    assert before is not None
    d.presets = {
        "rw": {
            **REWRITING,
            "use_model_name": "other",
            "filters": {"strip_params": ["seed"], "set_params": {"top_k": 5}},
        }
    }
    d.write()
    status, plan = d.request("POST", "/swapd/reload")
    assert status == 200, plan
    assert plan["in_place"] == ["rw"]
    status, answer = send(d, "/v1/chat/completions", chat_body("rw"))
    assert status == 200, answer
    data = json.loads(received(answer)[0])
    assert (data["model"], data["top_k"], data["min_p"]) == ("other", 5, 0.05)
    assert "seed" not in data
    assert d.model("rw")["pid"] == before
    # Removed again: the client's bytes once more.
    d.presets = {"rw": PLAIN}
    d.write()
    assert d.request("POST", "/swapd/reload")[1]["in_place"] == ["rw"]
    body = chat_body("rw")
    assert received(send(d, "/v1/chat/completions", body)[1])[0] == body
    assert d.model("rw")["pid"] == before


def errors_of(root: Path, preset: str, config: str = "") -> list[str]:
    """The errors loading swapd.yaml and presets/m.yaml reports, from ``root``."""
    (root / "swapd.yaml").write_text(textwrap.dedent(config))
    (root / "presets").mkdir()
    (root / "presets" / "m.yaml").write_text(OK_PRESET + textwrap.dedent(preset))
    with pytest.raises(ConfigErrors) as info:
        load_config(root / "swapd.yaml")
    return [str(e).removeprefix(f"{root}/") for e in info.value.errors]


BAD = [
    pytest.param(
        """\
        filters:
          set_params: {temperature: 0.6, model: x}
        """,
        "presets/m.yaml:4:34: filters.set_params: model cannot be set here; "
        "use_model_name sets the model the backend receives",
        id="set-model",
    ),
    pytest.param(
        """\
        filters:
          strip_params:
            - top_k
            - model
        """,
        "presets/m.yaml:6:7: filters.strip_params: model cannot be stripped; "
        "use_model_name sets the model the backend receives",
        id="strip-model",
    ),
    pytest.param(
        """\
        filters:
          set_params: {stream: false}
        """,
        "presets/m.yaml:4:16: filters.set_params: stream cannot be set here; "
        "the client chooses whether its answer streams",
        id="set-stream",
    ),
    pytest.param(
        "filters:\n  strip_params: [stream]\n",
        "presets/m.yaml:4:18: filters.strip_params: stream cannot be stripped; "
        "the client chooses whether its answer streams",
        id="strip-stream",
    ),
    pytest.param(
        "use_model_name: ''\n",
        "presets/m.yaml:3:17: use_model_name: expected a non-empty string, got ''",
        id="empty-use-model-name",
    ),
    pytest.param(
        "use_model_name: [a]\n",
        "presets/m.yaml:3:17: use_model_name: expected a non-empty string, got ['a']",
        id="list-use-model-name",
    ),
    pytest.param(
        "filters: [top_k]\n",
        "presets/m.yaml:3:10: filters: expected a mapping of strip_params and set_params, got list",
        id="filters-not-a-mapping",
    ),
    pytest.param(
        "filters:\n  strip_params: top_k, min_p\n",
        "presets/m.yaml:4:17: filters.strip_params: expected a list of strings like [top_k], "
        "got str",
        id="strip-not-a-list",
    ),
    pytest.param(
        "filters:\n  strip_params: [top_k, 3]\n",
        "presets/m.yaml:4:25: filters.strip_params: expected a non-empty string, got 3",
        id="strip-item-not-a-string",
    ),
    pytest.param(
        "filters:\n  set_params: [temperature]\n",
        "presets/m.yaml:4:15: filters.set_params: expected a mapping of body keys, got list",
        id="set-not-a-mapping",
    ),
    pytest.param(
        "filters:\n  set_params:\n    since: 2024-01-01\n",
        "presets/m.yaml:5:12: filters.set_params: a date is not a JSON value: "
        "quote it to send text",
        id="set-value-not-json",
    ),
    pytest.param(
        "filters:\n  set_params: {t: .nan}\n",
        "presets/m.yaml:4:19: filters.set_params: nan is not a JSON number",
        id="set-nan",
    ),
    pytest.param(
        "filters:\n  setParams: {t: 1}\n",
        "presets/m.yaml:4:3: filters.setParams: unknown key; "
        "llama-swap's setParams is set_params here",
        id="llama-swap-spelling",
    ),
]


@pytest.mark.parametrize(("preset", "expected"), BAD)
def test_bad_rewriting_keys_name_file_line_column_and_key(
    tmp_path: Path, preset: str, expected: str
) -> None:
    """Each wrong type, and the model in filters, is an error at the value or key itself."""
    assert errors_of(tmp_path, preset) == [expected]


def test_model_in_defaults_filters_is_reported_in_the_config_file(tmp_path: Path) -> None:
    """``defaults: {filters: ...}`` with the model: reported once, where it is written."""
    config = "defaults:\n  filters:\n    set_params:\n      model: x\n"
    expected = (
        "swapd.yaml:4:7: filters.set_params: model cannot be set here; "
        "use_model_name sets the model the backend receives"
    )
    assert errors_of(tmp_path, "", config) == [expected]


def test_swapd_check_prints_a_filters_error(tmp_path: Path) -> None:
    """``swapd check`` exits 1 with the file:line:col: key: reason line."""
    (tmp_path / "swapd.yaml").write_text("")
    (tmp_path / "presets").mkdir()
    preset = OK_PRESET + "filters: {set_params: {model: x}}\n"
    (tmp_path / "presets" / "m.yaml").write_text(preset)
    done = subprocess.run(
        [sys.executable, "-m", "swapd", "check", "--config", "swapd.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "presets/m.yaml:3:24: filters.set_params: model cannot be set here" in done.stderr


def test_filters_that_ask_for_nothing_cost_nothing(tmp_path: Path) -> None:
    """``filters: {}`` or empty lists leave the preset without a rewrite; types are plain."""
    (tmp_path / "swapd.yaml").write_text("")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "a.yaml").write_text(OK_PRESET + "filters: {strip_params: []}\n")
    (tmp_path / "presets" / "b.yaml").write_text(
        OK_PRESET + "filters:\n  set_params: {t: 0.60, n: 1_000, s: 3.10, m: {k: [1, null]}}\n"
    )
    config = load_config(tmp_path / "swapd.yaml")
    a, b = config.presets
    assert (a.filters, a.use_model_name) == (None, None)
    assert b.filters is not None
    assert json.dumps(dict(b.filters.set)) == (
        '{"t": 0.6, "n": 1000, "s": 3.1, "m": {"k": [1, null]}}'
    )
