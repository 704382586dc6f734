"""Structured logging: JSON lines for journald, a console renderer on a terminal.

Events are named ``noun.verb`` (``model.load.start``, ``backend.exit``);
``request_id`` and ``model`` are bound through contextvars by the proxy.
"""

from __future__ import annotations

import itertools
import logging
import sys
import uuid

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
# Request ids: a random prefix per run and a counter, cheaper than a uuid per request.
_ID_PREFIX = uuid.uuid4().hex[:8] + "-"
_ids = itertools.count(1)


def new_request_id() -> str:
    """A request id unique to this run of swapd."""
    return f"{_ID_PREFIX}{next(_ids):x}"


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Set up structlog once for the process; ``json`` defaults to "stdout is not a TTY"."""
    as_json = not sys.stdout.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # exc_info=... becomes the trace itself, on one JSON line.
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose events carry ``component=name``."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger
