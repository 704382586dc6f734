"""The least load time any online policy can expect on the *bursty* trace, against belady's.

The *bursty* trace of ``simulate_policy.py`` is a chain of sessions, each to a model drawn
uniformly and independently of every one before it. So the past says nothing about which
model comes next, and the best a policy without foresight can do is an average-cost
Markov decision problem over the sets of resident models: when a session asks for a model
that is not resident, load it and keep the subset (of what was resident, plus it) that
minimises the expected cost of the sessions to come. Relative value iteration solves it
exactly for the eight models; the optimal policy is then replayed through the same
simulation as swapd and belady.

Its ratio to belady is a floor for every online policy on that trace, swapd's included
(up to the simulation's own detail: a session may start while the last one's request
still runs, which the decision problem leaves out):

    python scripts/online_bound.py --seeds 100
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import _bench
import simulate_policy as sim_policy


@dataclass(frozen=True)
class Sessions:
    """Models drawn uniformly per session: their sizes, load times and the budget."""

    sizes: Sequence[int]
    load_s: Sequence[float]
    budget: int

    def fits(self, kept: int) -> bool:
        """Whether the models in the bit set ``kept`` fit the budget together."""
        return sum(s for i, s in enumerate(self.sizes) if kept >> i & 1) <= self.budget

    def after_load(self, kept: int, model: int) -> list[int]:
        """Every resident set a load of ``model`` may leave: a subset of ``kept``, plus it."""
        out = []
        subset = kept
        while True:
            candidate = subset | 1 << model
            if self.fits(candidate):
                out.append(candidate)
            if subset == 0:
                return out
            subset = (subset - 1) & kept


def relative_values(sessions: Sessions, tolerance: float = 1e-9) -> tuple[float, dict[int, float]]:
    """The optimal expected load seconds per session, and each resident set's relative value.

    Relative value iteration: ``h(S) = mean over models m of (0 if m in S, else
    load(m) + min over S' of h(S'))``, normalised at one state until the gain settles.
    A lower value is a better set to be left with.
    """
    n = len(sessions.sizes)
    states = [s for s in range(1 << n) if sessions.fits(s)]
    choices = {
        (s, m): sessions.after_load(s, m) for s in states for m in range(n) if not s >> m & 1
    }
    value = dict.fromkeys(states, 0.0)
    anchor = states[-1]
    gain = 0.0
    while True:
        new = {}
        for s in states:
            total = 0.0
            for m in range(n):
                if s >> m & 1:
                    total += value[s]
                else:
                    total += sessions.load_s[m] + min(value[t] for t in choices[s, m])
            new[s] = total / n
        gain = new[anchor] - value[anchor]
        settled = max(abs(new[s] - value[s] - gain) for s in states) < tolerance
        value = {s: new[s] - new[anchor] for s in states}
        if settled:
            return gain, value


def plan_optimal(names: Sequence[str], value: dict[int, float]) -> sim_policy.Planner:
    """The decision problem's policy as a planner: leave the resident set of least value."""
    bit = {name: 1 << i for i, name in enumerate(names)}

    def left_value(sim: sim_policy.Sim, name: str, victims: tuple[str, ...], _now: float) -> float:
        left = sum(bit[n] for n in sim.resident if n not in victims) | bit[name]
        return value.get(left, math.inf)

    return sim_policy.plan_least_set(left_value)


def main() -> None:
    """Replay the bursty trace of seeds 1..N under swapd, swapd-lru and the optimal policy."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--hours", type=float, default=4.0)
    p.add_argument("--rate", type=float, default=0.1)
    args = p.parse_args()
    models = sim_policy.make_models()
    names = list(models)
    sessions = Sessions(
        [m.size for m in models.values()],
        [m.load_s for m in models.values()],
        int(sim_policy.BUDGET_GIB * sim_policy.GIB),
    )
    gain, value = relative_values(sessions)
    planners: dict[str, sim_policy.Planner | None] = {
        "swapd": None,
        "swapd-lru": None,
        "online-optimum": plan_optimal(names, value),
    }
    ratios: dict[str, list[float]] = {k: [] for k in planners}
    totals = dict.fromkeys([*planners, "belady"], 0.0)
    for seed in range(1, args.seeds + 1):
        trace = sim_policy.traces(seed, args.hours * 3600, args.rate, names)["bursty"]
        best = sim_policy.simulate(trace, models, "belady")["load_time_s"]
        totals["belady"] += best
        for key, planner in planners.items():
            name = "swapd-nohold" if planner is not None else key
            spent = sim_policy.simulate(trace, models, name, planner=planner)["load_time_s"]
            ratios[key].append(spent / best)
            totals[key] += spent
    print(
        f"bursty trace, seeds 1-{args.seeds}, {args.rate:g} requests/s, {args.hours:g} h each; "
        f"the decision problem's optimum: {gain:.3f} s of loads per session"
    )
    rows = [
        [
            key,
            statistics.mean(v),
            statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0,
            totals[key] / totals["belady"],
        ]
        for key, v in ratios.items()
    ]
    _bench.print_table(["policy", "x belady (mean)", "standard error", "x belady (sums)"], rows)


if __name__ == "__main__":
    main()
