"""Admission and eviction: where a model starts, and what must stop first to make room."""

from __future__ import annotations

from dataclasses import replace

import pytest

from swapd.policy import (
    CRF_HALF_LIFE_S,
    Action,
    Admit,
    DeviceView,
    Down,
    Hold,
    HoldRule,
    Impossible,
    Limits,
    LockPages,
    Plan,
    RamEntry,
    RamTier,
    Resident,
    Sleep,
    Stage,
    Start,
    Stop,
    UnlockPages,
    Wait,
    Wake,
    best_plan,
    count_overflow,
    crf_decay,
    crf_update,
    demotions,
    hold,
    load_plan,
    loader_busy,
    never_fits,
    plan_admission,
    ram_overflow,
    room_after,
)

GIB = 1024**3


def gib(amount: float) -> int:
    """Bytes in ``amount`` GiB; the tables read in GiB."""
    return int(amount * GIB)


def dev(device: str = "gpu0", *, total: float = 24, free: float) -> DeviceView:
    """A device view with sizes in GiB."""
    return DeviceView(device, gib(total), gib(free))


def res(  # noqa: PLR0913 - one keyword per resident fact the tables vary
    name: str,
    usage: float,
    last_used: float,
    *,
    device: str = "gpu0",
    busy: bool = False,
    pinned: bool = False,
    crf: float | None = None,
    asleep: bool = False,
    ram_cost: float = 0,
    measured: float | None = None,
) -> Resident:
    """A resident model with its usage (and what it would take in the ram tier) in GiB."""
    return Resident(
        name,
        device,
        gib(usage),
        last_used,
        busy=busy,
        pinned=pinned,
        measured=None if measured is None else gib(measured),
        crf=crf,
        asleep=asleep,
        ram_via="sleep" if ram_cost else None,
        ram_cost=gib(ram_cost),
    )


