"""Replay request traces through swapd's admission policy and the alternatives, offline.

A discrete-event simulation: models of mixed sizes load in time proportional to
their size, one load at a time (swapd holds one admission lock); a model is busy
while it serves a request or has requests waiting for it, and busy models are
never evicted. Policies compared, on the same seeded traces:

* ``swapd``      -- :func:`swapd.policy.plan_admission` itself, with a memory budget
  (idle residents evicted least recently used first; wait when only busy ones could
  make room);
* ``one-at-a-time`` -- the same function with ``max_running: 1`` (llama-swap's default);
* ``lru-count-4`` / ``lru-count-3`` -- LRU by model count, ignoring memory (llama.cpp's
  router ``models_max=4``; Ollama's 3 per GPU). A load that does not fit in memory
  fails at the end of its load time (an OOM), then every idle model is evicted and
  the load is retried;
* ``lrfu``       -- a what-if, not swapd's policy: the same admission with idle residents
  ordered by decayed request frequency (half-life 10 minutes) instead of last use;
* ``belady``     -- an offline reference that knows the future: evict the idle
  resident whose next request is furthest away (optimal for equal sizes and costs;
  with mixed sizes a strong reference rather than a proven bound);
* ``compulsory`` -- a true lower bound: each model used at all is loaded once.

    python scripts/simulate_policy.py [--seed N] [--hours H] [--quick] [--plots docs/img]
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
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
POLICIES = ("swapd", "one-at-a-time", "lru-count-4", "lru-count-3", "lrfu", "belady")
LRFU_HALF_LIFE_S = 600.0


@dataclass(frozen=True)
class Model:
    """One simulated model: its memory and its load time."""

    name: str
    size: int

    @property
    def load_s(self) -> float:
        """Load time, proportional to size plus a fixed start cost."""
        return LOAD_BASE_S + SECONDS_PER_GIB * self.size / GIB


@dataclass(frozen=True)
class Request:
    """One request: when it arrives, which model, how long it is served."""

    at: float
    model: str
    duration: float


# ---------------------------------------------------------------- traces


def make_models() -> dict[str, Model]:
    """Eight models of 1 to 12 GiB (37.5 GiB in all, against a 24 GiB budget)."""
    return {f"m{i}-{s:g}g": Model(f"m{i}-{s:g}g", int(s * GIB)) for i, s in enumerate(SIZES_GIB)}


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
    """A resident model in the simulation."""

    model: Model
    loading: bool = True
    in_flight: int = 0
    last_used: float = 0.0


@dataclass
class Sim:
    """Everything that changes while a trace is replayed."""

    models: dict[str, Model]
    budget: int
    future: dict[str, list[float]]
    resident: dict[str, Slot] = field(default_factory=dict)
    pending: dict[str, list[Request]] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)
    loader_busy: bool = False
    retry_after_oom: set[str] = field(default_factory=set)
    events: list[tuple[float, int, str, str, float]] = field(default_factory=list)
    seq: int = 0
    loads: int = 0
    load_time: float = 0.0
    ooms: int = 0
    waits: list[float] = field(default_factory=list)

    def used(self) -> int:
        """Memory held by resident (and loading) models."""
        return sum(s.model.size for s in self.resident.values())

    def busy(self, name: str) -> bool:
        """Not evictable now: loading, serving, or awaited."""
        slot = self.resident[name]
        return slot.loading or slot.in_flight > 0 or bool(self.pending.get(name))

    def push(self, at: float, kind: str, name: str, value: float = 0.0) -> None:
        """Schedule an event."""
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, name, value))

    def recency_score(self, name: str, now: float, half_life: float) -> float:
        """Past requests for ``name``, each weighted by ``2 ** -(age / half_life)``."""
        times = self.future[name]
        i = bisect.bisect_right(times, now)
        return sum(2 ** (-(now - t) / half_life) for t in times[max(0, i - 200) : i])

    def next_use(self, name: str, now: float) -> float:
        """When ``name`` is next requested after ``now`` (inf if never)."""
        times = self.future[name]
        i = bisect.bisect_right(times, now)
        return times[i] if i < len(times) else math.inf


Plan = policy.Admit | policy.Wait | policy.Impossible
Planner = Callable[[Sim, str, float], Plan]


def residents_view(sim: Sim) -> list[policy.Resident]:
    """The simulation's residents as swapd's policy sees them."""
    return [
        policy.Resident(
            name=n, device="sim", usage=s.model.size, last_used=s.last_used, busy=sim.busy(n)
        )
        for n, s in sim.resident.items()
    ]


def plan_swapd(sim: Sim, name: str, _now: float) -> Plan:
    """The policy swapd runs: memory budget, LRU among idle residents."""
    device = policy.DeviceView("sim", sim.budget, sim.budget - sim.used())
    return policy.plan_admission(
        sim.models[name].size, [device], residents_view(sim), policy.Limits(reserve=0)
    )


def plan_count(limit: int) -> Planner:
    """The policy with a model-count cap and no memory accounting at all."""

    def plan(sim: Sim, name: str, now: float) -> Plan:
        if name in sim.retry_after_oom:
            return plan_evict_all(sim, name, now)
        huge = policy.DeviceView("sim", 1 << 60, (1 << 60) - sim.used())
        limits = policy.Limits(reserve=0, max_running=limit)
        return policy.plan_admission(sim.models[name].size, [huge], residents_view(sim), limits)

    return plan


def plan_one_at_a_time(sim: Sim, name: str, _now: float) -> Plan:
    """llama-swap's default: a single model at a time."""
    device = policy.DeviceView("sim", sim.budget, sim.budget - sim.used())
    limits = policy.Limits(reserve=0, max_running=1)
    return policy.plan_admission(sim.models[name].size, [device], residents_view(sim), limits)


