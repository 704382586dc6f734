"""Replay request traces through swapd's admission policy and the alternatives, offline.

A discrete-event simulation: models of mixed sizes load in time proportional to
their size, one load at a time (swapd holds one admission lock); a model is busy
while it serves a request or has requests waiting for it, and busy models are
never evicted. Policies compared, on the same seeded traces:

* ``swapd``      -- :func:`swapd.policy.plan_admission` itself, with a memory budget and
  every model's CRF from :func:`swapd.policy.crf_update` (idle residents least worth
  keeping are evicted first; wait when only busy ones could make room), and
  :func:`swapd.policy.hold` with the daemon's default rule: while the loader was busy
  40% of the last 5 minutes, a load whose victims have the larger CRF waits, up to
  30 s from its oldest request, and the loads queued behind it go first;
* ``swapd-nohold`` -- the same without holds (swapd before them);
* ``swapd-lru``  -- the same function without CRFs: least recently used first (swapd
  before the CRF);
* ``one-at-a-time`` -- the same function with ``max_running: 1`` (llama-swap's default);
* ``lru-count-4`` / ``lru-count-3`` -- LRU by model count, ignoring memory (llama.cpp's
  router ``models_max=4``; Ollama's 3 per GPU). A load that does not fit in memory
  fails at the end of its load time (an OOM), then every idle model is evicted and
  the load is retried;
* ``hold-always`` -- a what-if: ``swapd`` with the hold whatever the loader's load
  (TinyLFU's admission test, bounded at 30 s);
* ``belady``     -- an offline reference that knows the future: evict the idle
  resident whose next request is furthest away, only as many as the load needs
  (optimal for equal sizes and costs; with mixed sizes a strong reference rather than
  a proven bound);
* ``compulsory`` -- a true lower bound: each model used at all is loaded once.

Tiers (``--tiers``): the same traces with vLLM's published restart and wake times,
every victim handed to :func:`swapd.policy.demotions` (sleep into the ram tier or
stop) and the tier checked with :func:`swapd.policy.ram_overflow`, for several ram
budgets; a budget of 0 is plain stop/start. Their reference is ``belady-tiers``:
the same functions with every ranking (plan, demotions, overflow) by next use, so the
device evicts and the ram tier drops whatever is wanted last; and ``belady-tiers-cost``,
the same next-use rate weighed by start seconds per byte as swapd weighs its CRF.
Neither is a proven bound with mixed sizes and costs: the tables give each row's load
time over ``belady-tiers`` and over the better of the two.

It also prints, for the default rate and the top of the rate sweep, where the load
time goes (loads, evictions, evicted models requested again within 10 or 60 s), and
with ``--grid-seeds N`` swapd's load time over belady's for several CRF half-lives.

    python scripts/simulate_policy.py [--seed N] [--hours H] [--quick] [--plots docs/img]
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _bench
import numpy as np
from _bench import Json

from swapd import policy

GIB = 1024**3
SIZES_GIB = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
BUDGET_GIB = 24.0
SECONDS_PER_GIB = 1.5
LOAD_BASE_S = 0.5
POLICIES = (
    "swapd",
    "swapd-nohold",
    "swapd-lru",
    "one-at-a-time",
    "lru-count-4",
    "lru-count-3",
    "hold-always",
    "belady",
)
HOLD = policy.HoldRule()  # the daemon's defaults: hold_max 30s, hold_busy 0.4
HOLD_ALWAYS = policy.HoldRule(max_s=HOLD.max_s, busy=0.0)
# vLLM's sleep-mode figures (A100): a restart takes 38-58 s, a wake from level 1
# 0.26-0.82 s. Both are spread linearly over the models by size, smallest to largest.
VLLM_COLD_S = (38.0, 58.0)
VLLM_WAKE_S = (0.26, 0.82)
# What a sleeping vLLM keeps on the device (CUDA context, buffers outside the sleep
# allocator): an assumption, not a published figure.
ASLEEP_GIB = 0.5
HOST_RAM_GIB = 64.0
TIER_POLICIES = (
    "swapd",
    "swapd-nohold",
    "swapd-lru",
    "one-at-a-time",
    "belady",
    "belady-tiers",
    "belady-tiers-cost",
)
REUSE_WINDOWS_S = (10.0, 60.0)


@dataclass(frozen=True)
class Model:
    """One simulated model: its memory, its start from disk and its wake from the ram tier."""

    name: str
    size: int
    load_s: float
    wake_s: float


@dataclass(frozen=True)
class Request:
    """One request: when it arrives, which model, how long it is served."""

    at: float
    model: str
    duration: float


# ---------------------------------------------------------------- traces


def _spread(span: tuple[float, float], size_gib: float) -> float:
    low, high = SIZES_GIB[0], SIZES_GIB[-1]
    return span[0] + (span[1] - span[0]) * (size_gib - low) / (high - low)


def make_models(timing: str = "disk") -> dict[str, Model]:
    """Eight models of 1 to 12 GiB (37.5 GiB in all, against a 24 GiB budget).

    ``disk``: a load takes 0.5 s + 1.5 s/GiB; ``vllm``: vLLM's restart and wake times;
    ``mixed``: two engines on one host, vLLM's times for every other model (the 1, 2,
    4 and 8 GiB ones) and the disk's for the rest.
    """
    models = {}
    for i, s in enumerate(SIZES_GIB):
        name = f"m{i}-{s:g}g"
        if timing == "vllm" or (timing == "mixed" and i % 2 == 0):
            load, wake = _spread(VLLM_COLD_S, s), _spread(VLLM_WAKE_S, s)
        else:
            load = wake = LOAD_BASE_S + SECONDS_PER_GIB * s
        models[name] = Model(name, int(s * GIB), load, wake)
    return models


def _duration(rng: random.Random) -> float:
    # Generation times: log-normal, median 2 s, a long tail.
    return min(60.0, rng.lognormvariate(math.log(2.0), 0.8))


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (k + 1) ** s for k in range(n)]


def zipf_trace(rng: random.Random, names: list[str], horizon: float, rate: float) -> list[Request]:
    """Poisson arrivals; model popularity Zipf(1.1) over a shuffled ranking."""
    ranked = rng.sample(names, len(names))
    weights = _zipf_weights(len(ranked), 1.1)
    out: list[Request] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= horizon:
            return out
        out.append(Request(t, rng.choices(ranked, weights)[0], _duration(rng)))


def bursty_trace(
    rng: random.Random, names: list[str], horizon: float, rate: float
) -> list[Request]:
    """Sessions: one model gets a burst of requests close together, then another model."""
    out: list[Request] = []
    t = 0.0
    mean_burst = 8
    while t < horizon:
        model = rng.choice(names)
        for _ in range(1 + int(rng.expovariate(1 / mean_burst))):
            t += rng.expovariate(4 * rate)
            out.append(Request(t, model, _duration(rng)))
        t += rng.expovariate(rate / mean_burst)
    return [r for r in out if r.at < horizon]


def diurnal_trace(
    rng: random.Random, names: list[str], horizon: float, rate: float
) -> list[Request]:
    """A day compressed into the horizon: the rate swings 10x, and so does who is popular."""
    day, night = names[: len(names) // 2], names[len(names) // 2 :]
    out: list[Request] = []
    t = 0.0
    peak = 1.8 * rate
    while True:  # thinning of a Poisson process at the peak rate
        t += rng.expovariate(peak)
        if t >= horizon:
            return out
        phase = math.sin(2 * math.pi * t / horizon)
        level = 0.55 + 0.45 * phase
        if rng.random() < level:
            pool = day if rng.random() < 0.5 + 0.4 * phase else night
            out.append(Request(t, rng.choice(pool), _duration(rng)))


def mixed_trace(rng: random.Random, names: list[str], horizon: float, rate: float) -> list[Request]:
    """A Zipf background, bursty sessions and a diurnal swing at once, a third of the rate each."""
    parts = [
        zipf_trace(rng, names, horizon, rate / 3),
        bursty_trace(rng, names, horizon, rate / 3),
        diurnal_trace(rng, names, horizon, rate / 3),
    ]
    return sorted((r for part in parts for r in part), key=lambda r: r.at)


TRACES: dict[str, Callable[[random.Random, list[str], float, float], list[Request]]] = {
    "zipf": zipf_trace,
    "bursty": bursty_trace,
    "diurnal": diurnal_trace,
    "mixed": mixed_trace,
}


# ---------------------------------------------------------------- simulation state


@dataclass
class Slot:
    """A model with a process: on the device (loading or ready), or asleep in the ram tier."""

    model: Model
    loading: bool = True
    in_flight: int = 0
    last_used: float = 0.0
    asleep: bool = False


@dataclass
class Counts:
    """What a replay did: the loads, the tier moves and the evictions behind them."""

    cold: int = 0
    wakes: int = 0
    sleeps: int = 0
    load_time: float = 0.0  # the loader's time: cold starts, wakes and sleeps
    ooms: int = 0
    evictions: int = 0  # models taken off the device (slept or stopped)
    reused: dict[float, int] = field(default_factory=lambda: dict.fromkeys(REUSE_WINDOWS_S, 0))
    inversions: int = 0  # evictions of a model with a larger CRF than the one loaded
    holds: int = 0  # loads held at least once
    overflow: int = 0  # actions ram_overflow asked for
    by_model: dict[str, int] = field(default_factory=dict)  # cold starts and wakes


@dataclass
class Sim:
    """Everything that changes while a trace is replayed."""

    models: dict[str, Model]
    budget: int
    future: dict[str, list[float]]
    ram_budget: int = 0  # 0: no ram tier, victims stop
    resident: dict[str, Slot] = field(default_factory=dict)
    pending: dict[str, list[Request]] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)
    crf: dict[str, tuple[float, float]] = field(default_factory=dict)  # value, when
    half_life: float = policy.CRF_HALF_LIFE_S
    loader_busy: bool = False
    spans: list[tuple[float, float]] = field(default_factory=list)  # the loader's recent work
    held: set[str] = field(default_factory=set)
    retry_after_oom: set[str] = field(default_factory=set)
    events: list[tuple[float, int, str, str, float]] = field(default_factory=list)
    seq: int = 0
    counts: Counts = field(default_factory=Counts)
    waits: list[float] = field(default_factory=list)
    # Ranks residents and sleepers in place of the CRF everywhere (plan, demotions, the
    # tier's overflow): an oracle's value; None for the CRF (or last use without it).
    value: Callable[[Sim, str, float], float] | None = None
    costed: bool = False  # the oracle's value is weighed by start times too

    def rank(self, name: str, now: float, *, crf: bool) -> float | None:
        """What the policy functions order ``name`` by (higher: kept longer)."""
        if self.value is not None:
            return self.value(self, name, now)
        return self.crf_now(name, now) if crf else None

    def reload_s(self, name: str) -> float | None:
        """A start's time, as swapd's manager measures it for the policy.

        None under an oracle's value, which ranks on its own (unless ``costed``).
        """
        return self.models[name].load_s if self.value is None or self.costed else None

    def usage(self, name: str) -> int:
        """Device memory a model holds: all of it, or what it keeps asleep."""
        slot = self.resident[name]
        return int(ASLEEP_GIB * GIB) if slot.asleep else slot.model.size

    def used(self) -> int:
        """Device memory held by every model with a process."""
        return sum(self.usage(n) for n in self.resident)

    def need(self, name: str) -> int:
        """What a load asks of the device: a sleeping process already holds part of it."""
        own = self.usage(name) if name in self.resident else 0
        return self.models[name].size - own

    def busy(self, name: str) -> bool:
        """Not evictable now: loading, serving, or awaited."""
        slot = self.resident[name]
        return slot.loading or slot.in_flight > 0 or bool(self.pending.get(name))

    def push(self, at: float, kind: str, name: str, value: float = 0.0) -> None:
        """Schedule an event."""
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, name, value))

    def touch(self, name: str, now: float) -> None:
        """A request for ``name`` arrived: its CRF gains one, as swapd's manager counts it."""
        value, at = self.crf.get(name, (0.0, now))
        self.crf[name] = (policy.crf_update(value, at, now, self.half_life), now)

    def crf_now(self, name: str, now: float) -> float:
        """The model's CRF at ``now`` (0 before its first request)."""
        value, at = self.crf.get(name, (0.0, now))
        return policy.crf_decay(value, at, now, self.half_life)

    def busy_span(self, start: float, seconds: float, *, load: bool = True) -> None:
        """The loader works from ``start`` for ``seconds``: a load or a wake (``load``), or sleeps.

        Only loads and wakes are spans of the hold's busy share: the manager times those,
        from their admission on, and never the sleeps of their victims before it.
        """
        self.loader_busy = True
        self.counts.load_time += seconds
        if not load:
            return
        self.spans.append((start, start + seconds))
        while self.spans[0][1] < start - policy.HOLD_WINDOW_S:
            self.spans.pop(0)

    def next_use(self, name: str, now: float) -> float:
        """When ``name`` is next requested from ``now`` on (inf if never).

        A request at ``now`` itself counts: a model it asks for is busy once it is taken
        in, so an idle one has it still to come (an arrival at the same instant).
        """
        times = self.future[name]
        i = bisect.bisect_left(times, now)
        return times[i] if i < len(times) else math.inf


