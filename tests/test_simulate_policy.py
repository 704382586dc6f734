"""scripts/simulate_policy.py: its references and oracles rank as their names say."""

from __future__ import annotations

from simulate_policy import (
    GIB,
    Model,
    Request,
    Sim,
    Slot,
    down_moves,
    move_down,
    plan_belady,
    plan_by_value,
    simulate,
    whole_trace_count,
)

from swapd import policy


def model(name: str, size_gib: float, load_s: float) -> Model:
    """A model of ``size_gib`` that starts (and wakes) in ``load_s`` seconds."""
    return Model(name, int(size_gib * GIB), load_s, load_s)


def sim_with(
    models: list[Model], future: dict[str, list[float]], *, busy: tuple[str, ...] = ()
) -> Sim:
    """A 24 GiB simulation with every model but the last resident and ready.

    Those in ``busy`` serve a request; the last model is the one to load.
    """
    sim = Sim(
        {m.name: m for m in models},
        24 * GIB,
        {m.name: future.get(m.name, []) for m in models},
    )
    for m in models[:-1]:
        sim.resident[m.name] = Slot(m, loading=False, in_flight=int(m.name in busy))
    return sim


def test_belady_evicts_no_model_the_others_made_room_for() -> None:
    """Belady evicts on demand: a victim whose room the later ones made is kept.

    Furthest first takes the 1 GiB model (wanted at 1000 s), then the 12 GiB one (500 s),
    which alone makes the 5 GiB needed; stopping the first too only costs its reload.
    """
    models = [model("small", 1, 2.0), model("big", 12, 18.5), model("mid", 8, 12.5)]
    models.append(model("x", 8, 12.5))
    sim = sim_with(models, {"small": [1000.0], "big": [500.0], "mid": [100.0]})
    assert sim.budget - sim.used() == 3 * GIB
    assert plan_belady(sim, "x", 0.0) == policy.Admit("sim", ("big",))


def test_belady_keeps_a_model_requested_at_the_same_instant() -> None:
    """A request at the very time of the plan, not yet taken in, is the next use.

    ``a`` and ``d`` are asked for at 100 s, ``d`` first; ``b`` at 200 s. Room for ``d``
    takes ``a`` or ``b``: Belady must keep ``a``, whose request is at that instant.
    """
    models = {m.name: m for m in (model("a", 12, 18.5), model("b", 8, 12.5), model("d", 6, 9.5))}
    trace = [
        Request(0.0, "a", 1.0),
        Request(0.5, "b", 1.0),
        Request(100.0, "d", 1.0),
        Request(100.0, "a", 1.0),
        Request(200.0, "b", 1.0),
    ]
    result = simulate(trace, models, "belady")
    assert result["loads_by_model"] == {"a": 1, "b": 2, "d": 1}


def test_an_oracle_ranks_by_its_value_alone() -> None:
    """``oracle-frequency`` keeps the model asked for more often, whatever its size or start.

    The 12 GiB model has 6 requests ahead, the 1 GiB one 5; either one makes the room.
    Weighed by start seconds per byte (as swapd weighs its CRF) the small one would stay.
    """
    models = [model("big", 12, 18.5), model("small", 1, 2.0), model("filler", 10, 15.5)]
    models.append(model("x", 2, 3.5))
    future = {"big": [float(t) for t in range(10, 70, 10)], "small": [5.0, 15, 25, 35, 45]}
    sim = sim_with(models, future, busy=("filler",))
    assert plan_by_value(whole_trace_count)(sim, "x", 0.0) == policy.Admit("sim", ("small",))


def test_a_victims_sleep_is_loader_time_but_not_the_holds_busy_share() -> None:
    """The hold sees loads and wakes, as the manager's does: it times those from admission on.

    A victim's sleep holds the simulated loader and counts in its load time, but the
    manager never records it among the spans it hands to ``loader_busy``.
    """
    models = [model("a", 12, 18.5), model("x", 8, 12.5)]
    sim = sim_with(models, {"a": [500.0]})
    sim.ram_budget = 32 * GIB
    down = down_moves(sim, ("a",), "x", 100.0, crf=True)
    move_down(sim, down, "x", 100.0, crf=True)
    assert sim.resident["a"].asleep
    assert sim.counts.load_time == models[0].wake_s
    assert policy.loader_busy(sim.spans, 100.0 + models[0].wake_s) == 0.0