def plan_evict_all(sim: Sim, name: str, _now: float) -> Plan:
    """After an OOM: evict every idle model; wait for busy ones until the load fits."""
    idle = tuple(n for n in sim.resident if not sim.busy(n))
    free_after = sim.budget - sim.used() + sum(sim.resident[n].model.size for n in idle)
    if free_after >= sim.models[name].size:
        return policy.Admit("sim", idle)
    busy = tuple(n for n in sim.resident if sim.busy(n))
    return policy.Wait("sim", busy)


def plan_belady(sim: Sim, name: str, now: float) -> Plan:
    """Offline: evict idle residents whose next request is furthest in the future."""
    need = sim.models[name].size
    room = sim.budget - sim.used()
    idle = sorted(
        (n for n in sim.resident if not sim.busy(n)),
        key=lambda n: sim.next_use(n, now),
        reverse=True,
    )
    victims: list[str] = []
    for candidate in idle:
        if room >= need:
            break
        victims.append(candidate)
        room += sim.resident[candidate].model.size
    if room >= need:
        return policy.Admit("sim", tuple(victims))
    if need > sim.budget:
        return policy.Impossible("larger than the budget")
    return policy.Wait("sim", tuple(n for n in sim.resident if sim.busy(n)))


def plan_lrfu(sim: Sim, name: str, now: float) -> Plan:
    """What-if, not swapd's policy: evict idle residents least *frequently and recently* used.

    Each past request counts ``2 ** -(age / half-life)``; the resident with the lowest
    sum goes first. It uses only the past, so an online daemon could do the same.
    """
    residents = [
        policy.Resident(
            name=n,
            device="sim",
            usage=s.model.size,
            last_used=sim.recency_score(n, now, LRFU_HALF_LIFE_S),
            busy=sim.busy(n),
        )
        for n, s in sim.resident.items()
    ]
    device = policy.DeviceView("sim", sim.budget, sim.budget - sim.used())
    return policy.plan_admission(
        sim.models[name].size, [device], residents, policy.Limits(reserve=0)
    )


PLANNERS: dict[str, Planner] = {
    "swapd": plan_swapd,
    "one-at-a-time": plan_one_at_a_time,
    "lru-count-4": plan_count(4),
    "lru-count-3": plan_count(3),
    "lrfu": plan_lrfu,
    "belady": plan_belady,
}


# ---------------------------------------------------------------- event loop