Plan = policy.Admit | policy.Wait | policy.Impossible
Planner = Callable[[Sim, str, float], Plan | policy.Hold]


def residents_view(sim: Sim, now: float, *, crf: bool, exclude: str) -> list[policy.Resident]:
    """The simulation's residents as swapd's manager shows them to the policy."""
    return [
        policy.Resident(
            name=n,
            device="sim",
            usage=sim.usage(n),
            last_used=s.last_used,
            busy=sim.busy(n),
            asleep=s.asleep,
            ram_via="sleep" if sim.ram_budget > 0 else None,
            ram_cost=s.model.size,  # sleep level 1: the weights go to host RAM
            crf=sim.rank(n, now, crf=crf),
            reload_s=sim.reload_s(n),
        )
        for n, s in sim.resident.items()
        if n != exclude
    ]


def ram_view(sim: Sim, now: float, *, crf: bool) -> policy.RamTier:
    """The ram tier as swapd's manager shows it: budget, host memory left, sleeping models."""
    entries = tuple(
        policy.RamEntry(
            n,
            s.model.size,
            s.last_used,
            "sleep",
            busy=sim.busy(n),
            crf=sim.rank(n, now, crf=crf),
            reload_s=sim.reload_s(n),
        )
        for n, s in sim.resident.items()
        if s.asleep
    )
    held = sum(e.bytes for e in entries)
    return policy.RamTier(sim.ram_budget, int(HOST_RAM_GIB * GIB) - held, entries)