@pytest.mark.parametrize(
    ("need", "devices", "residents", "limits", "plan"),
    [
        pytest.param(8, [dev(free=20)], [], Limits(), Admit("gpu0"), id="fits-empty-device"),
        pytest.param(
            8,
            [dev(free=10)],
            [res("a", 8, 1), res("b", 4, 2)],
            Limits(),
            Admit("gpu0"),
            id="fits-beside-residents",
        ),
        pytest.param(10, [dev(free=10)], [], Limits(), Admit("gpu0"), id="fits-exactly-all-free"),
        pytest.param(
            8,
            [dev(total=32, free=4)],
            [res("new", 8, 9), res("old", 8, 1), res("mid", 8, 5)],
            Limits(),
            Admit("gpu0", ("old",)),
            id="evict-one-lru-idle",
        ),
        pytest.param(
            9,
            [dev(free=2)],
            [res("a", 4, 3), res("b", 4, 1), res("c", 4, 2), res("d", 4, 4)],
            Limits(),
            Admit("gpu0", ("b", "c")),
            id="evict-several-lru-order-stops-when-it-fits",
        ),
        pytest.param(
            8,
            [dev(free=4)],
            [res("a", 8, 1, busy=True)],
            Limits(),
            Wait("gpu0", ("a",)),
            id="busy-victim-waits-naming-it",
        ),
        pytest.param(
            8,
            [dev(free=4)],
            [res("busy-old", 8, 1, busy=True), res("idle-new", 8, 5)],
            Limits(),
            Admit("gpu0", ("idle-new",)),
            id="idle-preferred-over-older-busy",
        ),
        pytest.param(
            14,
            [dev(total=32, free=2)],
            [res("idle", 8, 5), res("busy", 8, 1, busy=True), res("spare", 8, 9, busy=True)],
            Limits(),
            Wait("gpu0", ("busy",)),
            id="idle-not-enough-waits-for-lru-busy-only",
        ),
        pytest.param(
            8,
            [dev(free=4)],
            [res("pinned-old", 8, 1, pinned=True), res("a", 8, 5)],
            Limits(),
            Admit("gpu0", ("a",)),
            id="pin-skipped-for-newer-evictable",
        ),
        pytest.param(
            11,
            [dev(free=10)],
            [res("a", 6, 1)],
            Limits(),
            Admit("gpu0", ("a",)),
            id="outside-usage-respected-free-not-total-minus-ours",
        ),
        pytest.param(
            9, [dev(free=10)], [], Limits(reserve=gib(1)), Admit("gpu0"), id="reserve-still-fits"
        ),
        pytest.param(
            9.5,
            [dev(free=10)],
            [res("a", 4, 1)],
            Limits(reserve=gib(1)),
            Admit("gpu0", ("a",)),
            id="reserve-forces-eviction",
        ),
        pytest.param(
            6,
            [dev(total=80, free=60)],
            [res("a", 8, 1), res("b", 8, 2)],
            Limits(budget=gib(20)),
            Admit("gpu0", ("a",)),
            id="budget-limits-room-despite-free-memory",
        ),
        pytest.param(
            4,
            [dev(total=80, free=60)],
            [res("a", 8, 1), res("b", 8, 2)],
            Limits(budget=gib(20)),
            Admit("gpu0"),
            id="budget-leaves-room",
        ),
        # Admitted at 8, measured at 2: the 6 it may still take come off free's side,
        # never off the budget's side a second time (budget 10 - usage 8 = 2 left).
        pytest.param(
            2,
            [dev(total=80, free=60)],
            [res("a", 8, 1, measured=2)],
            Limits(budget=gib(10)),
            Admit("gpu0"),
            id="budget-counts-a-growing-resident-once",
        ),
        pytest.param(
            6,
            [dev(total=80, free=60)],
            [res("a", 8, 1, measured=2)],
            Limits(budget=gib(10)),
            Admit("gpu0", ("a",)),
            id="budget-evicts-a-growing-resident-to-fit",
        ),
        pytest.param(
            4,
            [dev(free=8)],
            [res("a", 8, 1, measured=2)],
            Limits(),
            Admit("gpu0", ("a",)),
            id="growth-still-owed-comes-off-free",
        ),
        pytest.param(
            1,
            [dev(total=80, free=70)],
            [res("a", 2, 2), res("b", 2, 1)],
            Limits(max_running=2),
            Admit("gpu0", ("b",)),
            id="max-running-evicts-lru-despite-free-memory",
        ),
        pytest.param(
            1,
            [dev(total=80, free=70)],
            [res("here", 2, 2), res("there", 2, 1, device="gpu1")],
            Limits(max_running=2),
            Admit("gpu0", ("there",)),
            id="max-running-evicts-from-another-device",
        ),
        pytest.param(
            1,
            [dev(total=80, free=70)],
            [res("a", 2, 1, busy=True), res("b", 2, 2, busy=True)],
            Limits(max_running=2),
            Wait("gpu0", ("a",)),
            id="max-running-with-all-busy-waits",
        ),
        pytest.param(
            1,
            [dev(total=80, free=70)],
            [res("a", 2, 1)],
            Limits(max_running=2),
            Admit("gpu0"),
            id="max-running-not-reached",
        ),
        pytest.param(
            8,
            [dev("gpu0", free=4), dev("gpu1", free=9), dev("gpu2", free=20)],
            [res("a", 16, 1)],
            Limits(),
            Admit("gpu2"),
            id="two-devices-most-free-without-eviction",
        ),
        pytest.param(
            8,
            [dev("gpu0", free=4), dev("gpu1", free=9)],
            [res("a", 16, 1)],
            Limits(),
            Admit("gpu1"),
            id="two-devices-no-eviction-beats-eviction",
        ),
        pytest.param(
            8,
            [dev("gpu0", free=4), dev("gpu1", free=2)],
            [res("a", 8, 1, device="gpu0", busy=True), res("b", 8, 2, device="gpu1")],
            Limits(),
            Admit("gpu1", ("b",)),
            id="two-devices-evict-idle-rather-than-wait",
        ),
        pytest.param(
            8,
            [dev("gpu0", free=2), dev("gpu1", free=4)],
            [
                res("a", 4, 1, device="gpu0", busy=True),
                res("b", 4, 2, device="gpu0", busy=True),
                res("c", 4, 3, device="gpu1", busy=True),
            ],
            Limits(),
            Wait("gpu1", ("c",)),
            id="two-devices-wait-for-fewest-busy",
        ),
        pytest.param(
            8,
            [dev("gpu1", free=9)],
            [res("a", 8, 1, device="gpu1")],
            Limits(),
            Admit("gpu1"),
            id="pinned-device-list-only-candidate",
        ),
        pytest.param(
            12,
            [dev("gpu1", free=4)],
            [res("a", 8, 1, device="gpu1"), res("b", 8, 0, device="gpu0")],
            Limits(),
            Admit("gpu1", ("a",)),
            id="pinned-device-list-evicts-only-there",
        ),
        pytest.param(
            0,
            [dev(free=0)],
            [res("a", 12, 1), res("b", 12, 2)],
            Limits(),
            Admit("gpu0"),
            id="need-zero-full-device",
        ),
        pytest.param(
            0,
            [dev(total=80, free=70)],
            [res("a", 2, 1)],
            Limits(max_running=2, budget=gib(2)),
            Admit("gpu0"),
            id="need-zero-at-budget",
        ),
        pytest.param(
            0,
            [dev(total=80, free=70)],
            [res("a", 2, 1), res("b", 2, 2)],
            Limits(max_running=2),
            Admit("gpu0", ("a",)),
            id="need-zero-still-obeys-max-running",
        ),
    ],
)
def test_plan_admission(
    need: float,
    devices: list[DeviceView],
    residents: list[Resident],
    limits: Limits,
    plan: Plan,
) -> None:
    """The plan admits, evicts least recently used idle models first, or waits for busy ones."""
    assert plan_admission(gib(need), devices, residents, limits) == plan


