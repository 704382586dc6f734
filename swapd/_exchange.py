"""What swapd keeps of one request beyond aiohttp's: its id, its times, an in-band error.

One object per request, stored once under :data:`EXCHANGE` by the app's
middleware and read where the request's answer is prepared and logged. A cloned
request (``/upstream/``) shares it, since a clone copies the request's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web


@dataclass(slots=True)
class Exchange:
    """One request's id and its times (``time.perf_counter``)."""

    request_id: str
    started: float
    first_byte: float | None = None  # when the backend's answer began reaching the client
    ping_stream: web.StreamResponse | None = None  # the stream cold-load pings opened
    # The status of an answer that failed after its 200 went out: an error event on a ping
    # stream, or a backend that cut its answer short (logged and counted as that, not 200).
    stream_error: int | None = None
    counted: bool = False  # a route that leases a model: metrics count it


EXCHANGE = web.RequestKey("exchange", Exchange)
# Status logged and counted for a client that hung up before its answer was complete, or
# stopped reading it for ``send_timeout`` (swapd cut it).
CLIENT_GONE = 499


def stream_error(request: web.Request, status: int) -> None:
    """Log and count the request with ``status``, not the 200 its answer began with."""
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        exchange.stream_error = status


def answer_began(request: web.Request, at: float) -> None:
    """The backend's answer began at ``at`` (a sized one is sent only after the handler)."""
    exchange = request.get(EXCHANGE)
    if exchange is not None and exchange.first_byte is None:
        exchange.first_byte = at


def count(request: web.Request) -> None:
    """Mark the request as one that leases a model: metrics count it."""
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        exchange.counted = True