def _device(sim: Sim) -> policy.DeviceView:
    return policy.DeviceView("sim", sim.budget, sim.budget - sim.used())


def plan_swapd_nohold(sim: Sim, name: str, now: float) -> Plan:
    """swapd before holds: memory budget, idle residents with the lowest CRF first."""
    residents = residents_view(sim, now, crf=True, exclude=name)
    return policy.plan_admission(sim.need(name), [_device(sim)], residents, policy.Limits())


def plan_held(rule: policy.HoldRule, *, weighed: bool = True) -> Planner:
    """swapd's plan, then :func:`swapd.policy.hold` with ``rule``, as the manager asks it.

    ``weighed=False``: the hold compares plain CRFs, as swapd's did before it weighed
    them by start times (the model's own start time withheld).
    """

    def plan(sim: Sim, name: str, now: float) -> Plan | policy.Hold:
        residents = residents_view(sim, now, crf=True, exclude=name)
        found = policy.plan_admission(sim.need(name), [_device(sim)], residents, policy.Limits())
        oldest = min(r.at for r in sim.pending[name])
        held = policy.hold(
            found,
            sim.crf_now(name, now),
            residents,
            busy=policy.loader_busy(sim.spans, now),
            waited=now - oldest,
            rule=rule,
            reload_s=sim.reload_s(name) if weighed else None,
        )
        if held is None:
            return found
        if name not in sim.held:
            sim.push(now + held.seconds, "tick", name)  # re-plan then, if nothing else happens
        return held

    return plan


def plan_swapd_lru(sim: Sim, name: str, now: float) -> Plan:
    """swapd before the CRF: no CRFs given, so least recently used first."""
    residents = residents_view(sim, now, crf=False, exclude=name)
    return policy.plan_admission(sim.need(name), [_device(sim)], residents, policy.Limits())


def plan_count(limit: int) -> Planner:
    """The policy with a model-count cap and no memory accounting at all."""

    def plan(sim: Sim, name: str, now: float) -> Plan:
        if name in sim.retry_after_oom:
            return plan_evict_all(sim, name, now)
        huge = policy.DeviceView("sim", 1 << 60, (1 << 60) - sim.used())
        limits = policy.Limits(reserve=0, max_running=limit)
        residents = residents_view(sim, now, crf=False, exclude=name)
        return policy.plan_admission(sim.need(name), [huge], residents, limits)

    return plan


def plan_one_at_a_time(sim: Sim, name: str, now: float) -> Plan:
    """llama-swap's default: a single model at a time (sleeping ones do not count)."""
    limits = policy.Limits(reserve=0, max_running=1)
    residents = residents_view(sim, now, crf=True, exclude=name)
    return policy.plan_admission(sim.need(name), [_device(sim)], residents, limits)


def plan_evict_all(sim: Sim, name: str, _now: float) -> Plan:
    """After an OOM: evict every idle model; wait for busy ones until the load fits."""
    idle = tuple(n for n in sim.resident if not sim.busy(n))
    free_after = sim.budget - sim.used() + sum(sim.usage(n) for n in idle)
    if free_after >= sim.need(name):
        return policy.Admit("sim", idle)
    busy = tuple(n for n in sim.resident if sim.busy(n))
    return policy.Wait("sim", busy)


def plan_belady(sim: Sim, name: str, now: float) -> Plan:
    """Offline: evict idle residents whose next request is furthest in the future.

    Only as many as the load needs: a victim whose room the later ones made is kept,
    the soonest wanted first (furthest first can take a small model, then a large one
    that alone makes the room).
    """
    need = sim.need(name)
    room = sim.budget - sim.used()
    idle = sorted(
        (n for n in sim.resident if n != name and not sim.busy(n)),
        key=lambda n: sim.next_use(n, now),
        reverse=True,
    )
    victims: list[str] = []
    for candidate in idle:
        if room >= need:
            break
        victims.append(candidate)
        room += sim.usage(candidate)
    if room >= need:
        for victim in reversed(victims):
            if room - sim.usage(victim) >= need:
                victims.remove(victim)
                room -= sim.usage(victim)
        return policy.Admit("sim", tuple(victims))
    if need > sim.budget:
        return policy.Impossible("larger than the budget")
    return policy.Wait("sim", tuple(n for n in sim.resident if sim.busy(n)))


def plan_by_value(value: Callable[[Sim, str, float], float]) -> Planner:
    """swapd's plan (no hold) with each resident ranked by ``value`` instead of its CRF.

    By the value alone: no start times, which the policy would weigh it by.
    """

    def plan(sim: Sim, name: str, now: float) -> Plan:
        residents = [
            dataclasses.replace(r, crf=value(sim, r.name, now), reload_s=None)
            for r in residents_view(sim, now, crf=True, exclude=name)
        ]
        return policy.plan_admission(sim.need(name), [_device(sim)], residents, policy.Limits())

    return plan


def whole_trace_count(sim: Sim, name: str, _now: float) -> float:
    """An oracle of long-run frequency: the model's requests over the whole trace."""
    return float(len(sim.future[name]))