@pytest.mark.parametrize(
    ("need", "devices", "residents", "limits", "fragments"),
    [
        pytest.param(
            30,
            [dev(free=20)],
            [res("p", 2, 1, pinned=True)],
            Limits(),
            [
                "needs 30.0 GiB",
                "gpu0 has 24.0 GiB",
                "2.0 GiB used outside swapd",
                "2.0 GiB pinned",
                "0.0 MiB reserved",
            ],
            id="bigger-than-device",
        ),
        pytest.param(
            8,
            [dev(free=4)],
            [res("p", 16, 1, pinned=True)],
            Limits(),
            ["needs 8.0 GiB", "gpu0 has 24.0 GiB", "16.0 GiB pinned", "used outside swapd"],
            id="only-pins-could-make-room",
        ),
        pytest.param(
            12,
            [dev(free=4)],
            [res("p", 8, 1, pinned=True), res("a", 6, 2)],
            Limits(reserve=gib(1)),
            ["needs 12.0 GiB", "gpu0", "8.0 GiB pinned", "6.0 GiB used outside swapd"],
            id="evicting-everything-evictable-not-enough",
        ),
        pytest.param(
            10,
            [dev(total=80, free=60)],
            [res("p", 12, 1, pinned=True)],
            Limits(budget=gib(20), reserve=gib(1)),
            [
                "needs 10.0 GiB",
                "gpu0 has 80.0 GiB",
                "8.0 GiB used outside swapd",
                "12.0 GiB pinned",
                "1.0 GiB reserved",
                "budget 20.0 GiB",
            ],
            id="budget-taken-by-pins",
        ),
        pytest.param(
            1,
            [dev(total=80, free=70)],
            [res("p", 2, 1, pinned=True), res("q", 2, 2, pinned=True)],
            Limits(max_running=2),
            [
                "needs 1.0 GiB",
                "gpu0",
                "4.0 GiB pinned",
                "max_running 2 filled by pinned models (p, q)",
            ],
            id="max-running-filled-by-pins",
        ),
        pytest.param(
            30,
            [dev("gpu0", free=20), dev("gpu1", free=22)],
            [],
            Limits(),
            ["gpu0: needs 30.0 GiB", "gpu1: needs 30.0 GiB", "gpu1 has 24.0 GiB"],
            id="two-devices-each-explained",
        ),
    ],
)
def test_plan_admission_impossible(
    need: float,
    devices: list[DeviceView],
    residents: list[Resident],
    limits: Limits,
    fragments: list[str],
) -> None:
    """When no evictions can make room, the plan says so with the numbers that explain why."""
    plan = plan_admission(gib(need), devices, residents, limits)
    assert isinstance(plan, Impossible), plan
    missing = [f for f in fragments if f not in plan.reason]
    assert not missing, f"{missing} not in {plan.reason!r}"


def test_plan_admission_without_devices_is_impossible() -> None:
    """An empty candidate list (no device reported memory) is Impossible, not an error."""
    assert plan_admission(gib(1), [], [], Limits()) == Impossible("no device to place the model on")


def test_a_load_goes_where_the_most_room_is_left_not_the_most_free_memory() -> None:
    """Free memory still owed to a model starting there, or past the budget, is no room.

    ``starting`` was granted 16 GiB of gpu0 and has taken none of it yet: gpu0 reads 24 GiB
    free, gpu1 20, and the second load belongs on gpu1 (two vLLMs starting on one GPU
    would also start one after the other). With a budget of 16 GiB, gpu0's 12 GiB in use
    leave 4 GiB there against gpu1's 8.
    """
    starting = res("starting", 16, 1, busy=True, measured=0)
    devices = [dev("gpu0", free=24), dev("gpu1", free=20)]
    assert plan_admission(gib(4), devices, [starting], Limits()) == Admit("gpu1")
    assert best_plan({"gpu0": gib(4), "gpu1": gib(4)}, devices, [starting], Limits()) == Admit(
        "gpu1"
    )
    used = res("used", 12, 1, measured=12)
    devices = [dev("gpu0", free=12), dev("gpu1", free=8)]
    assert plan_admission(gib(2), devices, [used], Limits(budget=gib(16))) == Admit("gpu1")


# ---------------------------------------------------------------- worth keeping: crf


@pytest.mark.parametrize(
    ("crf", "since", "now", "half_life", "expected"),
    [
        pytest.param(4.0, 10.0, 10.0, 300.0, 4.0, id="no-time-no-decay"),
        pytest.param(4.0, 0.0, 300.0, 300.0, 2.0, id="one-half-life-halves"),
        pytest.param(4.0, 0.0, 600.0, 300.0, 1.0, id="two-half-lives-quarter"),
        pytest.param(4.0, 100.0, 160.0, 60.0, 2.0, id="any-start-time"),
        pytest.param(0.0, 0.0, 1e6, 300.0, 0.0, id="zero-stays-zero"),
    ],
)
def test_crf_decay(crf: float, since: float, now: float, half_life: float, expected: float) -> None:
    """A CRF halves every half-life, whatever the clock's origin."""
    assert crf_decay(crf, since, now, half_life) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("previous", "last", "now", "half_life", "expected"),
    [
        pytest.param(0.0, 0.0, 50.0, 300.0, 1.0, id="first-request-counts-one"),
        pytest.param(1.0, 50.0, 50.0, 300.0, 2.0, id="two-at-once-count-two"),
        pytest.param(1.0, 0.0, 300.0, 300.0, 1.5, id="old-request-counts-half"),
        pytest.param(6.0, 0.0, 600.0, 300.0, 2.5, id="history-decays-before-adding"),
        pytest.param(2.0, 0.0, CRF_HALF_LIFE_S, CRF_HALF_LIFE_S, 2.0, id="default-half-life"),
    ],
)
def test_crf_update(
    previous: float, last: float, now: float, half_life: float, expected: float
) -> None:
    """A request adds 1 to the previous CRF decayed from the request before."""
    assert crf_update(previous, last, now, half_life) == pytest.approx(expected)


