"""The request path's own renderer writes the line structlog's JSON chain would write."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import time

import pytest

from swapd import logs

# Both loggers log the same event with the same fields; the script prints nothing else.
_SCRIPT = """
import structlog
from swapd import logs
logs.configure({level!r}, json={as_json!r})
structlog.contextvars.bind_contextvars(request_id="r-1", shadowed="context")
hot, plain = logs.HotLogger("swapd.app"), logs.get_logger("swapd.app")
cases = [
    dict(method="POST", path="/v1/chat/completions", model="m", status=200, ms=1.25),
    dict(path='/v1/"q"\\\\\\n\\u2028\\u00e9\\udc80\\x00', model=None, status=404, ms=0.0),
    dict(ms=float("nan"), big=float("inf"), flag=True, n=10**30, items=[1, "a", None]),
    dict(shadowed="mine", nested={{"a": {{"b": [1.5]}}}}),
]
for fields in cases:
    hot.info("request.done", **fields)
    plain.info("request.done", **fields)
"""


def _run(level: str, *, as_json: bool) -> list[str]:
    code = _SCRIPT.format(level=level, as_json=as_json)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.splitlines()


def test_the_hot_line_is_structlogs_line_key_for_key() -> None:
    """Same keys in the same order and the same values; only the timestamp may differ."""
    lines = _run("info", as_json=True)
    assert len(lines) == 8
    for hot_line, plain_line in zip(lines[::2], lines[1::2], strict=True):
        hot, plain = json.loads(hot_line), json.loads(plain_line)
        assert list(hot) == list(plain), (hot_line, plain_line)
        assert hot.pop("timestamp")[:16] == plain.pop("timestamp")[:16]
        assert repr(hot) == repr(plain)  # nan compares unequal to itself; its repr does not
        assert hot_line.isascii()
    first = json.loads(lines[0])
    assert (first["request_id"], first["shadowed"], first["level"]) == ("r-1", "context", "info")
    assert json.loads(lines[6])["shadowed"] == "mine"  # the call's field wins, as in structlog


def test_above_info_the_hot_logger_writes_nothing() -> None:
    """``log_level: warning`` drops request.done from both."""
    assert _run("warning", as_json=True) == []


def test_on_a_terminal_the_hot_logger_renders_as_structlog_does() -> None:
    """The console renderer is structlog's own: the two lines differ only in their time."""
    lines = _run("info", as_json=False)
    assert len(lines) == 8
    for hot_line, plain_line in zip(lines[::2], lines[1::2], strict=True):
        assert "request.done" in hot_line
        assert not hot_line.startswith("{")
        assert hot_line.split(" ", 1)[1] == plain_line.split(" ", 1)[1]


@pytest.mark.parametrize(
    "now_ns",
    [
        1_764_250_471_114_410_123,  # 2025-11-27T13:34:31.114410Z
        1_764_250_471_000_000_999,  # a zero microsecond part: isoformat leaves it out
        1_764_250_471_999_999_999,  # the last microsecond of a second
        0,
    ],
)
def test_the_timestamp_is_isoformats(monkeypatch: pytest.MonkeyPatch, now_ns: int) -> None:
    """TimeStamper(fmt="iso", utc=True) writes datetime's isoformat with Z for +00:00."""
    monkeypatch.setattr(time, "time_ns", lambda: now_ns)
    micros = now_ns // 1000
    when = dt.datetime.fromtimestamp(micros // 1_000_000, tz=dt.UTC).replace(
        microsecond=micros % 1_000_000
    )
    assert logs._utc_now() == when.isoformat().replace("+00:00", "Z")
    assert logs._utc_now() == when.isoformat().replace("+00:00", "Z")  # from the cache


# Keys that structlog's chain sets itself (the bound component, event, level, timestamp)
# given as a field or bound in the context, and a value with ``__structlog__``.
_COLLISIONS = """
import structlog
from swapd import logs
logs.configure("info", json=True)
class Rendered:
    def __structlog__(self):
        return "its own"
hot, plain = logs.HotLogger("swapd.app"), logs.get_logger("swapd.app")
for fields in (dict(level="x"), dict(timestamp="x"), dict(component="x"), dict(v=Rendered())):
    hot.info("request.done", **fields)
    plain.info("request.done", **fields)
for key in ("component", "event", "level", "timestamp"):
    structlog.contextvars.bind_contextvars(request_id="r-1", **{key: "bound"})
    hot.info("request.done", status=200)
    plain.info("request.done", status=200)
    structlog.contextvars.clear_contextvars()
"""


def test_keys_the_chain_sets_itself_render_as_structlogs() -> None:
    """The line as written, not as parsed: json.loads hides a repeated key.

    Before: a field or a bound variable named component, level or timestamp (or a bound
    ``event``) came out twice in the hot line, where structlog writes it once, and a value
    with ``__structlog__`` came out as its repr.
    """
    done = subprocess.run(
        [sys.executable, "-c", _COLLISIONS], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 16
    stamp = re.compile(r'"timestamp": "[0-9T:.Z-]{20,27}"')
    for hot_line, plain_line in zip(lines[::2], lines[1::2], strict=True):
        assert stamp.sub("T", hot_line) == stamp.sub("T", plain_line)