def upcoming(window: float) -> Callable[[Sim, str, float], float]:
    """An oracle of the near future: the model's requests in the next ``window`` seconds."""

    def value(sim: Sim, name: str, now: float) -> float:
        times = sim.future[name]
        ahead = bisect.bisect_right(times, now + window) - bisect.bisect_right(times, now)
        return ahead + 1e-6 * sim.crf_now(name, now)  # ties: the CRF

    return value


VictimsCost = Callable[[Sim, str, tuple[str, ...], float], float]


def plan_least_cost(cost: Callable[[Sim, str, float], float]) -> Planner:
    """Evict the set of idle residents that makes room at the least summed ``cost``.

    Every subset is tried (eight models here); ties go to fewer victims. With the
    expected reload time as the cost this weighs a victim's size and reload time,
    which an ordering by one number (CRF, next use) cannot.
    """
    return plan_least_set(lambda sim, _name, victims, now: sum(cost(sim, v, now) for v in victims))


def plan_least_set(cost: VictimsCost) -> Planner:
    """Evict the set of idle residents that makes room at the least ``cost(sim, name, set, now)``.

    Every subset is tried (eight models here); ties go to fewer victims.
    """

    def plan(sim: Sim, name: str, now: float) -> Plan:
        need = sim.need(name)
        room = sim.budget - sim.used()
        if room >= need:
            return policy.Admit("sim", ())
        idle = [n for n in sim.resident if n != name and not sim.busy(n)]
        best: tuple[tuple[float, int], tuple[str, ...]] | None = None
        for k in range(1, len(idle) + 1):
            for victims in itertools.combinations(idle, k):
                if room + sum(sim.usage(v) for v in victims) < need:
                    continue
                key = (cost(sim, name, victims, now), k)
                if best is None or key < best[0]:
                    best = (key, victims)
        if best is not None:
            return policy.Admit("sim", best[1])
        if need > sim.budget:
            return policy.Impossible("larger than the budget")
        return policy.Wait("sim", tuple(n for n in sim.resident if sim.busy(n)))

    return plan


def sooner_next_use(sim: Sim, name: str, now: float) -> float:
    """An oracle: one over the time to the model's next request (0 if never), Belady's order."""
    return 1.0 / max(sim.next_use(name, now) - now, 1e-3)


def reload_rate(sim: Sim, name: str, now: float) -> float:
    """Expected reload seconds per second if evicted: CRF (a request rate) x reload time."""
    return sim.crf_now(name, now) * sim.models[name].load_s


def reload_before_next_use(sim: Sim, name: str, now: float) -> float:
    """An oracle: the reload time, spread over the time until the model's next request."""
    return sim.models[name].load_s / max(sim.next_use(name, now) - now, 1e-3)


# References for what an ordering could gain by knowing more than the past (not policies
# swapd could run): the true long-run frequency, and the demand of the next minutes. And
# what weighing victims by reload time could gain: with the past (the CRF), and with the
# future, where it beats belady, whose furthest-next-use order ignores size and cost.
ORACLES: dict[str, Planner] = {
    "oracle-frequency": plan_by_value(whole_trace_count),
    "oracle-next-300s": plan_by_value(upcoming(300.0)),
    "oracle-next-60s": plan_by_value(upcoming(60.0)),
    "crf-x-reload-time": plan_least_cost(reload_rate),
    "oracle-reload-before-next-use": plan_least_cost(reload_before_next_use),
}

PLANNERS: dict[str, Planner] = {
    "swapd": plan_held(HOLD),
    "swapd-nohold": plan_swapd_nohold,
    "swapd-lru": plan_swapd_lru,
    "one-at-a-time": plan_one_at_a_time,
    "lru-count-4": plan_count(4),
    "lru-count-3": plan_count(3),
    "hold-always": plan_held(HOLD_ALWAYS),
    "belady": plan_belady,
    # Belady on both levels: swapd's plan, demotions and overflow, each ranking by next use,
    # so the device evicts and the ram tier drops whatever is wanted last (the tiers'
    # reference: plain belady stops sleepers for their 0.5 GiB, losing their copy in RAM).
    "belady-tiers": plan_swapd_nohold,
    # The same, its next-use rate weighed as swapd weighs its CRF: times each model's
    # start seconds, per byte where room is bytes (swapd.policy._worth).
    "belady-tiers-cost": plan_swapd_nohold,
    **ORACLES,
}
# Policies whose every ranking is an oracle's value.
VALUES: dict[str, Callable[[Sim, str, float], float]] = {
    "belady-tiers": sooner_next_use,
    "belady-tiers-cost": sooner_next_use,
}
# Oracles whose value the policy weighs by each model's start time, as it does a CRF.
COSTED_ORACLES = {"belady-tiers-cost"}
# Demotions see CRFs where the plan does.
USES_CRF = {"swapd", "swapd-nohold", "one-at-a-time", "hold-always"}


# ---------------------------------------------------------------- event loop


def on_arrival(sim: Sim, req: Request, now: float) -> None:
    """Serve at once if ready; otherwise wait, and queue a load (or wake) if none is coming."""
    sim.touch(req.model, now)
    slot = sim.resident.get(req.model)
    if slot is not None and not slot.loading and not slot.asleep:
        serve(sim, req, now)
        return
    sim.pending.setdefault(req.model, []).append(req)
    if (slot is None or slot.asleep) and req.model not in sim.queue:
        sim.queue.append(req.model)


def serve(sim: Sim, req: Request, now: float) -> None:
    """Start serving a request on a ready model."""
    slot = sim.resident[req.model]
    slot.in_flight += 1
    slot.last_used = now
    sim.waits.append(now - req.at)
    sim.push(now + req.duration, "finish", req.model)


def try_admit(sim: Sim, planner: Planner, now: float, *, crf: bool) -> None:
    """Start the next queued load if the loader is free and the plan allows it.

    After an eviction the head is planned again on the new state, as swapd's manager
    re-plans on fresh readings: a model put to sleep still holds part of its memory.
    A held load lets the loads queued behind it go first, as a held load in the
    manager lets go of the admission lock while it waits.
    """
    while not sim.loader_busy and sim.queue:
        found = next_to_plan(sim, planner, now)
        if found is None:
            return
        name, plan = found
        if isinstance(plan, policy.Impossible):
            sim.queue.remove(name)
            sim.pending.pop(name, None)
            continue
        # The daemon's load plan: the victims' moves down, then the start or the wake.
        down = down_moves(sim, plan.victims, name, now, crf=crf) if plan.victims else ()
        slot = sim.resident.get(name)
        waking = slot is not None and slot.asleep
        first = policy.load_plan(name, plan, down, waking=waking, staged=True)[0]
        if isinstance(first, policy.Start | policy.Wake):
            sim.queue.remove(name)
            start_load(sim, name, now)
            continue
        move_down(sim, down, name, now, crf=crf)