def test_crf_update_defaults_to_the_documented_half_life() -> None:
    """Without a half-life, crf_update uses CRF_HALF_LIFE_S."""
    assert crf_update(2.0, 0.0, CRF_HALF_LIFE_S) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "times",
    [
        pytest.param([0.0], id="one"),
        pytest.param([0.0, 1.0, 2.0], id="close-together"),
        pytest.param([0.0, 300.0, 1200.0, 1201.0], id="spread"),
    ],
)
def test_crf_update_is_the_decayed_request_count(times: list[float]) -> None:
    """Folding crf_update over requests gives LRFU's sum of 2 ** -(age / half-life)."""
    crf, last = 0.0, times[0]
    for t in times:
        crf, last = crf_update(crf, last, t, 300.0), t
    now = times[-1] + 450.0
    expected = sum(2 ** (-(now - t) / 300.0) for t in times)
    assert crf_decay(crf, last, now, 300.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("need", "devices", "residents", "plan"),
    [
        pytest.param(
            8,
            [dev(free=4)],
            [res("often", 8, 1, crf=5.0), res("once-lately", 8, 9, crf=1.0)],
            Admit("gpu0", ("once-lately",)),
            id="crf-evicts-the-rarely-used-though-more-recent",
        ),
        pytest.param(
            8,
            [dev(free=4)],
            [res("often", 8, 1), res("once-lately", 8, 9)],
            Admit("gpu0", ("often",)),
            id="no-crf-least-recently-used",
        ),
        pytest.param(
            8,
            [dev(free=4)],
            [res("often", 8, 1, crf=5.0), res("once-lately", 8, 9)],
            Admit("gpu0", ("often",)),
            id="one-crf-missing-falls-back-to-lru",
        ),
        pytest.param(
            8,
            [dev(free=4)],
            [res("newer", 8, 9, crf=2.0), res("older", 8, 1, crf=2.0)],
            Admit("gpu0", ("older",)),
            id="equal-crf-least-recently-used",
        ),
        pytest.param(
            8,
            [dev(free=4)],
            [res("busy", 8, 1, busy=True, crf=0.1), res("idle", 8, 9, crf=9.0)],
            Admit("gpu0", ("idle",)),
            id="busy-stays-despite-lowest-crf",
        ),
        pytest.param(
            8,
            [dev(free=4)],
            [res("pinned", 8, 1, pinned=True, crf=0.0), res("a", 8, 9, crf=9.0)],
            Admit("gpu0", ("a",)),
            id="pinned-stays-despite-lowest-crf",
        ),
        pytest.param(
            9,
            [dev(free=2)],
            [
                res("a", 4, 1, crf=3.0),
                res("b", 4, 2, crf=0.5),
                res("c", 4, 3, crf=1.0),
                res("d", 4, 4, crf=2.0),
            ],
            Admit("gpu0", ("b", "c")),
            id="several-lowest-crf-first-stops-when-it-fits",
        ),
        pytest.param(
            3,
            [dev(free=0.5)],
            [
                res("sleeper", 0.5, 1, asleep=True, ram_cost=8, crf=0.1),
                res("a", 2, 2, crf=2.0),
                res("b", 4, 3, crf=3.0),
            ],
            Admit("gpu0", ("b",)),
            id="sleeper-with-weights-in-ram-taken-after-awake-idle",
        ),
        pytest.param(
            3,
            [dev(free=0.5)],
            [
                res("pages", 0.5, 1, asleep=True, ram_cost=0.5, crf=0.1),
                res("a", 2, 2, crf=2.0),
                res("b", 4, 3, crf=3.0),
            ],
            Admit("gpu0", ("pages", "a")),
            id="sleeper-holding-all-it-costs-in-crf-order",
        ),
        pytest.param(
            3,
            [dev(free=0.5)],
            [
                res("cpu-sleeper", 0.5, 1, asleep=True, ram_cost=0.9, crf=0.1),
                res("a", 2, 2, crf=2.0),
                res("b", 4, 3, crf=3.0),
            ],
            Admit("gpu0", ("cpu-sleeper", "a")),
            id="sleeper-holding-over-half-in-crf-order",
        ),
        pytest.param(
            3,
            [dev(free=0.5)],
            [
                res("sleeper", 0.5, 1, asleep=True, ram_cost=8),
                res("a", 2, 2),
                res("b", 4, 3),
            ],
            Admit("gpu0", ("b",)),
            id="sleeper-taken-after-awake-idle-without-crf-too",
        ),
    ],
)
def test_plan_admission_orders_by_crf(
    need: float, devices: list[DeviceView], residents: list[Resident], plan: Plan
) -> None:
    """Idle residents go least worth keeping first: lowest CRF, or least recently used."""
    assert plan_admission(gib(need), devices, residents, Limits()) == plan


def entry(name: str, size: float, last_used: float, crf: float | None = None) -> RamEntry:
    """A sleeping model in the ram tier, its size in GiB."""
    return RamEntry(name, gib(size), last_used, "sleep", crf=crf)