def on_arrival(sim: Sim, req: Request, now: float) -> None:
    """Serve at once if ready; otherwise wait, and queue a load if none is coming."""
    slot = sim.resident.get(req.model)
    if slot is not None and not slot.loading:
        serve(sim, req, now)
        return
    sim.pending.setdefault(req.model, []).append(req)
    if slot is None and req.model not in sim.queue:
        sim.queue.append(req.model)


def serve(sim: Sim, req: Request, now: float) -> None:
    """Start serving a request on a ready model."""
    slot = sim.resident[req.model]
    slot.in_flight += 1
    slot.last_used = now
    sim.waits.append(now - req.at)
    sim.push(now + req.duration, "finish", req.model)


def try_admit(sim: Sim, planner: Planner, now: float) -> None:
    """Start the next queued load if the loader is free and the plan allows it."""
    while not sim.loader_busy and sim.queue:
        name = sim.queue[0]
        plan = planner(sim, name, now)
        if isinstance(plan, policy.Wait):
            return  # head-of-line: swapd's admission lock is first come, first served
        sim.queue.popleft()
        if isinstance(plan, policy.Impossible):
            sim.pending.pop(name, None)
            continue
        for victim in plan.victims:
            del sim.resident[victim]
        start_load(sim, name, now)


def start_load(sim: Sim, name: str, now: float) -> None:
    """Begin loading; an over-budget load (count policies) ends in an OOM."""
    model = sim.models[name]
    oom = sim.used() + model.size > sim.budget
    sim.resident[name] = Slot(model, last_used=now)
    sim.loader_busy = True
    sim.loads += 1
    sim.load_time += model.load_s
    sim.push(now + model.load_s, "oom" if oom else "loaded", name)


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
    sim.ooms += 1
    del sim.resident[name]
    sim.retry_after_oom.add(name)
    sim.queue.appendleft(name)


def simulate(trace: list[Request], models: dict[str, Model], planner: Planner) -> Json:
    """Replay one trace under one policy; return loads, load time, OOMs and waits."""
    future: dict[str, list[float]] = {n: [] for n in models}
    for req in trace:
        future[req.model].append(req.at)
    sim = Sim(models, int(BUDGET_GIB * GIB), future)
    for i, req in enumerate(trace):
        sim.push(req.at, "arrive", req.model, float(i))
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
        else:
            on_oom(sim, name)
        try_admit(sim, planner, now)
    waits = np.asarray(sim.waits)
    return {
        "requests": len(trace),
        "served": len(sim.waits),
        "loads": sim.loads,
        "load_time_s": sim.load_time,
        "ooms": sim.ooms,
        "wait_mean_s": float(waits.mean()),
        "wait_p50_s": float(np.percentile(waits, 50)),
        "wait_p95_s": float(np.percentile(waits, 95)),
        "wait_p99_s": float(np.percentile(waits, 99)),
    }


def compulsory(trace: list[Request], models: dict[str, Model]) -> Json:
    """The true lower bound: every model that is used is loaded once."""
    used = {r.model for r in trace}
    return {"loads": len(used), "load_time_s": sum(models[n].load_s for n in used)}


# ---------------------------------------------------------------- report


def run_all(seed: int, horizon: float, rate: float) -> dict[str, Json]:
    """Every trace under every policy."""
    models = make_models()
    names = list(models)
    out: dict[str, Json] = {}
    for i, (trace_name, make) in enumerate(TRACES.items()):
        trace = make(random.Random(seed * 100 + i), names, horizon, rate)
        results = {p: simulate(trace, models, PLANNERS[p]) for p in POLICIES}
        results["compulsory"] = compulsory(trace, models)
        best = results["belady"]["load_time_s"]
        single = results["one-at-a-time"]["load_time_s"]
        for name in POLICIES:
            r = results[name]
            r["vs_belady"] = r["load_time_s"] / best if best else math.nan
            r["reduction_vs_one_at_a_time"] = 1 - r["load_time_s"] / single if single else math.nan
        out[trace_name] = results
    return out


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