def next_to_plan(
    sim: Sim, planner: Planner, now: float
) -> tuple[str, policy.Admit | policy.Impossible] | None:
    """The first queued model whose plan is not held, and its plan; None to wait.

    A plan that waits for busy models stops the scan: swapd's admission lock is
    first come, first served.
    """
    for name in sim.queue:
        plan = planner(sim, name, now)
        if isinstance(plan, policy.Hold):
            if name not in sim.held:
                sim.held.add(name)
                sim.counts.holds += 1
            continue
        if isinstance(plan, policy.Wait):
            return None
        return name, plan
    return None


def down_moves(
    sim: Sim, victims: tuple[str, ...], loading: str, now: float, *, crf: bool
) -> tuple[policy.Down, ...]:
    """What :func:`swapd.policy.demotions` says for the victims, counted as evictions."""
    residents = {r.name: r for r in residents_view(sim, now, crf=crf, exclude=loading)}
    sim.counts.inversions += sum(
        1 for v in victims if sim.crf_now(v, now) > sim.crf_now(loading, now)
    )
    for v in victims:
        if not sim.resident[v].asleep:
            sim.counts.evictions += 1
            for window in REUSE_WINDOWS_S:
                sim.counts.reused[window] += sim.next_use(v, now) - now < window
    return policy.demotions([residents[v] for v in victims], ram_view(sim, now, crf=crf))


def move_down(
    sim: Sim, actions: tuple[policy.Down, ...], loading: str, now: float, *, crf: bool
) -> None:
    """Carry out the moves down, then check the tier, as the manager does."""
    moving = carry_out(sim, actions)
    # As the manager does after demotions: push down whatever the tier cannot hold.
    overflow = policy.ram_overflow(ram_view(sim, now, crf=crf))
    sim.counts.overflow += len(overflow)
    moving += carry_out(sim, overflow)
    if moving:
        # The manager waits for the sleeps before it re-plans: the loader is busy meanwhile.
        sim.busy_span(now, moving, load=False)
        sim.push(now + moving, "moved", loading)


def carry_out(sim: Sim, actions: tuple[policy.Down, ...]) -> float:
    """Apply the policy's actions; return the seconds the sleeps take."""
    moving = 0.0
    for action in actions:
        if isinstance(action, policy.Sleep):
            slot = sim.resident[action.model]
            slot.asleep = True
            sim.counts.sleeps += 1
            moving += slot.model.wake_s  # the same copy as a wake, the other way
        elif isinstance(action, policy.Stop):
            del sim.resident[action.model]
        else:
            raise AssertionError(f"vLLM models never lock pages: {action}")
    return moving


def start_load(sim: Sim, name: str, now: float) -> None:
    """Begin a cold start, or a wake; an over-budget start (count policies) ends in an OOM."""
    model = sim.models[name]
    oom = sim.used() + sim.need(name) > sim.budget
    sim.counts.by_model[name] = sim.counts.by_model.get(name, 0) + 1
    slot = sim.resident.get(name)
    if slot is not None:  # asleep: wake it
        slot.asleep = False
        slot.loading = True
        slot.last_used = now
        seconds = model.wake_s
        sim.counts.wakes += 1
    else:
        sim.resident[name] = Slot(model, last_used=now)
        seconds = model.load_s
        sim.counts.cold += 1
    sim.held.discard(name)
    sim.busy_span(now, seconds)
    sim.push(now + seconds, "oom" if oom else "loaded", name)


def on_loaded(sim: Sim, name: str, now: float) -> None:
    """The model is ready: serve everyone who waited for it."""
    sim.loader_busy = False
    sim.retry_after_oom.discard(name)
    slot = sim.resident[name]
    slot.loading = False
    for req in sim.pending.pop(name, []):
        serve(sim, req, now)


def on_oom(sim: Sim, name: str) -> None:
    """The load failed for lack of memory: drop it and retry it first, evicting everything idle."""
    sim.loader_busy = False
    sim.counts.ooms += 1
    del sim.resident[name]
    sim.retry_after_oom.add(name)
    sim.queue.appendleft(name)


def simulate(  # noqa: PLR0913 - the trace, its models, the policy and three knobs
    trace: list[Request],
    models: dict[str, Model],
    policy_name: str,
    *,
    ram_budget: int = 0,
    half_life: float = policy.CRF_HALF_LIFE_S,
    planner: Planner | None = None,
) -> Json:
    """Replay one trace under one policy; return loads, load time, OOMs, waits and evictions.

    ``planner`` replaces the policy's own (its name still decides whether CRFs are kept).
    """
    planner = planner or PLANNERS[policy_name]
    crf = policy_name in USES_CRF
    future: dict[str, list[float]] = {n: [] for n in models}
    for req in trace:
        future[req.model].append(req.at)
    sim = Sim(
        models,
        int(BUDGET_GIB * GIB),
        future,
        ram_budget,
        half_life=half_life,
        value=VALUES.get(policy_name),
        costed=policy_name in COSTED_ORACLES,
    )
    for i, req in enumerate(trace):
        sim.push(req.at, "arrive", req.model, float(i))
    now = 0.0
    while sim.events:
        now, _, kind, name, value = heapq.heappop(sim.events)
        if kind == "arrive":
            on_arrival(sim, trace[int(value)], now)
        elif kind == "finish":
            slot = sim.resident[name]
            slot.in_flight -= 1
            slot.last_used = now
        elif kind == "loaded":
            on_loaded(sim, name, now)
        elif kind == "oom":
            on_oom(sim, name)
        elif kind == "moved":
            sim.loader_busy = False
        try_admit(sim, planner, now, crf=crf)
    waits = np.asarray(sim.waits)
    c = sim.counts
    loads = c.cold + c.wakes
    return {
        "requests": len(trace),
        "served": len(sim.waits),
        "loads": loads,
        "cold_starts": c.cold,
        "wakes": c.wakes,
        "sleeps": c.sleeps,
        "load_time_s": c.load_time,
        "ooms": c.ooms,
        "evictions": c.evictions,
        **{f"reused_within_{w:g}s": n for w, n in c.reused.items()},
        "inversions": c.inversions,
        "holds": c.holds,
        "ram_overflow_actions": c.overflow,
        "loads_by_model": {n: c.by_model.get(n, 0) for n in models},
        "requests_per_load": len(trace) / loads if loads else math.nan,
        "loader_busy": c.load_time / now if now else math.nan,
        "wait_mean_s": float(waits.mean()),
        "wait_p50_s": float(np.percentile(waits, 50)),
        "wait_p95_s": float(np.percentile(waits, 95)),
        "wait_p99_s": float(np.percentile(waits, 99)),
    }


