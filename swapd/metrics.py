"""Prometheus metrics: what ``GET /metrics`` serves, under names dashboards rely on.

Counters and histograms are fed as things happen: requests by the app's
middleware (:meth:`Metrics.request_done`: plain counts folded into families
at scrape time, so a request pays a dict update and two bisects), loads and
evictions by the manager. Gauges (state, requests in flight and waiting, device
memory) are read at scrape time from frozen views and one probe reading, so a
scrape never starts a model, never resets a TTL and costs the request path
nothing. Label values are configured model names only, never what a client
typed, so a stream of unknown names cannot grow the series without bound.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from swapd.planner import DeviceMemory
    from swapd.slot import ModelView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Inference requests run from milliseconds to many minutes (long generations).
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_REQUEST_LE = tuple(repr(float(b)) for b in _REQUEST_BUCKETS)  # as prometheus_client writes them
_LOAD_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# No ``_created`` series: they double the exposition and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated


class _Histograms:
    """Observations per label value, kept as plain counts: cheaper than a child per label.

    The request path does one bisect and two additions; the scrape builds the families.
    """

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.by: dict[str, tuple[list[int], list[float]]] = {}  # value: (buckets, [sum])

    def observe(self, value: str, seconds: float) -> None:
        counts = self.by.get(value)
        if counts is None:
            counts = self.by[value] = ([0] * (len(_REQUEST_BUCKETS) + 1), [0.0])
        counts[0][bisect.bisect_left(_REQUEST_BUCKETS, seconds)] += 1
        counts[1][0] += seconds

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, (counts, total) in self.by.items():
            cumulative = list(itertools.accumulate(counts))
            bounds = zip(_REQUEST_LE, cumulative, strict=False)
            buckets = list(bounds)
            buckets.append(("+Inf", cumulative[-1]))
            family.add_metric([value], buckets, total[0])
        return family


class _Live(Collector):
    """What the request path counts, and gauges read at scrape time from views and readings."""

    def __init__(self) -> None:
        self.views: Sequence[ModelView] = ()
        self.memory: Sequence[DeviceMemory] = ()
        self.tiers: Mapping[str, Mapping[str, int | None]] = {}
        self.requests: dict[tuple[str, int], int] = {}
        self.request_seconds = _Histograms(
            "swapd_request_seconds",
            "time from a request's arrival to the end of its answer, load included",
            "model",
        )
        self.first_byte = _Histograms(
            "swapd_time_to_first_byte_seconds",
            "time from a request's arrival to the backend's answer starting, load included",
            "model",
        )

    def forget(self, models: set[str]) -> None:
        """Drop the request series of models a reload removed."""
        for key in [k for k in self.requests if k[0] in models]:
            del self.requests[key]
        for histograms in (self.request_seconds, self.first_byte):
            for model in models & set(histograms.by):
                del histograms.by[model]

    def collect(self) -> Iterator[Metric]:
        """The families of the request path, and the gauges of the last render."""
        requests = CounterMetricFamily(
            "swapd_requests",
            "inference requests answered, by configured model and HTTP status (499: client gone)",
            labels=["model", "code"],
        )
        for (model, code), count in self.requests.items():
            requests.add_metric([model, str(code)], count)
        yield from (requests, self.request_seconds.family(), self.first_byte.family())
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
        tier_bytes = GaugeMetricFamily(
            "swapd_tier_bytes",
            "bytes each tier holds (as /swapd/status counts them)",
            labels=["tier"],
        )
        tier_budget = GaugeMetricFamily(
            "swapd_tier_budget_bytes", "each tier's budget, where one is set", labels=["tier"]
        )
        for tier, usage in self.tiers.items():
            if usage["bytes"] is not None:
                tier_bytes.add_metric([tier], usage["bytes"])
            if usage["budget"] is not None:
                tier_budget.add_metric([tier], usage["budget"])
        yield from (state, in_flight, waiting, memory, tier_bytes, tier_budget)


class Metrics:
    """swapd's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
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
            "models moved down a tier without being asked"
            " (evict, ttl, ram_ttl, ram_budget, max_running)",
            ["model", "reason"],
            registry=self.registry,
        )
        self._live = _Live()
        self.registry.register(self._live)

    def request_done(
        self, model: str, code: int, seconds: float, first_byte: float | None = None
    ) -> None:
        """One inference request ended with ``code`` after ``seconds``.

        Its answer began after ``first_byte`` seconds (None: no answer of a backend's).
        """
        live = self._live
        key = (model, code)
        live.requests[key] = live.requests.get(key, 0) + 1
        live.request_seconds.observe(model, seconds)
        if first_byte is not None:
            live.first_byte.observe(model, first_byte)

    def load_done(self, model: str, from_tier: str, seconds: float) -> None:
        """A load made ``model`` ready; it came from ``from_tier`` (ram, disk or store)."""
        self._loads.labels(model, from_tier).inc()
        self._load_seconds.labels(model, from_tier).observe(seconds)

    def evicted(self, model: str, reason: str) -> None:
        """``model`` went down a tier for ``reason``."""
        self._evictions.labels(model, reason).inc()

    def forget(self, models: Iterable[str]) -> None:
        """Drop every series of models a reload removed (labels name configured models only)."""
        gone = set(models)
        self._live.forget(gone)
        for metric in (self._loads, self._load_seconds, self._evictions):
            for labels in _label_sets(metric):
                if labels[0] in gone:
                    metric.remove(*labels)

    def render(
        self,
        views: Sequence[ModelView],
        memory: Sequence[DeviceMemory],
        tiers: Mapping[str, Mapping[str, int | None]] | None = None,
    ) -> bytes:
        """The exposition text, with the gauges read from ``views``, ``memory`` and ``tiers``."""
        live = self._live
        live.views, live.memory, live.tiers = views, memory, tiers or {}
        try:
            return generate_latest(self.registry)
        finally:
            live.views, live.memory, live.tiers = (), (), {}


def _label_sets(metric: Counter | Histogram) -> list[tuple[str, ...]]:
    """The label values of every series a labelled metric has (model first)."""
    return [
        tuple(sample.labels[name] for name in metric._labelnames)  # noqa: SLF001 - no public list
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith(("_total", "_count"))
    ]