@pytest.mark.parametrize(
    ("victims", "ram", "actions"),
    [
        pytest.param(
            [res("often", 4, 1, ram_cost=4, crf=5.0), res("lately", 4, 9, ram_cost=4, crf=1.0)],
            RamTier(gib(4), gib(64)),
            (Sleep("often"), Stop("lately")),
            id="highest-crf-gets-the-tier",
        ),
        pytest.param(
            [res("often", 4, 1, ram_cost=4), res("lately", 4, 9, ram_cost=4)],
            RamTier(gib(4), gib(64)),
            (Sleep("lately"), Stop("often")),
            id="no-crf-most-recent-gets-the-tier",
        ),
        pytest.param(
            [res("v", 4, 5, ram_cost=4, crf=3.0)],
            RamTier(gib(4), gib(64), (entry("e", 4, 10, crf=0.5),)),
            (Stop("e"), Sleep("v")),
            id="entry-with-lower-crf-pushed-down-though-more-recent",
        ),
        pytest.param(
            [res("v", 4, 5, ram_cost=4, crf=0.2)],
            RamTier(gib(4), gib(64), (entry("e", 4, 1, crf=0.5),)),
            (Stop("v"),),
            id="entry-with-higher-crf-stays-though-older",
        ),
        pytest.param(
            [res("v", 4, 5, ram_cost=4)],
            RamTier(gib(4), gib(64), (entry("e", 4, 10),)),
            (Stop("v"),),
            id="no-crf-newer-entry-stays",
        ),
        pytest.param(
            [
                res("v", 4, 9, ram_cost=4, crf=2.0),
                res("s", 0.5, 1, asleep=True, ram_cost=4, crf=0.1),
            ],
            RamTier(gib(4), gib(64), (entry("s", 4, 1, crf=0.1),)),
            (Stop("s"), Sleep("v")),
            id="sleeping-victim-leaves-first-and-only-once",
        ),
        pytest.param(
            [
                res("v", 4, 9, ram_cost=8, crf=2.0),
                res("a", 0.5, 5, asleep=True, ram_cost=8, crf=3.0),
            ],
            # A reload removed the first a, which leaves the tier under its name (busy).
            RamTier(
                gib(10),
                gib(64),
                (replace(entry("a", 2, 1, crf=0.1), busy=True), entry("a", 8, 5, crf=3.0)),
            ),
            (Stop("a"), Sleep("v")),
            id="sleeping-victim-leaves-with-its-own-entry-not-a-draining-namesakes",
        ),
        pytest.param(
            [res("v", 4, 5, ram_cost=4)],
            RamTier(gib(64), gib(2)),
            (Stop("v"),),
            id="budget-has-room-but-host-memory-available-does-not",
        ),
    ],
)
def test_demotions_order(
    victims: list[Resident], ram: RamTier, actions: tuple[Action, ...]
) -> None:
    """The ram tier goes to what is most worth keeping; what is worth less goes to disk."""
    assert demotions(victims, ram) == actions


@pytest.mark.parametrize(
    ("ram", "actions"),
    [
        pytest.param(
            RamTier(gib(4), gib(64), (entry("often", 4, 1, 5.0), entry("lately", 4, 9, 1.0))),
            (Stop("lately"),),
            id="lowest-crf-pushed-down",
        ),
        pytest.param(
            RamTier(gib(4), gib(64), (entry("often", 4, 1), entry("lately", 4, 9))),
            (Stop("often"),),
            id="no-crf-least-recently-used-pushed-down",
        ),
        pytest.param(
            RamTier(gib(64), -gib(1), (entry("often", 4, 1, 5.0), entry("lately", 4, 9, 1.0))),
            (Stop("lately"),),
            id="within-budget-but-host-memory-short",
        ),
    ],
)
def test_ram_overflow_order(ram: RamTier, actions: tuple[Action, ...]) -> None:
    """Over its budget, the tier pushes down its entries least worth keeping first."""
    assert ram_overflow(ram) == actions


def test_pages_another_entry_counts_are_never_pushed_down_for_room() -> None:
    """Letting go of pages that another preset's entry counts frees nothing: they stay.

    ``shared`` holds the GGUF's pages that ``held`` counts (0 bytes here), and is worth
    the least. Over the budget, or making room for a victim, only ``held`` goes (and
    takes them along), and where ``held`` is busy (a start from its pages) nothing does.
    """
    shared = RamEntry("shared", 0, 1, "pages", crf=0.5)
    held = RamEntry("held", gib(8), 2, "pages", crf=1.0)
    over = RamTier(gib(4), gib(64), (shared, held))
    assert ram_overflow(over) == (UnlockPages("held"),)
    assert ram_overflow(replace(over, entries=(shared, replace(held, busy=True)))) == ()
    victim = res("v", 4, 9, ram_cost=4, crf=2.0)
    full = RamTier(gib(8), gib(64), (shared, held))
    assert demotions([victim], full) == (UnlockPages("held"), Sleep("v"))


def test_the_ram_tier_pushes_down_only_the_entries_the_room_needs() -> None:
    """An entry taken first that a larger one taken after it makes unneeded stays.

    Least worth first, ``small`` (1 GiB) frees too little and ``big`` (4 GiB) then frees
    the room alone: ``small`` keeps its place, as admission prunes its own victims.
    """
    small = entry("small", 1, 1, crf=0.5)
    big = entry("big", 4, 2, crf=1.0)
    assert ram_overflow(RamTier(gib(2), gib(64), (small, big))) == (Stop("big"),)
    victim = res("v", 4, 9, ram_cost=4, crf=3.0)
    assert demotions([victim], RamTier(gib(5), gib(64), (small, big))) == (
        Stop("big"),
        Sleep("v"),
    )


# ---------------------------------------------------------------- holds


@pytest.mark.parametrize(
    ("spans", "busy"),
    [
        pytest.param([], 0.0, id="idle"),
        pytest.param([(900.0, 930.0)], 0.1, id="one load of 30 s in the window"),
        pytest.param([(600.0, 660.0)], 0.0, id="a load before the window"),
        pytest.param([(690.0, 720.0)], 20 / 300, id="a load partly before the window"),
        pytest.param([(990.0, 1060.0)], 10 / 300, id="under way: counted up to now"),
        pytest.param([(700.0, 1000.0), (700.0, 1000.0)], 2.0, id="two devices at once"),
    ],
)
def test_loader_busy_is_the_share_of_the_window_spent_loading(
    spans: list[tuple[float, float]], busy: float
) -> None:
    """Only the last five minutes count; overlapping loads add up."""
    assert loader_busy(spans, now=1000.0) == pytest.approx(busy)


VICTIM = Resident("victim", "gpu0", gib(8), last_used=0, crf=3.0)
RULE = HoldRule(max_s=30, busy=0.4)