def compulsory(trace: list[Request], models: dict[str, Model]) -> Json:
    """The true lower bound: every model that is used is loaded once."""
    used = {r.model for r in trace}
    return {"loads": len(used), "load_time_s": sum(models[n].load_s for n in used)}


def traces(seed: int, horizon: float, rate: float, names: list[str]) -> dict[str, list[Request]]:
    """Every trace, each from its own seeded generator."""
    return {
        name: make(random.Random(seed * 100 + i), names, horizon, rate)
        for i, (name, make) in enumerate(TRACES.items())
    }


def run_all(seed: int, horizon: float, rate: float, timing: str = "disk") -> dict[str, Json]:
    """Every trace under every policy, with the models' ``timing`` (:func:`make_models`)."""
    models = make_models(timing)
    out: dict[str, Json] = {}
    for trace_name, trace in traces(seed, horizon, rate, list(models)).items():
        results = {p: simulate(trace, models, p) for p in POLICIES}
        results["compulsory"] = compulsory(trace, models)
        best = results["belady"]["load_time_s"]
        single = results["one-at-a-time"]["load_time_s"]
        for name in POLICIES:
            r = results[name]
            r["vs_belady"] = r["load_time_s"] / best if best else math.nan
            r["reduction_vs_one_at_a_time"] = 1 - r["load_time_s"] / single if single else math.nan
        out[trace_name] = results
    return out


def run_tiers(seed: int, horizon: float, rate: float, ram_gib: list[float]) -> dict[str, Json]:
    """Every trace with vLLM timings, each tier policy at every ram budget (0: no tier)."""
    models = make_models("vllm")
    out: dict[str, Json] = {}
    for trace_name, trace in traces(seed, horizon, rate, list(models)).items():
        out[trace_name] = {
            p: {f"{g:g}": simulate(trace, models, p, ram_budget=int(g * GIB)) for g in ram_gib}
            for p in TIER_POLICIES
        }
    return out


Runs = Callable[[list[Request], dict[str, Model]], dict[str, Json]]


def replays(
    seeds: int, horizon: float, rate: float, runs: Runs, timing: str = "disk"
) -> Iterator[tuple[str, Json, dict[str, Json]]]:
    """Every trace of seeds 1..N: its name, belady's result on it, and ``runs``' results."""
    models = make_models(timing)
    for seed in range(1, seeds + 1):
        for trace_name, trace in traces(seed, horizon, rate, list(models)).items():
            yield trace_name, simulate(trace, models, "belady"), runs(trace, models)


def mean_vs_belady(
    seeds: int, horizon: float, rate: float, runs: Runs
) -> dict[str, dict[str, float]]:
    """Each of ``runs``' load times over belady's, per trace and overall, mean of seeds 1..N."""
    ratios: dict[str, dict[str, list[float]]] = {}
    for trace_name, best, results in replays(seeds, horizon, rate, runs):
        for key, r in results.items():
            ratios.setdefault(key, {}).setdefault(trace_name, []).append(
                r["load_time_s"] / best["load_time_s"]
            )
    return {
        key: {t: float(np.mean(v)) for t, v in by_trace.items()}
        | {"all": float(np.mean([x for v in by_trace.values() for x in v]))}
        for key, by_trace in ratios.items()
    }


def half_life_grid(
    seeds: int, horizon: float, rate: float, half_lives: list[float]
) -> dict[str, dict[str, float]]:
    """swapd's load time over belady's, averaged over seeds 1..N, for each CRF half-life."""

    def runs(trace: list[Request], models: dict[str, Model]) -> dict[str, Json]:
        out = {"lru": simulate(trace, models, "swapd-lru")}
        return out | {f"{h:g}": simulate(trace, models, "swapd", half_life=h) for h in half_lives}

    return mean_vs_belady(seeds, horizon, rate, runs)


def oracle_grid(seeds: int, horizon: float, rate: float) -> dict[str, dict[str, float]]:
    """Load time over belady's, averaged over seeds 1..N: swapd's orderings and the oracles."""

    def runs(trace: list[Request], models: dict[str, Model]) -> dict[str, Json]:
        return {n: simulate(trace, models, n) for n in ("swapd-lru", "swapd-nohold", *ORACLES)}

    return mean_vs_belady(seeds, horizon, rate, runs)


HOLD_GRID_BUSY = (0.0, 0.1, 0.2, 0.3, 0.4)
HOLD_GRID_MAX_S = (10.0, 30.0)


def hold_grid(
    seeds: int, horizon: float, rate: float, timing: str = "disk", *, full: bool = True
) -> dict[str, dict[str, float]]:
    """For each ``hold_busy`` / ``hold_max``: load time over belady's and the p95 wait.

    Means over every trace of seeds 1..N; belady's own p95 wait for scale. The daemon's
    keys trade one for the other: holding at a lower loader share saves loads and makes
    the held requests wait. The defaults also with plain CRFs compared (the hold before
    it weighed start times), and with no hold; ``full=False`` runs only those three.
    """
    grid = [(busy, max_s) for busy in HOLD_GRID_BUSY for max_s in HOLD_GRID_MAX_S]
    settings = {
        f"hold_busy {busy:g}, hold_max {max_s:g}s": plan_held(
            policy.HoldRule(max_s=max_s, busy=busy)
        )
        for busy, max_s in (grid if full else [(HOLD.busy, HOLD.max_s)])
    }
    settings[f"hold_busy {HOLD.busy:g}, hold_max {HOLD.max_s:g}s, plain CRFs"] = plan_held(
        HOLD, weighed=False
    )
    settings["no hold"] = plan_swapd_nohold

    def runs(trace: list[Request], models: dict[str, Model]) -> dict[str, Json]:
        return {k: simulate(trace, models, "swapd", planner=p) for k, p in settings.items()}

    rows: dict[str, list[tuple[float, float]]] = {}
    for _, best, results in replays(seeds, horizon, rate, runs, timing):
        rows.setdefault("belady", []).append((1.0, best["wait_p95_s"]))
        for key, r in results.items():
            ratio = r["load_time_s"] / best["load_time_s"]
            rows.setdefault(key, []).append((ratio, r["wait_p95_s"]))
    return {
        key: {
            "x_belady": float(np.mean([x for x, _ in v])),
            "wait_p95_s": float(np.mean([w for _, w in v])),
        }
        for key, v in rows.items()
    }


def print_hold_grid(grid: dict[str, dict[str, float]], seeds: int, rate: float) -> None:
    """Load time over belady's and p95 wait for each hold setting."""
    print(f"\nhold settings: mean of every trace, seeds 1-{seeds}, {rate:g} requests/s")
    rows = [[k, v["x_belady"], v["wait_p95_s"]] for k, v in grid.items()]
    _bench.print_table(["setting", "load time x belady", "p95 wait (s)"], rows)


