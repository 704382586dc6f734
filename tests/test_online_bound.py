"""scripts/online_bound.py: the optimum is the least cost of every fixed policy, and replayed."""

from __future__ import annotations

import itertools

import pytest
from online_bound import Sessions, plan_optimal, relative_values
from simulate_policy import GIB, Model, Sim, Slot

from swapd import policy

STEPS = 1000


def average_cost(sessions: Sessions, choice: dict[tuple[int, int], int], start: int) -> float:
    """Expected load seconds per session of one fixed policy, by propagating the distribution."""
    n = len(sessions.sizes)
    where = {start: 1.0}
    spent = 0.0
    for _ in range(STEPS):
        after: dict[int, float] = {}
        for state, p in where.items():
            for m in range(n):
                share = p / n
                if state >> m & 1:
                    after[state] = after.get(state, 0.0) + share
                else:
                    spent += share * sessions.load_s[m]
                    nxt = choice[state, m]
                    after[nxt] = after.get(nxt, 0.0) + share
        where = after
    return spent / STEPS


@pytest.mark.parametrize(
    ("sizes", "load_s", "budget"),
    [
        ((1, 1, 1), (1.0, 1.0, 1.0), 2),  # one miss in three, 1 s each
        ((1, 1, 2), (1.0, 1.0, 10.0), 2),  # keep the two small ones, or the costly one?
        ((1, 2, 3), (1.0, 3.0, 9.0), 4),
    ],
)
def test_the_optimum_is_the_least_average_cost_of_every_fixed_policy(
    sizes: tuple[int, ...], load_s: tuple[float, ...], budget: int
) -> None:
    """Every deterministic policy, evaluated by propagating the distribution, costs no less."""
    sessions = Sessions(sizes, load_s, budget)
    gain, _ = relative_values(sessions)
    n = len(sizes)
    states = [s for s in range(1 << n) if sessions.fits(s)]
    keys = [(s, m) for s in states for m in range(n) if not s >> m & 1]
    options = [sessions.after_load(s, m) for s, m in keys]
    start = max(states, key=lambda s: s.bit_count())
    best = min(
        average_cost(sessions, dict(zip(keys, picked, strict=True)), start)
        for picked in itertools.product(*options)
    )
    assert gain == pytest.approx(best, abs=0.01)


def test_three_equal_models_two_places_miss_one_session_in_three() -> None:
    """The one absent model is asked for one session in three, at 1 s."""
    gain, _ = relative_values(Sessions((1, 1, 1), (1.0, 1.0, 1.0), 2))
    assert gain == pytest.approx(1 / 3)


def test_after_load_keeps_the_model_and_only_sets_that_fit() -> None:
    """A load leaves a subset of what was resident, plus the model, within the budget."""
    sessions = Sessions((1, 2, 3), (1.0, 1.0, 1.0), 4)
    # Resident {0, 1}; loading model 2 (size 3) leaves {2} or {0, 2}.
    assert sorted(sessions.after_load(0b011, 2)) == [0b100, 0b101]


def test_the_optimal_planner_leaves_the_set_of_least_value() -> None:
    """Replayed, the solved policy evicts whatever leaves the resident set of least value.

    Any one of the three residents makes room for ``x``; the values say keep ``a`` and ``c``.
    """
    sizes = {"a": 8, "b": 8, "c": 6, "x": 8}
    models = {n: Model(n, s * GIB, 1.0, 1.0) for n, s in sizes.items()}
    sim = Sim(models, 24 * GIB, {n: [] for n in models})
    for n in ("a", "b", "c"):
        sim.resident[n] = Slot(models[n], loading=False)
    a, b, c, x = 1, 2, 4, 8  # the bit of each model, in the order of names
    value = {b | c | x: 5.0, a | c | x: 1.0, a | b | x: 3.0}
    plan = plan_optimal(list(models), value)(sim, "x", 0.0)
    assert plan == policy.Admit("sim", ("b",))