@pytest.mark.parametrize(
    ("plan", "crf", "busy", "waited", "held"),
    [
        pytest.param(Admit("gpu0", ("victim",)), 1.0, 0.5, 0, 30.0, id="busy, victim worth more"),
        pytest.param(Admit("gpu0", ("victim",)), 1.0, 0.5, 25, 5.0, id="the rest of the bound"),
        pytest.param(Admit("gpu0", ("victim",)), 1.0, 0.5, 30, None, id="bound reached"),
        pytest.param(Admit("gpu0", ("victim",)), 1.0, 0.3, 0, None, id="loader not busy"),
        pytest.param(Admit("gpu0", ("victim",)), 3.5, 0.5, 0, None, id="model worth more"),
        pytest.param(Admit("gpu0"), 1.0, 0.9, 0, None, id="no victims"),
        pytest.param(Wait("gpu0", ("victim",)), 1.0, 0.9, 0, None, id="not admissible"),
        pytest.param(Admit("gpu0", ("victim",)), None, 0.9, 0, None, id="no CRF: no hold"),
    ],
)
def test_hold(
    plan: Plan, crf: float | None, busy: float, waited: float, held: float | None
) -> None:
    """A load is held only while the loader is busy and its victims outweigh it, bounded."""
    found = hold(plan, crf, [VICTIM], busy=busy, waited=waited, rule=RULE)
    assert (found.seconds if found else None) == held


def test_hold_weighs_the_victims_together() -> None:
    """Two victims of CRF 1 each outweigh a model of CRF 1.5: the load is held."""
    residents = [
        Resident("a", "gpu0", gib(4), last_used=0, crf=1.0),
        Resident("b", "gpu0", gib(4), last_used=0, crf=1.0),
        Resident("c", "gpu0", gib(4), last_used=0, crf=9.0),  # not a victim
    ]
    found = hold(Admit("gpu0", ("a", "b")), 1.5, residents, busy=0.5, waited=0, rule=RULE)
    assert found == Hold(seconds=30, crf=1.5, victims_crf=2.0, busy=0.5)
    assert "victims' CRF 2.00 exceeds its 1.50" in found.reason


def test_a_hold_weighs_each_crf_by_its_start_seconds_once_every_start_is_timed() -> None:
    """The hold weighs as eviction does: CRF times start seconds, where all are timed.

    A victim in twice the demand that restarts in a second no longer holds a load that
    takes a minute; a victim that takes a minute holds a load in more demand that takes
    two seconds. With the model's own start not yet seen, plain CRFs decide, as before.
    """
    plan = Admit("gpu0", ("victim",))
    quick = replace(VICTIM, crf=2.0, reload_s=0.4)  # counts as MIN_RELOAD_S, 1 s
    slow = replace(VICTIM, crf=1.0, reload_s=60.0)

    def held(crf: float, victim: Resident, reload_s: float | None) -> Hold | None:
        return hold(plan, crf, [victim], busy=0.5, waited=0, rule=RULE, reload_s=reload_s)

    assert held(1.0, quick, 60.0) is None
    assert held(1.0, quick, None) == Hold(30, 1.0, 2.0, 0.5)
    found = held(1.5, slow, 2.0)
    assert found == Hold(30, 1.5, 1.0, 0.5, worth=3.0, victims_worth=60.0)
    assert "victims' CRF 1.00 times their start seconds, 60.0, exceeds its 3.0" in found.reason
    assert held(1.5, replace(slow, reload_s=None), 2.0) is None


def test_a_hold_counts_each_victim_once_when_a_busy_namesake_drains() -> None:
    """A model removed by a reload drains under the name that, added back, is the victim.

    The idle one is the victim, counted once: the drained one's CRF and start seconds
    do not double what the load must outweigh (2 against 1.5 would hold it).
    """
    plan = Admit("gpu0", ("victim",))
    victim = replace(VICTIM, crf=1.0, reload_s=4.0)
    draining = replace(victim, busy=True, crf=1.0)
    for reload_s in (None, 4.0):
        for residents in ([draining, victim], [victim, draining]):
            found = hold(plan, 1.5, residents, busy=0.5, waited=0, rule=RULE, reload_s=reload_s)
            assert found is None
    found = hold(plan, 0.5, [draining, victim], busy=0.5, waited=0, rule=RULE, reload_s=4.0)
    assert found == Hold(30, 0.5, 1.0, 0.5, worth=2.0, victims_worth=4.0)


def test_the_room_after_counts_a_victim_where_it_is_not_a_namesake_draining_here() -> None:
    """A reload removed ``a`` from host RAM, where it drains; ``a`` added back runs on gpu0.

    A load on host RAM evicts the new ``a`` (a count, on gpu0): host RAM gains nothing by
    it, and the old one's 8 GiB, still draining there, are not room the ram tier may keep.
    Where both are here, the idle one is the victim, counted once.
    """
    host = DeviceView("cpu", gib(64), gib(40))
    draining = Resident("a", "cpu", gib(8), last_used=1, busy=True)
    victim = Resident("a", "gpu0", gib(4), last_used=2)
    for residents in ([draining, victim], [victim, draining]):
        assert room_after(gib(10), host, residents, Limits(), ("a",)) == gib(30)
    here = replace(victim, device="cpu")
    for residents in ([draining, here], [here, draining]):
        assert room_after(gib(10), host, residents, Limits(), ("a",)) == gib(34)


