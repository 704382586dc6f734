"""Control routes (``/swapd/*``) and ``/metrics``: admin keys where keys are set.

Status, the change feed and metrics read frozen views (no TTL is touched, no
model started). Load, unload and reload act through the manager; a client that
hangs up never cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from aiohttp import web

from swapd import planner
from swapd.errors import BadRequest, ConfigErrors, RequestError, SwapdError, clip
from swapd.events import SSE_HEADERS, Item, Removed, Subscription, feed_event, sse
from swapd.limits import Edge
from swapd.manager import Manager
from swapd.metrics import CONTENT_TYPE, Metrics
from swapd.reload import ReloadPlan
from swapd.states import State

# States in which a model's status moves without a state change (bytes staged, time spent).
_MOVING = frozenset(
    {State.QUEUED, State.STARTING, State.WAKING, State.SLEEPING, State.DRAINING, State.STOPPING}
)
PROGRESS_EVERY = 0.5  # seconds between views of a model on the move
KEEPALIVE_EVERY = 15.0  # seconds between comment lines on a quiet stream
FOLLOW_EVERY = 0.25  # seconds between looks at a followed backend's output
# At shutdown, how long a stream has to end by itself before its connection is closed: one
# whose client stopped reading waits in a write that nothing else would end.
STREAM_GRACE = 2.0
DEFAULT_LINES = 100  # of a backend's output, when ?lines= is not given


_Named = TypeVar("_Named", bound=Item)  # a view, or a removal: each names its model

_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


def query_flag(name: str, raw: str | None, *, absent: bool = False) -> bool:
    """A query's ``name=true`` or ``false`` (``1``/``0``, ``yes``/``no``); anything else is a 400.

    Not a quiet default: ``?force=ture`` would wait on every request it was meant to cut.
    """
    if raw is None:
        return absent
    if raw.lower() in _FALSE:
        return False
    if raw.lower() in _TRUE:
        return True
    raise BadRequest(f"{name} must be true or false, got {clip(raw)!r}")


def _flag(request: web.Request, name: str) -> bool:
    """``?name=true`` or ``false`` (absent: false); anything else is a 400."""
    return query_flag(name, request.query.get(name))


class Control:
    """The control routes of one daemon."""

    def __init__(
        self,
        manager: Manager,
        edge: Edge,
        metrics: Metrics,
        reload: Callable[[], Awaitable[ReloadPlan]],
        allows: Callable[[web.Request], bool],
    ) -> None:
        self.manager = manager
        self.edge = edge
        self.metrics = metrics
        self._reload = reload
        # The running config's access checks: a stream ends once they refuse its request
        # (a reload took its key away, or its Host or Origin).
        self._allows = allows
        self._closing = False  # shutdown began: open streams end, so the drain need not wait
        # Events and followed logs open now (a request is a mapping: kept by its id).
        self._streams: dict[int, web.Request] = {}

    def close(self) -> None:
        """End the open streams (events, followed logs) within a beat.

        Each ends at its next look; one whose client stopped reading is stuck in a write
        until its connection is closed, :data:`STREAM_GRACE` seconds on.
        """
        self._closing = True
        if self._streams:
            asyncio.get_running_loop().call_later(STREAM_GRACE, self._cut_streams)

    @contextlib.contextmanager
    def _open(self, request: web.Request) -> Iterator[None]:
        """A stream open for as long as the block runs, for :meth:`close` to cut."""
        self._streams[id(request)] = request
        try:
            yield
        finally:
            del self._streams[id(request)]

    def _cut_streams(self) -> None:
        for request in list(self._streams.values()):
            if request.transport is not None:
                request.transport.abort()  # close() would wait for the buffer to drain

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register every control route."""
        router.add_get("/swapd/status", self.status)
        router.add_get("/swapd/events", self.events)
        router.add_get("/swapd/plan", self.plan)
        router.add_post("/swapd/reload", self.reload)
        router.add_post("/swapd/models/{name:.+}/load", self.load)
        router.add_post("/swapd/models/{name:.+}/unload", self.unload)
        router.add_post("/swapd/unload", self.unload_all)
        router.add_get("/swapd/models/{name:.+}/logs", self.logs)
        router.add_get("/metrics", self.scrape)

    async def status(self, _request: web.Request) -> web.Response:
        """Every model and tier, the config file, swapd's pid and the edge's counters."""
        status = self.manager.status()
        status["config"] = self.manager.config.source
        status["pid"] = os.getpid()
        status["connections"] = self.edge.snapshot()
        return web.json_response(status)

    async def load(self, request: web.Request) -> web.Response:
        """Make a model ready; answers with its status once it is."""
        name = request.match_info["name"]
        await asyncio.shield(self.manager.load(name))
        return web.json_response(self.manager.view(name).as_json())

    async def unload(self, request: web.Request) -> web.Response:
        """Stop a model once its requests finish (``?force=true``: at once)."""
        name = request.match_info["name"]
        await asyncio.shield(self.manager.unload(name, force=_flag(request, "force")))
        return web.json_response(self.manager.view(name).as_json())

    async def unload_all(self, request: web.Request) -> web.Response:
        """Stop every model once its requests finish (``?force=true``: at once)."""
        await asyncio.shield(self.manager.unload_all(force=_flag(request, "force")))
        return web.json_response({"models": [v.as_json() for v in self.manager.views()]})

    async def reload(self, _request: web.Request) -> web.Response:
        """Re-read the config and presets; 400 listing every error when the new one is bad."""
        try:
            plan = await asyncio.shield(self._reload())
        except RequestError:
            raise  # 503 unavailable: shutting down
        except SwapdError as exc:
            errors = [str(e) for e in exc.errors] if isinstance(exc, ConfigErrors) else [str(exc)]
            message = f"the new config has {len(errors)} error(s); the running config stays"
            error = {"message": message, "type": "invalid_request_error", "code": "config_invalid"}
            body = {"error": {**error, "param": None}, "errors": errors}
            return web.json_response(body, status=400)
        return web.json_response(plan.as_json())

    async def plan(self, _request: web.Request) -> web.Response:
        """Which models fit together on this host's devices now (``swapd plan``)."""
        manager = self.manager
        snap, memory = await manager.memory()
        found = await planner.plan(manager.admission, manager.config.presets, snap, memory)
        return web.json_response(found.as_json())

    async def scrape(self, _request: web.Request) -> web.Response:
        """Prometheus exposition: counters, histograms and gauges read now.

        A reading that fails (no device answers) leaves out device memory alone: the
        request, load and state series are what tells of a lost device.
        """
        memory: list[planner.DeviceMemory] = []
        with contextlib.suppress(SwapdError):  # a GPU probe logs it (probe.device.fail)
            _, memory = await self.manager.memory()
        body = self.metrics.render(self.manager.views(), memory, self.manager.tiers())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """A backend's last output lines; ``?follow=true`` streams new ones as events."""
        count = _line_count(request.query.get("lines"))
        name, lines = self.manager.logs(request.match_info["name"], count)
        if not _flag(request, "follow"):
            return web.json_response({"name": name, "lines": lines})
        if request.method == "HEAD":
            return web.Response(headers=SSE_HEADERS)  # a stream's headers, no stream
        _, cursor = self.manager.logs_since(name, None)  # now: lines printed meanwhile follow
        followed = self.manager.incarnation(name)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        with self._open(request):
            for line in lines:
                await response.write(sse("line", line))
            quiet = 0.0
            while not self._closing and self._allows(request):
                await asyncio.sleep(FOLLOW_EVERY)
                if not self._same_model(name, followed):
                    break  # removed (or added back: another process, another log)
                new, cursor = self.manager.logs_since(name, cursor)

                for line in new:
                    await response.write(sse("line", line))
                quiet = 0.0 if new else quiet + FOLLOW_EVERY
                if quiet >= KEEPALIVE_EVERY:
                    await response.write(b": keepalive\n\n")
                    quiet = 0.0
            await response.write_eof()
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: each model's view now, then one per move, and progress.

        ``?model=NAME`` keeps one model. A model on the move (queued, staging,
        starting) is sent again every :data:`PROGRESS_EVERY` seconds, so a client
        can draw bytes staged and time spent.
        """
        wanted = request.query.get("model")
        if wanted == "":
            raise BadRequest("?model= names no model: leave it out for every model")
        name = self.manager.view(wanted).name if wanted else None
        followed = self.manager.incarnation(name) if name is not None else None

        if request.method == "HEAD":
            return web.Response(headers=SSE_HEADERS)  # a stream's headers, no stream
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        with self._open(request), self.manager.changes.subscribe() as subscription:
            for view in self.manager.views(name=name):
                await response.write(feed_event(view))
            quiet = 0.0
            while not self._closing and self._allows(request):
                if name is not None and not self._same_model(name, followed):
                    # A reload removed the model (while the stream wrote, or before it
                    # subscribed): its stream ends, as its logs' do, saying so.
                    await response.write(feed_event(Removed(name)))
                    break
                batch, ended = await self._feed_batch(subscription, name)
                for item in batch:
                    await response.write(feed_event(item))
                if ended:
                    break
                quiet = 0.0 if batch else quiet + PROGRESS_EVERY
                if quiet >= KEEPALIVE_EVERY:
                    await response.write(b": keepalive\n\n")
                    quiet = 0.0
        await response.write_eof()
        return response

    async def _feed_batch(
        self, subscription: Subscription, name: str | None
    ) -> tuple[list[Item], bool]:
        """A feed's next events: its moves, then the views of models on the move.

        And whether the feed ends: its one model was removed, and what follows is another's.
        """
        moved = _of(name, await subscription.next(PROGRESS_EVERY))
        cut = _removal(moved) if name is not None else None
        if cut is not None:
            return moved[: cut + 1], True
        sent = {v.name for v in moved}
        moving = [v for v in self.manager.views(states=_MOVING, name=name) if v.name not in sent]
        return [*moved, *moving], False

    def _same_model(self, name: str, incarnation: int | None) -> bool:
        """Whether ``name`` is still the model a stream began to follow (not re-added)."""
        try:
            return self.manager.incarnation(name) == incarnation
        except RequestError:
            return False  # removed


def _of(name: str | None, items: list[_Named]) -> list[_Named]:
    """Those of ``items`` about model ``name`` (None: every model)."""
    return [v for v in items if name is None or v.name == name]


def _removal(items: list[Item]) -> int | None:
    """Where the first removal is in ``items``; None when there is none."""
    return next((at for at, item in enumerate(items) if isinstance(item, Removed)), None)


def _line_count(raw: str | None) -> int:
    """``?lines=``: 100 when absent; more than a backend's log keeps is all of it."""
    if raw is None or raw == "":
        return DEFAULT_LINES
    # ASCII digits only (str.isdigit takes '²'); past nine digits, more than any log keeps.
    if not (raw.isascii() and raw.isdigit()):
        msg = f"lines must be a whole number of 0 or more, got {clip(raw)!r}"
        raise BadRequest(msg)
    return int(raw) if len(raw) <= 9 else 10**9
