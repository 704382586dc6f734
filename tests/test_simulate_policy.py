"""scripts/simulate_policy.py: its references and oracles rank as their names say."""

from __future__ import annotations

from simulate_policy import (
    GIB,
    Model,
    Sim,
    Slot,
    plan_belady,
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