def test_a_hold_rule_of_zero_busy_holds_on_an_idle_loader_and_zero_seconds_never() -> None:
    """``hold_busy: 0`` holds whatever the loader does; ``hold_max: 0`` turns holds off."""
    plan = Admit("gpu0", ("victim",))
    always = hold(plan, 1.0, [VICTIM], busy=0.0, waited=0, rule=HoldRule(max_s=30, busy=0))
    never = hold(plan, 1.0, [VICTIM], busy=5.0, waited=0, rule=HoldRule(max_s=0, busy=0))
    assert always is not None
    assert never is None


def test_count_overflow_takes_the_least_used_idle_models_and_spares_the_rest() -> None:
    """Over max_running: idle, unpinned, awake ones go, least recently used first."""
    residents = [
        Resident("old", "gpu0", gib(1), last_used=1),
        Resident("busy", "gpu0", gib(1), last_used=0, busy=True),
        Resident("pinned", "gpu0", gib(1), last_used=0, pinned=True),
        Resident("asleep", "gpu0", gib(1), last_used=0, asleep=True),
        Resident("new", "gpu0", gib(1), last_used=9),
    ]
    assert [r.name for r in count_overflow(residents, 3)] == ["old"]
    assert [r.name for r in count_overflow(residents, 1)] == ["old", "new"]  # busy, pinned stay
    assert count_overflow(residents, 4) == ()
    assert count_overflow(residents, None) == ()


def timed(resident: Resident, reload_s: float) -> Resident:
    """``resident`` whose last start from disk took ``reload_s``."""
    return replace(resident, reload_s=reload_s)


def test_what_losing_a_model_costs_orders_eviction_by_value_per_byte() -> None:
    """Equal CRF: the model whose start costs least per byte it frees goes first.

    Without start times (one not yet seen) the order is the CRF's, then the most recent.
    """
    small = res("small", 1, 1, crf=2.0)  # starts in 40 s: 40 s a GiB
    big = res("big", 12, 5, crf=2.0)  # starts in 58 s: under 5 s a GiB
    device = [dev(free=0, total=24)]
    by_cost = [timed(small, 40.0), timed(big, 58.0)]
    assert plan_admission(gib(1), device, by_cost, Limits()) == Admit("gpu0", ("big",))
    unknown = [small, timed(big, 58.0)]
    assert plan_admission(gib(1), device, unknown, Limits()) == Admit("gpu0", ("small",))
    # A CRF ten times higher still outweighs a cost per byte eight times lower.
    often_big = [timed(small, 40.0), timed(replace(big, crf=20.0), 58.0)]
    assert plan_admission(gib(1), device, often_big, Limits()) == Admit("gpu0", ("small",))


def test_the_ram_tier_keeps_what_saves_the_most_seconds() -> None:
    """A victim that starts slowly for its size pushes down an entry of higher CRF.

    ``quick`` (CRF 2) would start again in 2 s; the victim (CRF 1) needs 60 s: the tier
    keeps the victim. Without start times, the CRF decides.
    """
    victim = res("v", 4, 5, ram_cost=4, crf=1.0)
    quick = RamEntry("quick", gib(4), 1, "sleep", crf=2.0)
    tier = RamTier(gib(4), gib(64), (replace(quick, reload_s=2.0),))
    assert demotions([timed(victim, 60.0)], tier) == (Stop("quick"), Sleep("v"))
    assert demotions([victim], RamTier(gib(4), gib(64), (quick,))) == (Stop("v"),)
    overflow = RamTier(
        gib(4),
        gib(64),
        (
            replace(quick, reload_s=2.0),
            RamEntry("slow", gib(4), 0, "sleep", crf=1.0, reload_s=60.0),
        ),
    )
    assert ram_overflow(overflow) == (Stop("quick"),)


def test_count_overflow_weighs_each_model_by_what_losing_it_costs_whole() -> None:
    """max_running counts models, not bytes: CRF times the start's seconds, not per byte."""
    residents = [
        Resident("big", "gpu0", gib(12), last_used=1, crf=1.0, reload_s=58.0),
        Resident("small", "gpu0", gib(1), last_used=9, crf=1.0, reload_s=40.0),
    ]
    assert [r.name for r in count_overflow(residents, 1)] == ["small"]


def test_max_running_alone_evicts_by_what_losing_each_model_costs_whole() -> None:
    """Memory fits on gpu0; max_running 2 evicts one of two models on gpu1 for its count.

    No byte is needed: ``small`` (40 s) goes, not ``big`` (58 s), as count_overflow
    would choose; per byte of device memory, ``big`` looked the cheaper.
    """
    residents = [
        Resident("big", "gpu1", gib(12), last_used=1, crf=1.0, reload_s=58.0),
        Resident("small", "gpu1", gib(1), last_used=9, crf=1.0, reload_s=40.0),
    ]
    plan = plan_admission(gib(1), [dev(free=24)], residents, Limits(max_running=2))
    assert plan == Admit("gpu0", ("small",))
    assert [r.name for r in count_overflow(residents, 1)] == ["small"]


def test_busy_models_are_ranked_among_themselves_on_one_scale() -> None:
    """Busy models are not ranked by bare CRF against CRF times seconds per byte.

    A busy one never timed (its first start, a claim) sends the busy ones back to the CRF.
    Room comes only from a busy model: the load waits for ``starting`` (CRF 0.5), not
    for ``serving`` (CRF 5), which max_wait would drain.
    """
    residents = [
        res("starting", 4, 1, busy=True, crf=0.5),
        timed(res("serving", 4, 2, busy=True, crf=5.0), 10.0),
        timed(res("idle", 1, 3, crf=1.0), 10.0),
    ]
    plan = plan_admission(gib(4), [dev(total=9, free=0)], residents, Limits())
    assert plan == Wait("gpu0", ("starting",))


