"""Property tests: admission's plan agrees with a search over every set of victims.

For small random sets of residents (two devices, busy, pinned and asleep ones, CRFs and
start times, ``max_running`` or none), :func:`swapd.policy.plan_admission` must admit
exactly when some set of idle, unpinned residents frees the bytes and the count, wait
exactly when only sets with busy ones do, and be impossible otherwise; an admit's
victims must be such a set, each named once. The eviction order (which set) is the
policy's choice and is tested by example in tests/test_policy.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapd.policy import Admit, DeviceView, Impossible, Limits, Resident, Wait, plan_admission

GIB = 1024**3
HALF = GIB // 2
PLANS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Case:
    """A load of ``need`` bytes on gpu0 (``free`` bytes free), beside ``residents``."""

    residents: tuple[Resident, ...]
    need: int
    free: int
    max_running: int | None

    def count_excess(self) -> int:
        """Running models to stop for ``max_running``."""
        running = sum(1 for r in self.residents if not r.asleep)
        return 0 if self.max_running is None else max(0, running + 1 - self.max_running)

    def enough(self, victims: Sequence[Resident]) -> bool:
        """Whether stopping ``victims`` frees gpu0's bytes and the count."""
        freed = sum(r.usage for r in victims if r.device == "gpu0")
        stopped = sum(1 for r in victims if not r.asleep)
        return self.need <= self.free + freed and stopped >= self.count_excess()

    def feasible(self, *, with_busy: bool) -> bool:
        """Some set of unpinned residents (idle ones only, unless ``with_busy``) is enough."""
        pool = [r for r in self.residents if not r.pinned and (with_busy or not r.busy)]
        return any(
            self.enough(victims)
            for size in range(len(pool) + 1)
            for victims in itertools.combinations(pool, size)
        )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Up to six residents on two devices, and a load for gpu0."""
    residents = []
    for i in range(draw(st.integers(1, 6))):
        usage = draw(st.integers(0, 12)) * HALF
        residents.append(
            Resident(
                name=f"m{i}",
                device=draw(st.sampled_from(["gpu0", "gpu0", "gpu1"])),
                usage=usage,
                last_used=float(i),
                busy=draw(st.integers(0, 4)) == 0,
                pinned=draw(st.integers(0, 6)) == 0,
                asleep=draw(st.integers(0, 3)) == 0 and draw(st.booleans()),
                ram_cost=usage,
                crf=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
                reload_s=draw(st.sampled_from([0.5, 2.0, 20.0, 60.0])),
            )
        )
    return Case(
        residents=tuple(residents),
        need=draw(st.integers(0, 16)) * HALF,
        free=draw(st.integers(0, 16)) * HALF,
        max_running=draw(st.one_of(st.none(), st.integers(1, 4))),
    )


@PLANS
@given(cases())
def test_a_plan_admits_waits_or_refuses_exactly_when_a_search_says_so(case: Case) -> None:
    """Admit iff idle victims suffice, Wait iff busy ones would, else Impossible."""
    device = DeviceView("gpu0", 64 * GIB, case.free)
    limits = Limits(max_running=case.max_running)
    plan = plan_admission(case.need, [device], list(case.residents), limits)
    by_name = {r.name: r for r in case.residents}
    if case.feasible(with_busy=False):
        assert isinstance(plan, Admit), plan
        victims = [by_name[name] for name in plan.victims]
        assert len(set(plan.victims)) == len(plan.victims)
        assert not any(r.pinned or r.busy for r in victims)
        assert case.enough(victims)
    elif case.feasible(with_busy=True):
        assert isinstance(plan, Wait), plan
        assert len(set(plan.busy)) == len(plan.busy)
        assert all(by_name[name].busy for name in plan.busy)
    else:
        assert isinstance(plan, Impossible), plan
