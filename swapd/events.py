"""The change feed: every model state move, fanned out to whoever listens.

The manager publishes a slot each time it moves (see ``Slot.observer``); the
``GET /swapd/events`` stream, ``swapd load``'s progress and systemd's STATUS
line read it. A subscriber gets frozen views in order, in a bounded queue: one
that falls behind loses the views a later one of the same model replaced, never
a model's latest, and never slows the manager down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from swapd.logs import get_logger
from swapd.slot import ModelView, Slot, snapshot

_log = get_logger("swapd.events")

_KEEP = 256  # views a slow subscriber may fall behind by before they are folded
# Every stream swapd opens itself: not cached, and not buffered by Nginx and its kind.
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(frozen=True)
class Removed:
    """A reload removed the model: it leaves the feed at once, as it leaves status."""

    name: str


Item = ModelView | Removed  # what a subscriber is handed


class Subscription:
    """One listener's queue of views (and removals)."""

    def __init__(self) -> None:
        self._views: list[Item] = []
        self._limit = _KEEP
        self._ready = asyncio.Event()

    def put(self, item: Item) -> None:
        """Queue a view or a removal (folding the queue when full) and wake the listener."""
        self._views.append(item)
        if len(self._views) > self._limit:
            self._fold()
        self._ready.set()

    def _fold(self) -> None:
        """Keep each model's latest view alone, in the order of those views.

        Dropping the oldest views instead could drop a model's only one (a reload that
        adds hundreds of models): the listener would never learn of it. The bound grows
        with the number of models, so a fold costs each queued view a constant.
        """
        latest: dict[str, Item] = {}
        for view in reversed(self._views):
            latest.setdefault(view.name, view)
        self._views = list(reversed(latest.values()))
        self._limit = max(_KEEP, 2 * len(self._views))

    async def next(self, timeout: float | None = None) -> list[Item]:
        """The views queued since the last call; empty when ``timeout`` passes first."""
        if not self._views:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
        self._ready.clear()
        views, self._views = self._views, []
        return views


class Changes:
    """Publishes model moves to subscribers; cheap when nobody listens."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._changed = asyncio.Event()

    def publish(self, slot: Slot) -> None:
        """A slot moved: hand its view to every subscriber.

        Called inside the manager's state move: a failure here is logged, never raised.
        """
        self._wake()
        self.show(slot)

    def show(self, slot: Slot) -> None:
        """Hand subscribers a view of a change that is no move (a request's end, a last use).

        Nothing else is woken: called on the request path, it costs nothing unlistened.
        """
        if not self._subscribers:
            return
        try:
            view = snapshot(slot)
        except Exception as exc:  # noqa: BLE001 - a reader's problem must not stop a move
            _log.exception("events.publish.fail", model=slot.preset.name, error=repr(exc))
            return
        self._hand(view)

    def removed(self, name: str) -> None:
        """A reload removed ``name``: subscribers drop it (its stop is no longer shown)."""
        self._wake()
        self._hand(Removed(name))

    def _wake(self) -> None:
        """End the current :meth:`wait` of everyone."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _hand(self, item: Item) -> None:
        for subscriber in self._subscribers:
            subscriber.put(item)

    async def wait(self) -> None:
        """Return at the next move."""
        await self._changed.wait()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """``with changes.subscribe() as sub:`` -- views of every move until the block ends."""
        subscription = Subscription()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)


def feed_event(item: Item) -> bytes:
    """``event: model`` with the model's status entry, or ``event: removed`` with its name."""
    if isinstance(item, Removed):
        return sse("removed", {"name": item.name})
    return sse("model", item.as_json())


def sse(event: str, data: Any) -> bytes:
    """One server-sent event: its name and a JSON payload on one ``data:`` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
