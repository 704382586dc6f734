"""Admission and eviction as pure functions of readings and residents.

No I/O, no clock, no logging: the manager feeds in what the probe measured
and what is resident, and carries out the plan it gets back. The benchmark
simulator replays traces through these same functions.

For each candidate device::

    outside   = total - free - (what swapd's own children use there)
    room now  = min(free - reserve - growth, budget - swapd's use)   # budget is optional
    room max  = room now + everything evictable on that device   # pins never count

A resident that is still growing (starting, or measured below what it was
admitted with) will take the rest from ``free``: that shortfall (``growth``) is
taken off free's side of ``room now``, which is what lets loads on one device
overlap safely. The budget's side counts each resident's usage already.

A load is admitted when ``need <= room now``; otherwise idle residents are
taken least worth keeping first until it fits (``Admit`` with victims), a sleeper
whose weights wait in host RAM only after the awake ones; if only busy residents
could make room the request waits (``Wait``); if even evicting every evictable
resident is not enough, it is ``Impossible``.

*Worth keeping* is LRFU's combined recency-frequency value (CRF) when the caller
gives one for every model compared: each request adds 1 and the sum halves every
:data:`CRF_HALF_LIFE_S` seconds (:func:`crf_update`, :func:`crf_decay`), so a
model used often stays ahead of one used once a moment ago. Without CRFs it is
the last use (plain LRU).

A load that is admissible may still be held (:func:`hold`): while the loader is
busy, a load whose victims are worth more than it (eviction's weights) waits a
bounded time.

Where the victims go is a second decision, :func:`demotions`: down to the ram
tier (vLLM sleeps; a llama-server's GGUF pages stay locked) while the ram budget
has room, the ram tier's own entries worth less than the victim going down to
disk first; otherwise straight to disk (stop).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias, TypeGuard

from swapd.units import format_size

RamVia: TypeAlias = Literal["sleep", "pages"]

# Five minutes: short enough that a finished session stops counting within half an
# hour, long enough that a steady model outranks one used once. The simulator's
# traces were flat between 2 and 20 minutes (docs/benchmarks.md, section 3).
CRF_HALF_LIFE_S = 300.0
# Starts quicker than this count as this long: what they cost a request is small, and
# their differences are mostly noise (a warm page cache, a busy machine).
MIN_RELOAD_S = 1.0


@dataclass(frozen=True)
class Resident:
    """A model that holds memory on a device now (loading, ready, asleep or stopping)."""

    name: str
    device: str
    usage: int  # what admission counts: see counted_usage()
    last_used: float
    busy: bool = False  # requests in flight or waiting, or in a transition: not evictable now
    pinned: bool = False
    measured: int | None = None  # what the probe sees now; None: unknown, usage is all there
    asleep: bool = False  # in the ram tier already: not counted by max_running
    ram_via: RamVia | None = None  # how it can go down to the ram tier; None: it cannot
    ram_cost: int = 0  # host RAM it takes in the ram tier
    crf: float | None = None  # CRF decayed to the plan's clock; None: order by last_used
    reload_s: float | None = None  # its last start from disk took this long; None: not seen


def crf_decay(crf: float, since: float, now: float, half_life: float = CRF_HALF_LIFE_S) -> float:
    """A CRF computed at ``since``, carried to ``now``: it halves every ``half_life`` seconds."""
    return crf * math.exp2(-(now - since) / half_life)


def crf_update(
    previous: float, last: float, now: float, half_life: float = CRF_HALF_LIFE_S
) -> float:
    """The CRF after a request at ``now``: 1 for this request plus ``previous`` decayed.

    ``previous`` is the CRF as of ``last``, the time of the request before (0 for
    a model never requested). This is LRFU's combined recency-frequency value:
    the sum over past requests of ``2 ** -(age / half_life)``.
    """
    return 1.0 + crf_decay(previous, last, now, half_life)


@dataclass(frozen=True)
class _Order:
    """How a set of models is ranked for keeping."""

    crf: bool  # by CRF: every model has one (else by last use)
    cost: bool  # ...times what losing it costs: every idle model's start has been timed


def _order(items: Iterable[Resident | RamEntry]) -> _Order:
    # CRFs compare only with CRFs: one missing and the whole order falls back to LRU.
    # Costs likewise, among the idle models (the busy ones are taken last anyway).
    listed = list(items)
    crf = all(item.crf is not None for item in listed)
    timed = all(item.reload_s is not None for item in listed if not item.busy)
    return _Order(crf=crf, cost=crf and timed)


def _worth(item: Resident | RamEntry, order: _Order, size: int | None) -> tuple[float, float]:
    """How much an item is worth keeping (higher stays); ties go by last use.

    Ranked by cost, its CRF (how often it is asked for) times its start's seconds (what
    each request would wait if it were gone; :data:`MIN_RELOAD_S` at least):
    GreedyDual-Size-Frequency's value. Per byte of ``size`` where the device's room is
    what is short: a model that starts in 40 s for 1 GiB is worth keeping over one that
    starts in 60 s for 12. The ram tier weighs whole values: what a sleeper will hold
    there is known only once it sleeps (on a CPU it may free most of what it held).
    """
    value = item.crf if order.crf and item.crf is not None else 0.0
    if order.cost and item.reload_s is not None:
        value = _weighed(value, item.reload_s)
        if size is not None:
            value /= max(size, 1)
    return (value, item.last_used)


def _weighed(crf: float, reload_s: float) -> float:
    """A CRF times what each request would wait for a start (:data:`MIN_RELOAD_S` at least)."""
    return crf * max(reload_s, MIN_RELOAD_S)


def _warm_in_ram(resident: Resident) -> bool:
    """A sleeper that keeps on the device less than half of what it holds in host RAM.

    That is vLLM asleep on a GPU: stopping it frees only the remainder and turns its
    next wake into a cold start, so awake idle models (which can sleep in its place)
    are taken first. A sleeper on host RAM holds all it costs and is ordered as usual.
    """
    return resident.asleep and 2 * resident.usage < resident.ram_cost


def counted_usage(measured: int | None, need: int | None) -> int:
    """What a model on a device counts for: the larger of what it uses and what it was granted.

    A backend still growing shows less than it will use; one that outgrew its
    estimate shows more. Either way the larger number is the safe one.
    """
    return max(measured or 0, need or 0)


@dataclass(frozen=True)
class DeviceView:
    """One device as the probe read it."""

    id: str
    total: int
    free: int


@dataclass(frozen=True)
class Limits:
    """Memory kept free and an optional cap on swapd's use, per device; a model count cap."""

    reserve: int = 0
    budget: int | None = None
    max_running: int | None = None