# ---------------------------------------------------------------- report


def print_report(results: dict[str, Json]) -> None:
    """One table: every trace and policy."""
    rows = []
    for trace, by_policy in results.items():
        for name in (*POLICIES, "compulsory"):
            r = by_policy[name]
            rows.append(
                [
                    f"{trace}/{name}",
                    r["loads"],
                    r["load_time_s"],
                    r.get("ooms", "-"),
                    r.get("vs_belady", "-"),
                    r.get("reduction_vs_one_at_a_time", "-"),
                    r.get("wait_p50_s", "-"),
                    r.get("wait_p95_s", "-"),
                ]
            )
    _bench.print_table(
        [
            "trace/policy",
            "loads",
            "load time s",
            "OOMs",
            "x belady",
            "vs one-at-a-time",
            "wait p50 s",
            "wait p95 s",
        ],
        rows,
    )


SWEEP_POLICIES = ("swapd-lru", "swapd-nohold", "swapd", "one-at-a-time", "hold-always", "belady")


def print_sweep(sweep: dict[str, dict[str, Json]]) -> None:
    """The offered-load sweep: load time and p95 wait side by side, for every trace and rate."""
    print("\noffered-load sweep: total load time s / p95 wait s")
    rows = []
    for rate, results in sweep.items():
        for trace, by_policy in results.items():
            cells = [
                f"{by_policy[p]['load_time_s']:.0f} / {by_policy[p]['wait_p95_s']:.1f}"
                for p in SWEEP_POLICIES
            ]
            s = by_policy["swapd"]
            rows.append(
                [f"{rate}/{trace}", *cells, s["vs_belady"], s["reduction_vs_one_at_a_time"]]
            )
    _bench.print_table(
        ["rate/trace", *SWEEP_POLICIES, "swapd x belady", "swapd vs one-at-a-time"], rows
    )


def print_diagnosis(rate: str, results: dict[str, Json]) -> None:
    """Where the load time goes: loads, evictions and how soon the evicted come back."""
    print(f"\nevictions and re-requests at {rate} requests/s")
    rows = []
    for trace, by_policy in results.items():
        for name in SWEEP_POLICIES:
            r = by_policy[name]
            rows.append(
                [
                    f"{trace}/{name}",
                    r["loads"],
                    r["requests_per_load"],
                    r["load_time_s"] / r["loads"],
                    r["loader_busy"],
                    r["evictions"],
                    r["reused_within_10s"],
                    r["reused_within_60s"],
                    r["inversions"],
                    r["wait_p95_s"],
                ]
            )
    _bench.print_table(
        [
            "trace/policy",
            "loads",
            "requests/load",
            "s/load",
            "loader busy",
            "evictions",
            "back <10 s",
            "back <60 s",
            "CRF inversions",
            "wait p95 s",
        ],
        rows,
    )


def print_tiers(tiers: dict[str, Json]) -> None:
    """Tiers on against plain stop/start, with vLLM's restart and wake times."""
    print("\nram tier (vLLM sleep level 1) against stop/start; ram budget GiB, 0 = no tier")
    rows = []
    for trace, by_policy in tiers.items():
        reference = by_policy.get("belady-tiers", {})
        costed = by_policy.get("belady-tiers-cost", {})
        for name, by_budget in by_policy.items():
            for budget, r in by_budget.items():
                best = reference.get(budget, {}).get("load_time_s")
                both = [
                    x for x in (best, costed.get(budget, {}).get("load_time_s")) if x is not None
                ]
                rows.append(
                    [
                        f"{trace}/{name}/{budget}",
                        r["cold_starts"],
                        r["wakes"],
                        r["sleeps"],
                        r["load_time_s"],
                        r["load_time_s"] / best if best else "-",
                        r["load_time_s"] / min(both) if both else "-",
                        r["wait_p50_s"],
                        r["wait_p95_s"],
                        r["ram_overflow_actions"],
                    ]
                )
    _bench.print_table(
        [
            "trace/policy/ram",
            "cold starts",
            "wakes",
            "sleeps",
            "load time s",
            "x belady-tiers",
            "x the better one",
            "wait p50 s",
            "wait p95 s",
            "overflow",
        ],
        rows,
    )


def print_grid(grid: dict[str, dict[str, float]], seeds: int, rate: float) -> None:
    """Mean load time over belady's for each half-life (``lru``: no CRF)."""
    print(f"\nCRF half-life: swapd x belady, mean of seeds 1-{seeds}, {rate:g} requests/s")
    columns = list(next(iter(grid.values())))
    rows = [[key, *(values[c] for c in columns)] for key, values in grid.items()]
    _bench.print_table(["half-life s", *columns], rows)


def print_oracles(grid: dict[str, dict[str, float]], seeds: int, rate: float) -> None:
    """Each ordering's load time over belady's, mean of seeds 1-N."""
    print(f"\nknowing more than the past: x belady, mean of seeds 1-{seeds}, {rate:g} requests/s")
    columns = list(next(iter(grid.values())))
    rows = [[key, *(values[c] for c in columns)] for key, values in grid.items()]
    _bench.print_table(["ordering", *columns], rows)


