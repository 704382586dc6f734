"""Structured logging: JSON lines for journald, a console renderer on a terminal.

Events are named ``noun.verb`` (``model.load.start``, ``backend.exit``);
``request_id`` is bound through contextvars per request; ``model`` is each event's own field.

Every line swapd writes to stdout is one event, JSON off a terminal: aiohttp's
and asyncio's own messages (stdlib ``logging``) and Python's warnings go
through the same renderer. ``backend.*`` events describe a backend, not a
request, so they never carry a ``request_id`` (the task that reads a backend's
output was started by whichever request loaded it). ``backend_log`` sets the
level of ``backend.output`` lines on their own: ``info``, ``debug`` (shown only
with ``log_level: debug``) or ``off`` (kept only in the ring buffer that
``swapd logs`` reads).
"""

from __future__ import annotations

import contextvars
import itertools
import json as json_module
import logging
import sys
import time
import uuid
from collections.abc import MutableMapping
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
BACKEND_LOG_MODES = ("info", "debug", "off")
# Request ids: a random prefix per run and a counter, cheaper than a uuid per request.
_ID_PREFIX = uuid.uuid4().hex[:8] + "-"
_ids = itertools.count(1)


# structlog's own context variable for ``request_id``, the one bind_contextvars sets (found
# through the token it returns, in a context of its own). Set and reset directly, it costs a
# request a third of what bind_contextvars and unbind_contextvars do.
REQUEST_ID: contextvars.ContextVar[Any] = (
    contextvars.Context()
    .run(structlog.contextvars.bind_contextvars, request_id=None)["request_id"]
    .var
)


def new_request_id() -> str:
    """A request id unique to this run of swapd."""
    return f"{_ID_PREFIX}{next(_ids):x}"


def _backend_events(level: int, backend_log: str) -> structlog.typing.Processor:
    """Strip request ids from backend events; give backend output its own level."""
    shown = backend_log != "off" and _LEVELS[backend_log] >= level

    def processor(
        _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event = event_dict.get("event")
        if not isinstance(event, str) or not event.startswith("backend."):
            return event_dict
        event_dict.pop("request_id", None)
        if event == "backend.output":
            if not shown:
                raise structlog.DropEvent
            event_dict["level"] = backend_log
        return event_dict

    return processor


def configure(level: str = "info", *, json: bool | None = None, backend_log: str = "info") -> None:
    """Set up structlog once for the process; ``json`` defaults to "stdout is not a TTY"."""
    global _hot_out  # noqa: PLW0603 - one output for the process, as structlog's own
    as_json = not sys.stdout.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    threshold = _LEVELS.get(level, logging.ERROR)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            _backend_events(threshold, backend_log),
            # exc_info=... becomes the trace itself, on one JSON line.
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(threshold, shared, renderer)
    # The same file and lock as structlog's lines, so lines never interleave; the line and
    # its newline in one write (print writes them apart: two system calls unbuffered).
    _hot_out = structlog.WriteLogger(sys.stdout) if as_json and threshold <= logging.INFO else None


def _route_stdlib(
    threshold: int,
    shared: list[structlog.typing.Processor],
    renderer: structlog.typing.Processor,
) -> None:
    """Render stdlib ``logging`` records (aiohttp, asyncio, warnings) as swapd's own events."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(threshold, logging.INFO))  # aiohttp's debug chatter is never wanted
    logging.captureWarnings(True)  # noqa: FBT003 - the stdlib takes it positionally


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose events carry ``component=name``."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger


# Where HotLogger writes its JSON lines; None: through structlog (a terminal, or a level
# above info, which drops them).
_hot_out: structlog.WriteLogger | None = None


# The keys structlog's chain sets itself: the bound component, event, level, timestamp.
_CHAIN_KEYS = frozenset({"component", "event", "level", "timestamp"})


class HotLogger:
    """Info events on the request path, rendered without structlog's processor chain.

    The line is the one the JSON chain of :func:`configure` writes, key for key and in
    the same order (component, the fields, event, the bound context, level, timestamp),
    at a quarter of the cost: ``request.done`` through structlog was the largest part of
    swapd's own CPU per proxied request (docs/benchmarks.md). Values are JSON's scalars.
    """

    def __init__(self, component: str) -> None:
        self._head = '{"component": ' + _json_str(component)
        self._slow = get_logger(component)

    def info(self, event: str, **fields: object) -> None:
        """Log ``event`` at info, as ``get_logger(component).info(event, **fields)`` does."""
        out = _hot_out
        if out is None:
            self._slow.info(event, **fields)
            return
        context = structlog.contextvars.get_contextvars()
        if not (_CHAIN_KEYS.isdisjoint(fields) and _CHAIN_KEYS.isdisjoint(context)):
            # A key the chain sets itself: its line has it once, where the chain puts it.
            self._slow.info(event, **fields)
            return
        parts = [self._head]
        for key, value in fields.items():
            # Strings, the most common values, without a call of their own.
            text = _json_str(value) if type(value) is str else _json_value(value)
            parts += (_keys.get(key) or _key(key), text)
        parts += (', "event": ', _json_str(event))
        for key, value in context.items():
            if key not in fields:  # merge_contextvars: the call's own fields win
                parts += (_keys.get(key) or _key(key), _json_value(value))
        parts += (', "level": "info", "timestamp": "', _utc_now(), '"}')
        out.msg("".join(parts))


# Keys as rendered (``, "key": ``): the same few on every line.
_keys: dict[str, str] = {}
_KEYS_MAX = 256


def _key(key: str) -> str:
    text = ", " + _json_str(key) + ": "
    if len(_keys) < _KEYS_MAX:
        _keys[key] = text
    return text


def _json_value(value: object) -> str:
    """``value`` as JSON, as structlog's JSONRenderer writes it (``json.dumps``)."""
    if isinstance(value, str):
        return _json_str(value)
    if value is None:
        return "null"
    kind = type(value)
    if kind is int or (kind is float and value - value == 0):  # type: ignore[operator]
        return repr(value)  # json.dumps writes finite floats as repr does
    # nan, inf, bools, anything else
    return json_module.dumps(value, default=_json_fallback)


def _json_fallback(value: object) -> object:
    """What JSONRenderer's default writes for a value JSON has no form for."""
    try:
        return value.__structlog__()  # type: ignore[attr-defined]
    except AttributeError:
        return repr(value)


# The last second stamped and its text, in one tuple: never read torn.
_stamp: tuple[int, str] = (-1, "")


def _utc_now() -> str:
    """The time as TimeStamper(fmt="iso", utc=True) writes it, its seconds part cached."""
    global _stamp  # noqa: PLW0603 - a one-entry cache
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    cached_second, prefix = _stamp
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp = (second, prefix)
    # datetime.isoformat leaves out a zero microsecond part.
    return "%s.%06dZ" % (prefix, micro) if micro else prefix + "Z"  # noqa: UP031 - cheaper