def test_starts_under_a_second_count_alike_so_use_decides() -> None:
    """0.3 s against 0.4 s is noise, not cost: with equal CRFs the least recent goes."""
    residents = [
        timed(res("older", 1, 1, crf=1.0), 0.4),
        timed(res("newer", 1, 9, crf=1.0), 0.3),
    ]
    device = [dev(free=0, total=24)]
    assert plan_admission(gib(1), device, residents, Limits()) == Admit("gpu0", ("older",))
    assert [r.name for r in count_overflow(residents, 1)] == ["older"]


def test_a_count_victim_here_is_weighed_whole_once_the_bytes_are_freed() -> None:
    """gpu0 is short of 1 GiB, and max_running 2 needs two of its three models to stop.

    ``big`` frees the bytes (least worth per byte: 20 s for 12 GiB). The second victim
    frees only a count, so it is chosen whole, as count_overflow chooses: ``quick``
    (40 s) rather than ``slow`` (58 s for 4 GiB), which per byte looked the cheaper.
    """
    residents = [
        Resident("big", "gpu0", gib(12), last_used=1, crf=1.0, reload_s=20.0),
        Resident("quick", "gpu0", gib(1), last_used=2, crf=1.0, reload_s=40.0),
        Resident("slow", "gpu0", gib(4), last_used=3, crf=1.0, reload_s=58.0),
    ]
    plan = plan_admission(gib(1), [dev(total=17, free=0)], residents, Limits(max_running=2))
    assert plan == Admit("gpu0", ("big", "quick"))
    assert [r.name for r in count_overflow(residents[1:], 1)] == ["quick"]


def test_a_victim_the_bytes_do_not_need_is_a_count_victim_weighed_whole() -> None:
    """gpu0 is short of 12 GiB, which ``big`` frees alone; max_running 2 needs two stops.

    Per byte the greedy pass takes ``cheap`` (6 s for 4 GiB) before ``big``, but the
    bytes do not need it: max_running does, so it is weighed whole against ``tiny``
    (1 s), which goes instead, as it does where the bytes alone decide nothing.
    """
    residents = [
        Resident("cheap", "gpu0", gib(4), last_used=1, crf=1.0, reload_s=6.0),
        Resident("big", "gpu0", gib(12), last_used=2, crf=1.0, reload_s=20.0),
        Resident("tiny", "gpu0", gib(0.5), last_used=3, crf=1.0, reload_s=1.0),
    ]
    device = [dev(total=17, free=0)]
    assert plan_admission(gib(12), device, residents, Limits()) == Admit("gpu0", ("big",))
    plan = plan_admission(gib(12), device, residents, Limits(max_running=2))
    assert plan == Admit("gpu0", ("big", "tiny"))
    assert [r.name for r in count_overflow([residents[0], residents[2]], 1)] == ["tiny"]


def test_a_count_victim_elsewhere_is_weighed_whole_while_bytes_are_short_here() -> None:
    """gpu0 is short of bytes: its sleeper goes (it does not count for max_running).

    max_running 2 still needs one of the two running models on gpu1 to stop. That frees
    a count, not bytes of gpu0: it is chosen as count_overflow chooses, each whole
    (``small``, 40 s), not per byte of gpu1 (where ``big``, 58 s for 12 GiB, looked the
    cheaper).
    """
    residents = [
        timed(res("sleeper", 4, 1, crf=1.0, asleep=True), 10.0),
        Resident("big", "gpu1", gib(12), last_used=1, crf=1.0, reload_s=58.0),
        Resident("small", "gpu1", gib(1), last_used=9, crf=1.0, reload_s=40.0),
    ]
    plan = plan_admission(gib(4), [dev(free=0)], residents, Limits(max_running=2))
    assert plan == Admit("gpu0", ("sleeper", "small"))
    running = [r for r in residents if not r.asleep]
    assert [r.name for r in count_overflow(running, 1)] == ["small"]


def test_never_fits_counts_the_whole_device_less_reserve_within_the_budget() -> None:
    """What other programs hold may go; the reserve and the budget stay until a reload."""
    assert not never_fits(8, 10, Limits(reserve=2))
    assert never_fits(9, 10, Limits(reserve=2))
    assert never_fits(6, 10, Limits(budget=5))
    assert not never_fits(5, 10, Limits(budget=5))


@pytest.mark.parametrize(
    ("down", "waking", "staged", "steps"),
    [
        pytest.param(
            (Sleep("a"), LockPages("b"), Stop("b")),
            False,
            False,
            (Sleep("a"), LockPages("b"), Stop("b"), Stage("m"), Start("m", "gpu0")),
            id="moves-down-then-the-copy-then-the-start",
        ),
        pytest.param((), False, True, (Start("m", "gpu0"),), id="staged-and-room-start-at-once"),
        pytest.param((), False, False, (Stage("m"), Start("m", "gpu0")), id="copy-first"),
        pytest.param(
            (UnlockPages("c"),),
            True,
            False,
            (UnlockPages("c"), Wake("m")),
            id="a-wake-copies-nothing",
        ),
    ],
)
def test_a_load_plan_lists_every_step_in_the_order_it_is_carried_out(
    down: tuple[Down, ...], waking: bool, staged: bool, steps: tuple[Action, ...]
) -> None:
    """Down a tier first (the stops may free the copy's room), then the copy, then up."""
    plan = load_plan("m", Admit("gpu0", ("a", "b", "c")), down, waking=waking, staged=staged)
    assert plan == steps
