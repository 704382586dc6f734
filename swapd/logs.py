"""Structured logging: JSON lines for journald, a console renderer on a terminal.

Events are named ``noun.verb`` (``model.load.start``, ``backend.exit``);
``request_id`` and ``model`` are bound through contextvars by the proxy.

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

import itertools
import logging
import sys
import uuid
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
BACKEND_LOG_MODES = ("info", "debug", "off")
# Request ids: a random prefix per run and a counter, cheaper than a uuid per request.
_ID_PREFIX = uuid.uuid4().hex[:8] + "-"
_ids = itertools.count(1)


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