def print_sweep(sweep: dict[str, dict[str, Json]]) -> None:
    """The offered-load sweep: swapd against the references, for every trace and rate."""
    print("\noffered-load sweep: swapd's total load time vs belady and vs one-at-a-time")
    rows = []
    for rate, results in sweep.items():
        for trace, by_policy in results.items():
            r = by_policy["swapd"]
            rows.append(
                [
                    f"{rate}/{trace}",
                    r["load_time_s"],
                    by_policy["belady"]["load_time_s"],
                    by_policy["one-at-a-time"]["load_time_s"],
                    r["vs_belady"],
                    r["reduction_vs_one_at_a_time"],
                    r["wait_p95_s"],
                    by_policy["one-at-a-time"]["wait_p95_s"],
                ]
            )
    _bench.print_table(
        [
            "rate/trace",
            "swapd s",
            "belady s",
            "one-at-a-time s",
            "x belady",
            "vs one-at-a-time",
            "swapd p95 wait",
            "one p95 wait",
        ],
        rows,
    )


def plot_sweep(sweep: dict[str, dict[str, Json]], folder: Path) -> str:
    """Total load time on the mixed trace against the offered rate, per policy."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(sweep)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in POLICIES:
        ax.plot(
            [float(r) for r in rates],
            [sweep[r]["mixed"][name]["load_time_s"] for r in rates],
            marker="o",
            label=name,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean request rate (requests/s)")
    ax.set_ylabel("total load time (s)")
    ax.set_title("mixed trace: total load time against offered load")
    ax.legend(fontsize=8)
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
    traces = list(results)
    written = []
    for metric, label, file in (
        ("load_time_s", "total load time (s)", "policy_load_time.png"),
        ("wait_p95_s", "p95 wait before service (s)", "policy_wait_p95.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(POLICIES)
        for k, name in enumerate(POLICIES):
            xs = [i + (k - (len(POLICIES) - 1) / 2) * width for i in range(len(traces))]
            ax.bar(xs, [results[t][name][metric] for t in traces], width, label=name)
        ax.set_xticks(range(len(traces)), traces)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend(fontsize=8, ncol=len(POLICIES), loc="upper center", bbox_to_anchor=(0.5, -0.08))
        ax.set_title(f"{label}: 8 models 1-12 GiB, budget {BUDGET_GIB:g} GiB")
        fig.tight_layout()
        path = folder / file
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def parse_args() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hours", type=float, default=4.0, help="simulated time per trace")
    p.add_argument("--rate", type=float, default=0.1, help="mean requests per second")
    p.add_argument(
        "--sweep", default="0.05,0.1,0.2,0.5", help="rates for the offered-load sweep ('' skips)"
    )
    p.add_argument("--quick", action="store_true", help="one simulated hour")
    p.add_argument("--plots", type=Path, help="write PNG charts into this folder")
    p.add_argument("--out", type=Path, default=Path("out/simulate_policy.json"))
    return p.parse_args()


def main() -> None:
    """Simulate, print the table, write the JSON (and the charts when asked)."""
    args = parse_args()
    info = _bench.machine_info()
    hours = 1.0 if args.quick else args.hours
    results = run_all(args.seed, hours * 3600, args.rate)
    _bench.print_machine(info)
    print(f"rate {args.rate:g} requests/s, {hours:g} simulated hours per trace")
    print_report(results)
    rates = [float(r) for r in args.sweep.split(",") if r]
    sweep = {f"{r:g}": run_all(args.seed, hours * 3600, r) for r in rates}
    if sweep:
        print_sweep(sweep)
    charts = plot(results, args.plots) if args.plots else []
    if args.plots and sweep:
        charts.append(plot_sweep(sweep, args.plots))
    params = {
        "seed": args.seed,
        "hours": hours,
        "rate_per_s": args.rate,
        "model_sizes_gib": list(SIZES_GIB),
        "budget_gib": BUDGET_GIB,
        "load_s": f"{LOAD_BASE_S} + {SECONDS_PER_GIB} * GiB",
        "request_duration": "lognormal, median 2 s, sigma 0.8, capped at 60 s",
    }
    _bench.write_json(
        args.out,
        {
            "machine": _bench.finish_info(info),
            "params": params,
            "results": results,
            "sweep": sweep,
            "charts": charts,
        },
    )


if __name__ == "__main__":
    main()