def never_fits(need: int, total: int, limits: Limits) -> bool:
    """Whether ``need`` is more than a device of ``total`` bytes gives a model, even empty.

    What other programs or models hold may go; ``reserve`` and ``budget`` stay until a reload.
    """
    room = total - limits.reserve
    if limits.budget is not None:
        room = min(room, limits.budget)
    return need > room


@dataclass(frozen=True)
class Admit:
    """Start on ``device`` once ``victims`` (idle, least worth keeping first) are stopped."""

    device: str
    victims: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wait:
    """Room exists only if busy residents are stopped: wait until they are idle."""

    device: str
    busy: tuple[str, ...]
    # Each busy victim as (name, device): a model a reload removed may still serve under
    # a name that, added back, serves on another device, and only the one waited on drains.
    busy_at: tuple[tuple[str, str], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Impossible:
    """No set of evictions makes room; ``reason`` carries the numbers."""

    reason: str


Plan = Admit | Wait | Impossible


def _room_now(device: DeviceView, here: Sequence[Resident], limits: Limits) -> int:
    # Growth still owed is taken from free; the budget already counts it in the usage.
    room = device.free - limits.reserve - _growth(here)
    if limits.budget is not None:
        room = min(room, limits.budget - sum(r.usage for r in here))
    return room


def _room_on(device: DeviceView, residents: Sequence[Resident], limits: Limits) -> int:
    return _room_now(device, [r for r in residents if r.device == device.id], limits)


def _impossible_reason(
    need: int,
    device: DeviceView,
    residents: Sequence[Resident],
    limits: Limits,
    *,
    counted_out: Sequence[Resident] = (),
) -> str:
    """The numbers of an impossible plan; ``counted_out``: the pins that fill max_running."""
    ours = sum(r.usage for r in residents)
    pinned = sum(r.usage for r in residents if r.pinned)
    outside = max(0, device.total - device.free - ours)
    parts = [
        f"{device.id} has {format_size(device.total)}",
        f"{format_size(outside)} used outside swapd",
        f"{format_size(pinned)} pinned",
        f"{format_size(limits.reserve)} reserved",
    ]
    if limits.budget is not None:
        parts.append(f"budget {format_size(limits.budget)}")
    if counted_out:
        # Memory is not what is short: name the count, or the numbers above mislead.
        names = ", ".join(sorted(r.name for r in counted_out))
        parts.append(f"max_running {limits.max_running} filled by pinned models ({names})")
    return f"needs {format_size(need)}; " + ", ".join(parts)


def _growth(residents: Sequence[Resident]) -> int:
    # Memory that growing residents have been granted but not yet taken from free.
    return sum(max(0, r.usage - r.measured) for r in residents if r.measured is not None)


def _plan_device(
    need: int,
    device: DeviceView,
    residents: Sequence[Resident],
    limits: Limits,
    running: int,
) -> Plan:
    here = [r for r in residents if r.device == device.id]
    room = room_before = _room_now(device, here, limits)
    # Candidates in eviction order: idle before busy, sleepers that keep their weights
    # in host RAM after the rest, least worth keeping first.
    evictable = [r for r in residents if not r.pinned]
    ranking = _order(evictable)
    # The busy ones are ranked among themselves: by cost only if each of them was timed
    # too (a claim, a first start never was), so no weighed value meets an unweighed one.
    busy_ranking = _Order(
        crf=ranking.crf,
        cost=ranking.cost and all(r.reload_s is not None for r in evictable if r.busy),
    )
    # Per byte where bytes are short; where memory fits and only max_running evicts, a
    # count, not bytes, is freed: each whole, as count_overflow ranks them.
    per_byte = need > room

    def keep(r: Resident, *, by_bytes: bool = per_byte) -> tuple[bool, bool, tuple[float, float]]:
        worth = _worth(r, busy_ranking if r.busy else ranking, r.usage if by_bytes else None)
        return (r.busy, _warm_in_ram(r), worth)

    order = sorted(evictable, key=keep)
    count_excess = 0 if limits.max_running is None else max(0, running + 1 - limits.max_running)
    freeable = sum(r.usage for r in order if r.device == device.id)
    countable = sum(1 for r in order if not r.asleep)
    if need > room + freeable or count_excess > countable:
        pins = [r for r in residents if r.pinned and not r.asleep]
        counted_out = pins if count_excess > countable else []
        return Impossible(_impossible_reason(need, device, here, limits, counted_out=counted_out))
    victims: list[Resident] = []
    for candidate in order:
        counted = _running(victims)
        if need <= room and counted >= count_excess:
            break
        frees_memory = candidate.device == device.id and need > room
        frees_count = not candidate.asleep and counted < count_excess
        if not (frees_memory or frees_count):
            continue  # stopping it would help neither the memory nor the count
        victims.append(candidate)
        if candidate.device == device.id:
            room += candidate.usage
    victims = _prune(victims, need, room, count_excess, device.id)
    if per_byte and count_excess:
        here_short = _Short(device.id, need, room_before)
        victims = _count_victims_whole(victims, here_short, count_excess, order, keep)
    busy = tuple(v.name for v in victims if v.busy)
    if busy:
        return Wait(device.id, busy, tuple((v.name, v.device) for v in victims if v.busy))
    return Admit(device.id, tuple(v.name for v in victims))


@dataclass(frozen=True)
class _Short:
    """A device short of bytes: ``need`` against the ``room`` it has before any eviction."""

    device: str
    need: int
    room: int


def _count_victims_whole(
    victims: list[Resident],
    short: _Short,
    count_excess: int,
    order: Sequence[Resident],
    keep: Callable[..., tuple[bool, bool, tuple[float, float]]],
) -> list[Resident]:
    """The victims, those beyond what frees the short device's bytes chosen whole.

    Ranked per byte, the greedy pass also took the victims that only ``max_running``
    needs by their worth per byte. Those free a count, not bytes (the bytes are freed
    already): they are chosen again, as :func:`count_overflow` chooses, each whole, from
    every running model the bytes do not need, on this device or another. The bytes'
    own victims are pruned as if no count were short: one cheap per byte that the greedy
    pass took before a larger one that frees the bytes alone is a count victim too.
    """
    for_bytes: list[Resident] = []
    freed = 0
    for victim in victims:
        if short.need <= short.room + freed:
            break
        if victim.device == short.device:
            for_bytes.append(victim)
            freed += victim.usage
    for_bytes = _prune(for_bytes, short.need, short.room + freed, 0, short.device)
    awake = [r for r in order if not r.asleep and r not in for_bytes]
    spare = sorted(awake, key=lambda r: keep(r, by_bytes=False))
    return for_bytes + spare[: max(0, count_excess - _running(for_bytes))]


def _running(victims: Sequence[Resident]) -> int:
    return sum(1 for v in victims if not v.asleep)


def _prune(
    victims: list[Resident], need: int, room: int, count_excess: int, device: str
) -> list[Resident]:
    """Drop victims the plan does not need, most worth keeping first.

    Greedy order can pick a victim for the count cap and then a later one that
    satisfies both memory and count; the first is then stopped for nothing.
    """
    kept = list(victims)
    for victim in reversed(victims):
        freed = victim.usage if victim.device == device else 0
        counted = _running(kept) - (0 if victim.asleep else 1)
        if need <= room - freed and counted >= count_excess:
            kept.remove(victim)
            room -= freed
    return kept


def plan_admission(
    need: int,
    devices: Sequence[DeviceView],
    residents: Sequence[Resident],
    limits: Limits,
) -> Plan:
    """Decide where and at what cost a model that needs ``need`` bytes can start.

    ``devices`` are the candidates (the preset's pinned devices, or all); the
    best plan is the one with no victims and the most room (free memory less
    what models starting there will take, within the budget), then the one with
    the fewest victims, then one that must wait.
    """
    if not devices:
        return Impossible("no device to place the model on")
    running = sum(1 for r in residents if not r.asleep)
    plans = [(d, _plan_device(need, d, residents, limits, running)) for d in devices]
    admits = [(d, p) for d, p in plans if isinstance(p, Admit)]
    if admits:
        # Room, not free: a model still starting there has yet to take its grant from free.
        _, best = min(
            admits, key=lambda dp: (len(dp[1].victims), -_room_on(dp[0], residents, limits))
        )
        return best
    waits = [p for _, p in plans if isinstance(p, Wait)]
    if waits:
        return min(waits, key=lambda p: len(p.busy))
    return (
        plans[0][1]
        if len(plans) == 1
        else Impossible(
            "; ".join(f"{d.id}: {p.reason}" for d, p in plans if isinstance(p, Impossible))
        )
    )


def best_plan(
    needs: Mapping[str, int],
    views: Sequence[DeviceView],
    residents: Sequence[Resident],
    limits: Limits,
) -> Plan:
    """The best plan over devices whose need differs (one need per device id).

    Devices are grouped by need so each group is planned with its own number; an
    admit beats a wait, which beats impossible. Among admits, as within a group, the
    fewest victims win, then the most room.
    """
    by_need: dict[int, list[DeviceView]] = {}
    for view in views:
        by_need.setdefault(needs[view.id], []).append(view)
    plans = [plan_admission(n, vs, residents, limits) for n, vs in by_need.items()]
    room = {view.id: _room_on(view, residents, limits) for view in views}
    admits = [p for p in plans if isinstance(p, Admit)]
    if admits:
        return min(admits, key=lambda p: (len(p.victims), -room.get(p.device, 0)))
    waits = [p for p in plans if isinstance(p, Wait)]
    if waits:
        return min(waits, key=lambda p: len(p.busy))
    return plans[0] if plans else Impossible("no device reported memory")


# ---------------------------------------------------------------- holds

# The loader's recent past: long enough to see a rush, short enough to see it end.
HOLD_WINDOW_S = 300.0
# A hold shorter than this is not worth a re-plan (and rounding can leave one this short).
_MIN_HOLD_S = 0.01


@dataclass(frozen=True)
class HoldRule:
    """When an admissible load waits rather than evict models in more demand than it.

    ``busy`` is the share of the last :data:`HOLD_WINDOW_S` seconds spent loading at
    or above which loads are held (0: whenever the victims are worth more); ``max_s``
    is the longest a load is held, counted from its first request (0: never).
    """

    max_s: float = 30.0
    busy: float = 0.4


@dataclass(frozen=True)
class Hold:
    """Admissible, but held: the victims outweigh the model and the loader is busy."""

    seconds: float  # the most it is held from now; it goes sooner if the condition clears
    crf: float  # the model's
    victims_crf: float  # the victims', summed
    busy: float  # the loader's busy share
    # Where every start is timed, what was compared: each CRF times its start seconds
    # (:func:`_worth`'s value), the model's and the victims' summed. None: plain CRFs.
    worth: float | None = None
    victims_worth: float | None = None

    @property
    def reason(self) -> str:
        """Why, in the words status shows."""
        loader = f"while the loader is busy {self.busy:.0%} of the time"
        if self.worth is None or self.victims_worth is None:
            return (
                f"held up to {self.seconds:.0f}s: its victims' CRF {self.victims_crf:.2f} "
                f"exceeds its {self.crf:.2f} {loader}"
            )
        return (
            f"held up to {self.seconds:.0f}s: its victims' CRF {self.victims_crf:.2f} times "
            f"their start seconds, {self.victims_worth:.1f}, exceeds its {self.worth:.1f} "
            f"(CRF {self.crf:.2f}) {loader}"
        )


def loader_busy(
    spans: Iterable[tuple[float, float]], now: float, window: float = HOLD_WINDOW_S
) -> float:
    """Load seconds per second over the last ``window``: the share of it spent loading.

    ``spans`` are (start, end) of loads and wakes; one under way ends at ``now``.
    Overlapping loads add up, so on several devices the share can pass 1.
    """
    start = now - window
    taken = sum(max(0.0, min(end, now) - max(begin, start)) for begin, end in spans)
    return taken / window


def named_once(names: Collection[str], residents: Sequence[Resident]) -> list[Resident]:
    """The resident each name stands for, once: an idle one where a busy one shares it.

    A plan's victims are idle. A model a reload removed still drains under its name while
    the same name, added back, may already serve: that one is the victim, counted once.
    """
    found: dict[str, Resident] = {}
    for r in residents:
        if r.name in names and (r.name not in found or found[r.name].busy):
            found[r.name] = r
    return list(found.values())


def hold(  # noqa: PLR0913 - the plan and the facts it is held on, keyword-only
    plan: Plan,
    crf: float | None,
    residents: Sequence[Resident],
    *,
    busy: float,
    waited: float,
    rule: HoldRule,
    reload_s: float | None = None,
) -> Hold | None:
    """Whether an admissible load should wait before it evicts: a Hold, or None to go now.

    A saturated loader that evicts a model in more demand than the one it loads
    reloads the victim soon after, and every load displaces another: the thrash of
    docs/benchmarks.md (section 3). Holding the load lets its requests gather, so
    one load serves them all, while the victims keep serving theirs; the hold ends
    once the model outweighs them, or after ``rule.max_s``. An idle loader never
    holds: then the wait would buy nothing. Without CRFs there is no hold.

    The weights are eviction's (:func:`_worth`, whole): each CRF times its start
    seconds (``reload_s`` is the model's own) when every start has been timed, so a
    victim that restarts in a second does not hold a load that takes a minute for
    long; plain CRFs otherwise.
    """
    if not isinstance(plan, Admit) or not plan.victims or crf is None:
        return None
    victims = named_once(plan.victims, residents)
    if any(r.crf is None for r in victims):
        return None
    left = rule.max_s - waited
    if left < _MIN_HOLD_S or busy < rule.busy:
        return None
    kept = sum(r.crf or 0.0 for r in victims)
    timed = [r.reload_s for r in victims if r.reload_s is not None]
    if reload_s is None or len(timed) < len(victims):
        return Hold(left, crf, kept, busy) if kept > crf else None
    worth = _weighed(crf, reload_s)
    victims_worth = sum(_weighed(r.crf or 0.0, s) for r, s in zip(victims, timed, strict=True))
    if victims_worth <= worth:
        return None
    return Hold(left, crf, kept, busy, worth=worth, victims_worth=victims_worth)


# ---------------------------------------------------------------- tiers


@dataclass(frozen=True)
class RamEntry:
    """A model held in the ram tier: a sleeping process, or a stopped model's locked pages."""

    name: str
    bytes: int
    last_used: float
    via: RamVia
    busy: bool = False  # being woken or started from it: not to be pushed down now
    crf: float | None = None  # as Resident.crf: decayed to the plan's clock
    reload_s: float | None = None  # as Resident.reload_s


@dataclass(frozen=True)
class RamTier:
    """The ram tier as measured: its budget, host memory available to it, what it holds."""

    budget: int  # 0 turns the tier off
    available: int  # host memory available now, less the reserve
    entries: tuple[RamEntry, ...] = ()


@dataclass(frozen=True)
class _OfModel:
    """An action on one model; each kind of action is its own class (never equal to another)."""

    model: str


class Stop(_OfModel):
    """Stop the model's process (down to disk, or out of the ram tier)."""


class Sleep(_OfModel):
    """Put the model's process to sleep (vLLM): down to the ram tier."""


class LockPages(_OfModel):
    """Keep the model's weight file resident and locked in host RAM (before its stop)."""


class UnlockPages(_OfModel):
    """Release the model's locked pages: down from the ram tier to disk."""


class Stage(_OfModel):
    """Have the model's weights copied into the staging cache before it starts."""


class Wake(_OfModel):
    """Wake the model's sleeping process (vLLM's ``/wake_up``): up from the ram tier."""


@dataclass(frozen=True)
class Start(_OfModel):
    """Start the model's process on ``device``: up from disk, or from pages held in RAM."""

    device: str


@dataclass(frozen=True)
class DropCached:
    """Delete the staging cache's copy ``key``, for room in the cache."""

    key: str


# A model's move down a tier, for another's room.
Down: TypeAlias = Stop | Sleep | LockPages | UnlockPages
Action: TypeAlias = Down | Stage | Start | Wake | DropCached


def is_down(action: Action) -> TypeGuard[Down]:
    """Whether ``action`` is a model's move down a tier (one of :data:`Down`)."""
    return isinstance(action, Stop | Sleep | LockPages | UnlockPages)


def load_plan(
    model: str, admit: Admit, down: Sequence[Down], *, waking: bool, staged: bool
) -> tuple[Action, ...]:
    """A load's whole plan, in the order it is carried out.

    First the victims' moves down a tier (``down``, from :func:`demotions`); then the
    copy into the staging cache, unless it is there (``staged``) or the model wakes:
    after the stops, whose copies may be the room it needs; then the start on the
    admitted device, or the wake. The caller carries out the first steps and plans
    again: what the moves freed is read, not assumed.
    """
    steps: list[Action] = list(down)
    if not (waking or staged):
        steps.append(Stage(model))
    steps.append(Wake(model) if waking else Start(model, admit.device))
    return tuple(steps)


class CachedCopy(Protocol):
    """A copy in the staging cache, as its planner sees it."""

    @property
    def key(self) -> str: ...  # noqa: D102 - the copy's name in the cache
    @property
    def source(self) -> str: ...  # noqa: D102 - the file it is a copy of
    @property
    def size(self) -> int: ...  # noqa: D102
    @property
    def last_used_ns(self) -> int: ...  # noqa: D102 - wall clock


def cache_room(
    copies: Iterable[CachedCopy],
    budget: int,
    need: int,
    in_use: Collection[str],
    reserved: int = 0,
) -> tuple[DropCached, ...] | None:
    """The copies to delete so that ``need`` more bytes fit in ``budget``; None if impossible.

    ``reserved`` bytes belong to copies in progress. Least recently used copies go first
    (ties by key, so a plan is reproducible); one whose source is in ``in_use`` never.
    """
    listed = list(copies)
    free = budget - reserved - sum(c.size for c in listed)
    drops: list[DropCached] = []
    candidates = sorted(
        (c for c in listed if c.source not in in_use), key=lambda c: (c.last_used_ns, c.key)
    )
    for copy in candidates:
        if free >= need:
            break
        drops.append(DropCached(copy.key))
        free += copy.size
    return tuple(drops) if free >= need else None


def _down_from_ram(entry: RamEntry) -> Down:
    return Stop(entry.name) if entry.via == "sleep" else UnlockPages(entry.name)


def _freeable(entry: RamEntry) -> bool:
    # Busy: a wake or a start from it. Pages of no bytes are another preset's, counted by
    # its entry: let go alone, they free nothing (that entry keeps them locked).
    return not entry.busy and (entry.bytes > 0 or entry.via == "sleep")


def _spill(entries: Iterable[RamEntry], short: int) -> list[RamEntry]:
    """Entries to push down, taken in the order given (least worth first), to free ``short``.

    Those a later, larger one makes unneeded stay, most worth keeping first (as
    :func:`_prune` keeps a plan's); where not enough can go, all that can does.
    """
    taken: list[RamEntry] = []
    freed = 0
    for entry in entries:
        if freed >= short:
            break
        if _freeable(entry):
            taken.append(entry)
            freed += entry.bytes
    kept: list[RamEntry] = []
    for entry in reversed(taken):
        if freed - entry.bytes >= short:
            freed -= entry.bytes
        else:
            kept.append(entry)
    return kept[::-1]


class _RamLedger:
    """The ram tier while a plan is being made: what it holds and the room left."""

    def __init__(self, ram: RamTier, order: _Order) -> None:
        self.order = order
        self.entries = sorted(ram.entries, key=lambda e: _worth(e, order, None))
        self.budget = ram.budget
        self.held = sum(e.bytes for e in self.entries)
        self.available = ram.available

    def remove(self, entry: RamEntry) -> Down:
        self.entries.remove(entry)
        self.held -= entry.bytes
        self.available += entry.bytes
        return _down_from_ram(entry)

    def room_for(self, victim: Resident) -> list[RamEntry] | None:
        """Entries worth less to push down so ``victim`` fits; None when it cannot fit."""
        room = min(self.budget - self.held, self.available)
        worth = _worth(victim, self.order, None)
        cheaper = (e for e in self.entries if _worth(e, self.order, None) < worth)
        spill = _spill(cheaper, victim.ram_cost - room)
        return spill if room + sum(e.bytes for e in spill) >= victim.ram_cost else None

    def add(self, victim: Resident, via: RamVia) -> None:
        entry = RamEntry(
            victim.name,
            victim.ram_cost,
            victim.last_used,
            via,
            crf=victim.crf,
            reload_s=victim.reload_s,
        )
        self.entries.append(entry)
        self.held += victim.ram_cost
        self.available -= victim.ram_cost


def demotions(victims: Sequence[Resident], ram: RamTier) -> tuple[Down, ...]:
    """What to do with each victim of an admission: down to the ram tier, or to disk.

    The victim most worth keeping (highest CRF, or most recently used) gets the
    ram tier first. Room in the tier is the budget less what it holds, and never
    more than the host memory available; to make room, ram entries worth less than
    the victim go down to disk, only those the room needs. A victim already in the
    ram tier (asleep on this device) goes down to disk, before the others ask for
    room: the room it leaves is theirs, and it is never pushed down twice.
    """
    ranking = _order([*victims, *ram.entries])
    ledger = _RamLedger(ram, ranking)
    actions: list[Down] = []
    for victim in (v for v in victims if v.asleep):
        # Its own entry: a victim is idle, a namesake a reload removed (leaving) is busy.
        mine = (e for e in ledger.entries if e.name == victim.name and not e.busy)
        entry = next(mine, None)
        actions.append(ledger.remove(entry) if entry else Stop(victim.name))
    awake = [v for v in victims if not v.asleep]
    for victim in sorted(awake, key=lambda v: _worth(v, ranking, None), reverse=True):
        spill = None if victim.ram_via is None or ram.budget <= 0 else ledger.room_for(victim)
        if victim.ram_via is None or spill is None:
            actions.append(Stop(victim.name))
            continue
        actions += [ledger.remove(entry) for entry in spill]
        ledger.add(victim, victim.ram_via)
        if victim.ram_via == "sleep":
            actions.append(Sleep(victim.name))
        else:
            actions += [LockPages(victim.name), Stop(victim.name)]
    return tuple(actions)


def count_overflow(residents: Sequence[Resident], max_running: int | None) -> tuple[Resident, ...]:
    """Idle running models to take off the device so that at most ``max_running`` run.

    Least worth keeping first; busy and pinned ones stay (still counted), so fewer may
    be returned than the excess: the next admission waits for the rest.
    """
    running = [r for r in residents if not r.asleep]
    excess = 0 if max_running is None else len(running) - max_running
    candidates = [r for r in running if not r.busy and not r.pinned]
    ranking = _order(candidates)  # a count, not bytes: what each costs to lose, whole
    return tuple(sorted(candidates, key=lambda r: _worth(r, ranking, None))[: max(0, excess)])


def ram_overflow(ram: RamTier) -> tuple[Down, ...]:
    """Entries to push down to disk so the tier fits its budget and the available memory.

    Least worth keeping first (lowest CRF, or least recently used), and no more than the
    excess needs; busy entries stay, and so do pages that another entry counts, which free
    nothing.
    """
    held = sum(e.bytes for e in ram.entries)
    over = max(held - ram.budget, -ram.available)
    ranking = _order(ram.entries)
    ordered = sorted(ram.entries, key=lambda e: _worth(e, ranking, None))
    return tuple(_down_from_ram(entry) for entry in _spill(ordered, over))


def room_after(
    need: int,
    device: DeviceView,
    residents: Sequence[Resident],
    limits: Limits,
    victims: Collection[str],
) -> int:
    """Room left on ``device`` once ``victims`` are gone and ``need`` is placed.

    When the device is host RAM, this is all the ram tier may keep of the victims:
    pages held there are taken from the same memory the new model needs.
    """
    here = [r for r in residents if r.device == device.id]
    # Each victim where it is: a namesake draining here is not it when it goes elsewhere.
    going = named_once(victims, residents)
    freed = sum(r.usage for r in going if r.device == device.id)
    return _room_now(device, here, limits) + freed - need