def plot_sweep(sweep: dict[str, dict[str, Json]], folder: Path) -> str:
    """Total load time and p95 wait on the mixed trace against the offered rate, per policy."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(sweep)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in (
        (axes[0], "load_time_s", "total load time (s)"),
        (axes[1], "wait_p95_s", "p95 wait before service (s)"),
    ):
        for name in POLICIES:
            ax.plot(
                [float(r) for r in rates],
                [sweep[r]["mixed"][name][metric] for r in rates],
                marker="o",
                label=name,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("mean request rate (requests/s)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("mixed trace against offered load")
    fig.tight_layout()
    path = folder / "policy_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot(results: dict[str, Json], folder: Path) -> list[str]:
    """Bar charts of total load time and p95 wait per trace and policy."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    trace_names = list(results)
    written = []
    for metric, label, file in (
        ("load_time_s", "total load time (s)", "policy_load_time.png"),
        ("wait_p95_s", "p95 wait before service (s)", "policy_wait_p95.png"),
    ):
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(POLICIES)
        for k, name in enumerate(POLICIES):
            xs = [i + (k - (len(POLICIES) - 1) / 2) * width for i in range(len(trace_names))]
            ax.bar(xs, [results[t][name][metric] for t in trace_names], width, label=name)
        ax.set_xticks(range(len(trace_names)), trace_names)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
        ax.set_title(f"{label}: 8 models 1-12 GiB, budget {BUDGET_GIB:g} GiB")
        fig.tight_layout()
        path = folder / file
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def plot_tiers(tiers: dict[str, dict[str, Json]], folder: Path) -> str:
    """swapd's total load time and p95 wait per trace, for each ram budget; a row per rate."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tiers), 2, figsize=(11, 3.6 * len(tiers)), squeeze=False)
    for row, (rate, by_trace) in zip(axes, tiers.items(), strict=True):
        trace_names = list(by_trace)
        budgets = list(by_trace[trace_names[0]]["swapd"])
        width = 0.8 / len(budgets)
        for ax, metric, label in (
            (row[0], "load_time_s", "total load time (s)"),
            (row[1], "wait_p95_s", "p95 wait (s)"),
        ):
            for k, budget in enumerate(budgets):
                xs = [i + (k - (len(budgets) - 1) / 2) * width for i in range(len(trace_names))]
                values = [by_trace[t]["swapd"][budget][metric] for t in trace_names]
                name = "no ram tier" if budget == "0" else f"ram {budget} GiB"
                ax.bar(xs, values, width, label=name)
            ax.set_xticks(range(len(trace_names)), trace_names)
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.set_title(f"{rate} requests/s", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("swapd with vLLM restart and wake times: ram tier against stop/start")
    fig.tight_layout()
    path = folder / "policy_tiers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def parse_args() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hours", type=float, default=4.0, help="simulated time per trace")
    p.add_argument("--rate", type=float, default=0.1, help="mean requests per second")
    p.add_argument(
        "--sweep", default="0.05,0.1,0.2,0.5", help="rates for the offered-load sweep ('' skips)"
    )
    p.add_argument(
        "--tiers", default="0,8,16,32", help="ram budgets in GiB for the tier runs ('' skips)"
    )
    p.add_argument("--tier-rates", default="0.02,0.1", help="requests per second for the tier runs")
    p.add_argument("--grid-seeds", type=int, default=0, help="seeds for the half-life grid")
    p.add_argument("--grid-half-lives", default="60,120,300,600,1200,2400")
    p.add_argument(
        "--oracle-seeds", type=int, default=0, help="seeds for the oracle orderings (0 skips)"
    )
    p.add_argument(
        "--hold-seeds", type=int, default=0, help="seeds for the hold settings grid (0 skips)"
    )
    p.add_argument(
        "--timing",
        choices=("disk", "mixed"),
        default="disk",
        help="load times of the main run, the sweep and the hold grid: the disk's for every "
        "model, or vLLM's for every other one (two engines on one host)",
    )
    p.add_argument(
        "--hold-grid",
        choices=("full", "defaults"),
        default="full",
        help="every hold setting, or only the defaults (weighed, plain CRFs, no hold)",
    )
    p.add_argument("--quick", action="store_true", help="one simulated hour")
    p.add_argument("--plots", type=Path, help="write PNG charts into this folder")
    p.add_argument("--out", type=Path, default=Path("out/simulate_policy.json"))
    return p.parse_args()


def main() -> None:
    """Simulate, print the tables, write the JSON (and the charts when asked)."""
    args = parse_args()
    info = _bench.machine_info()
    hours = 1.0 if args.quick else args.hours
    results = run_all(args.seed, hours * 3600, args.rate, args.timing)
    _bench.print_machine(info)
    print(f"rate {args.rate:g} requests/s, {hours:g} simulated hours per trace")
    print_report(results)
    rates = [float(r) for r in args.sweep.split(",") if r]
    sweep = {f"{r:g}": run_all(args.seed, hours * 3600, r, args.timing) for r in rates}
    if sweep:
        print_sweep(sweep)
        for rate in (f"{args.rate:g}", f"{max(rates):g}"):
            print_diagnosis(rate, sweep.get(rate, results))
    ram_gib = [float(g) for g in args.tiers.split(",") if g]
    tier_rates = [float(r) for r in args.tier_rates.split(",") if r] if ram_gib else []
    tiers = {f"{r:g}": run_tiers(args.seed, hours * 3600, r, ram_gib) for r in tier_rates}
    for rate, by_trace in tiers.items():
        print(f"\ntiers at {rate} requests/s")
        print_tiers(by_trace)
    half_lives = [float(h) for h in args.grid_half_lives.split(",") if h]
    grid = half_life_grid(args.grid_seeds, hours * 3600, args.rate, half_lives)
    if args.grid_seeds:
        print_grid(grid, args.grid_seeds, args.rate)
    oracles = oracle_grid(args.oracle_seeds, hours * 3600, args.rate) if args.oracle_seeds else {}
    if oracles:
        print_oracles(oracles, args.oracle_seeds, args.rate)
    holds = (
        hold_grid(
            args.hold_seeds, hours * 3600, args.rate, args.timing, full=args.hold_grid == "full"
        )
        if args.hold_seeds
        else {}
    )
    if holds:
        print_hold_grid(holds, args.hold_seeds, args.rate)
    charts = plot(results, args.plots) if args.plots else []
    if args.plots and sweep:
        charts.append(plot_sweep(sweep, args.plots))
    if args.plots and tiers:
        charts.append(plot_tiers(tiers, args.plots))
    params = {
        "seed": args.seed,
        "hours": hours,
        "rate_per_s": args.rate,
        "model_sizes_gib": list(SIZES_GIB),
        "budget_gib": BUDGET_GIB,
        "load_s": f"{LOAD_BASE_S} + {SECONDS_PER_GIB} * GiB"
        + ("" if args.timing == "disk" else "; vLLM's cold_s for the 1, 2, 4 and 8 GiB models"),
        "timing": args.timing,
        "request_duration": "lognormal, median 2 s, sigma 0.8, capped at 60 s",
        "crf_half_life_s": policy.CRF_HALF_LIFE_S,
        "hold": {"max_s": HOLD.max_s, "busy": HOLD.busy, "window_s": policy.HOLD_WINDOW_S},
        "tiers": {
            "rates_per_s": tier_rates,
            "ram_budgets_gib": ram_gib,
            "cold_s": list(VLLM_COLD_S),
            "wake_s": list(VLLM_WAKE_S),
            "sleep_s": "the model's wake time",
            "asleep_device_gib": ASLEEP_GIB,
            "host_ram_gib": HOST_RAM_GIB,
        },
    }
    _bench.write_json(
        args.out,
        {
            "machine": _bench.finish_info(info),
            "params": params,
            "results": results,
            "sweep": sweep,
            "tiers": tiers,
            "half_life_grid": grid,
            "oracle_grid": oracles,
            "hold_grid": holds,
            "charts": charts,
        },
    )


if __name__ == "__main__":
    main()
