"""Prometheus metrics: what ``GET /metrics`` serves, under names dashboards rely on.

Counters and histograms are fed as things happen: requests by the app's
middleware (:meth:`Metrics.request_done`, :meth:`Metrics.first_byte`), loads and
evictions by the manager. Gauges (state, requests in flight and waiting, device
memory) are read at scrape time from frozen views and one probe reading, so a
scrape never starts a model, never resets a TTL and costs the request path
nothing. Label values are configured model names only, never what a client
typed, so a stream of unknown names cannot grow the series without bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics import Counter as CounterChild
    from prometheus_client.metrics import Histogram as HistogramChild

    from swapd.planner import DeviceMemory
    from swapd.slot import ModelView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Inference requests run from milliseconds to many minutes (long generations).
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_LOAD_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# No ``_created`` series: they double the exposition and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated


@dataclass
class Timing:
    """When a request arrived and when its answer's first byte went out (perf_counter)."""

    started: float
    first_byte: float | None = None


TIMING = web.RequestKey("timing", Timing)


class _Live(Collector):
    """Gauges computed at scrape time from the views and readings handed to it."""

    def __init__(self) -> None:
        self.views: Sequence[ModelView] = ()
        self.memory: Sequence[DeviceMemory] = ()

    def collect(self) -> Iterator[Metric]:
        """The gauge families of the last :meth:`Metrics.render` call."""
        state = GaugeMetricFamily(
            "swapd_model_state",
            "1 for each model's current state and tier",
            labels=["model", "state", "tier"],
        )
        in_flight = GaugeMetricFamily(
            "swapd_in_flight", "requests at the model's backend now", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "swapd_queue_waiting", "requests waiting for the model", labels=["model"]
        )
        for view in self.views:
            state.add_metric([view.name, view.state, view.tier], 1)
            in_flight.add_metric([view.name], view.in_flight)
            waiting.add_metric([view.name], view.waiting)
        memory = GaugeMetricFamily(
            "swapd_device_memory_bytes",
            "device memory: total, free, used by swapd's backends, used by everything else",
            labels=["device", "kind"],
        )
        for device in self.memory:
            for kind, value in (
                ("total", device.total),
                ("free", device.free),
                ("swapd", device.swapd),
                ("outside", device.outside),
            ):
                memory.add_metric([device.device, kind], value)
        yield from (state, in_flight, waiting, memory)


class Metrics:
    """swapd's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter(
            "swapd_requests",
            "inference requests answered, by configured model and HTTP status (499: client gone)",
            ["model", "code"],
            registry=self.registry,
        )
        self._request_seconds = Histogram(
            "swapd_request_seconds",
            "time from a request's arrival to the end of its answer, load included",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._first_byte = Histogram(
            "swapd_time_to_first_byte_seconds",
            "time from a request's arrival to the backend's answer starting, load included",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._loads = Counter(
            "swapd_loads",
            "loads that made a model ready, by the tier it came from",
            ["model", "from_tier"],
            registry=self.registry,
        )
        self._load_seconds = Histogram(
            "swapd_load_seconds",
            "time from a load's start (queueing and staging included) to ready",
            ["model", "from_tier"],
            buckets=_LOAD_BUCKETS,
            registry=self.registry,
        )
        self._evictions = Counter(
            "swapd_evictions",
            "models moved down a tier without being asked (evict, ttl, ram_ttl, ram_budget)",
            ["model", "reason"],
            registry=self.registry,
        )
        self._live = _Live()
        self.registry.register(self._live)
        # Label children, looked up once: .labels() costs more than the increment itself.
        self._count_children: dict[tuple[str, int], CounterChild] = {}
        self._time_children: dict[str, tuple[HistogramChild, HistogramChild]] = {}

    def request_done(self, model: str, code: int, seconds: float) -> None:
        """One inference request ended with ``code`` after ``seconds``."""
        counter = self._count_children.get((model, code))
        if counter is None:
            counter = self._requests.labels(model, str(code))
            self._count_children[model, code] = counter
        counter.inc()
        self._timers(model)[0].observe(seconds)

    def first_byte(self, model: str, seconds: float) -> None:
        """The answer to a request for ``model`` started after ``seconds``."""
        self._timers(model)[1].observe(seconds)

    def _timers(self, model: str) -> tuple[HistogramChild, HistogramChild]:
        timers = self._time_children.get(model)
        if timers is None:
            timers = (self._request_seconds.labels(model), self._first_byte.labels(model))
            self._time_children[model] = timers
        return timers

    def load_done(self, model: str, from_tier: str, seconds: float) -> None:
        """A load made ``model`` ready; it came from ``from_tier`` (ram, disk or store)."""
        self._loads.labels(model, from_tier).inc()
        self._load_seconds.labels(model, from_tier).observe(seconds)

    def evicted(self, model: str, reason: str) -> None:
        """``model`` went down a tier for ``reason``."""
        self._evictions.labels(model, reason).inc()

    def forget(self, models: Iterable[str]) -> None:
        """Drop the series of models a reload removed."""
        gone = set(models)
        for key in [k for k in self._count_children if k[0] in gone]:
            self._requests.remove(key[0], str(key[1]))
            del self._count_children[key]
        for model in gone & set(self._time_children):
            self._request_seconds.remove(model)
            self._first_byte.remove(model)
            del self._time_children[model]

    def render(self, views: Sequence[ModelView], memory: Sequence[DeviceMemory]) -> bytes:
        """The exposition text, with the gauges read from ``views`` and ``memory``."""
        self._live.views, self._live.memory = views, memory
        try:
            return generate_latest(self.registry)
        finally:
            self._live.views, self._live.memory = (), ()
