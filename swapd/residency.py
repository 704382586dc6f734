"""How the manager's models stand for the policy: residents, claimed room, the ram tier.

The manager owns each model's :class:`~swapd.slot.Slot`; :mod:`swapd.policy` plans on
frozen views of them. These functions make those views from the slots and a memory
snapshot, and change nothing: one clock reading (``now``) per plan, so every CRF in a
plan is decayed to the same moment.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from swapd import policy
from swapd.admission import Snapshot
from swapd.probe import Device
from swapd.slot import Slot
from swapd.states import COMING_UP, ON_DEVICE, State

# States of a victim on its way down a tier: what it holds is still counted, by it.
_LEAVING = (State.DRAINING, State.SLEEPING, State.STOPPING)


@dataclass(frozen=True)
class Claim:
    """Room a load makes on a device: its need there, and the victims going down for it."""

    slot: Slot
    device: str
    need: int
    victims: tuple[str, ...]


def crf_now(slot: Slot, now: float) -> float:
    """The slot's recency-frequency value at ``now`` (LRFU): what eviction order keeps."""
    return policy.crf_decay(slot.crf, slot.crf_at, now)


def ram_via(slot: Slot, ram_budget: int) -> policy.RamVia | None:
    """How this slot could go down to the ram tier, if it can."""
    via = slot.kind.ram_via
    if ram_budget <= 0 or slot.preset.sleep == 0 or via is None:
        return None
    if via == "sleep" and slot.sleep_level == 0:
        return None
    if via == "pages" and slot.model_in_memory is not None:
        return None  # its file lives in RAM (tmpfs): a hold would count it twice, for nothing
    return via


def ram_cost(slot: Slot, measured: int) -> int:
    """Host RAM the slot would take in the ram tier."""
    if slot.kind.ram_via == "pages":
        return slot.model_bytes
    on_gpu = slot.device is not None and slot.device.kind != "cpu"
    if not on_gpu:
        return measured  # on a CPU the sleeping process keeps what it has
    return slot.kind.asleep_bytes(slot.preset, slot.model_bytes, slot.sleep_level)


def pinned(slot: Slot, device: Device | None) -> int:
    """Host RAM the slot's process pins beside what it holds on ``device`` (a GPU)."""
    if device is None or device.kind == "cpu":
        return 0  # on a CPU all it takes is counted on host RAM, its device
    return slot.kind.pinned_bytes(slot.preset, slot.model_bytes)


def resident(slot: Slot, snap: Snapshot, *, now: float, ram_budget: int) -> policy.Resident | None:
    """How a slot counts for admission, or None when it holds no device memory."""
    if slot.device is None or not (slot.state in ON_DEVICE or slot.asleep):
        return None
    pid = slot.child.pid if slot.child and slot.child.pid else None
    reading = snap.readings.get(slot.device.id)
    # No process yet: nothing taken. No per-process numbers: free already shows it, once
    # the process is up; while it starts or wakes (or did as the reading began), free
    # cannot tell what it has taken yet, so all of its grant is still to come (a second
    # load granted the same free memory would overrun the device).
    # What it holds on its own device: a helper's bytes on another GPU are not freed
    # there by stopping it (that GPU's free memory shows them).
    measured: int | None = None
    if pid is not None and reading is not None and reading.per_process_supported:
        measured = reading.by_pid.get(pid, 0)
    elif pid is None or slot.state in COMING_UP or id(slot) in snap.coming_up:
        measured = 0
    need = slot.need.bytes if slot.need else 0
    if slot.asleep or slot.leaving_ram:
        # Asleep, or stopping from sleep: it holds only what the driver kept, which
        # the probe measures, and it is not running (max_running).
        return policy.Resident(
            crf=crf_now(slot, now),
            name=slot.preset.name,
            device=slot.device.id,
            usage=measured or 0,
            last_used=slot.last_used,
            busy=slot.busy,
            pinned=slot.preset.pin,
            measured=measured,
            asleep=True,
            ram_via="sleep",
            ram_cost=slot.ram_bytes,
            reload_s=slot.reload_s,
        )
    return policy.Resident(
        crf=crf_now(slot, now),
        name=slot.preset.name,
        device=slot.device.id,
        usage=policy.counted_usage(measured, need),
        last_used=slot.last_used,
        busy=slot.busy,
        pinned=slot.preset.pin,
        measured=measured,
        ram_via=ram_via(slot, ram_budget),
        ram_cost=ram_cost(slot, measured or 0),
        reload_s=slot.reload_s,
    )


def locked_pages(slot: Slot, host_devices: Sequence[str], now: float) -> list[policy.Resident]:
    """A stopped model's locked pages, on each host-RAM device whose memory they take.

    Shown as residents so that a load there can push them down to disk. Only the locked
    files take memory that is not available: the rest are cache the kernel may reclaim.
    """
    if slot.pages is None or not slot.pages.locked_bytes:
        return []
    taken = min(slot.ram_bytes, slot.pages.locked_bytes)  # 0 where another counts them
    return [
        policy.Resident(
            crf=crf_now(slot, now),
            name=slot.preset.name,
            device=device,
            usage=taken,
            last_used=slot.last_used,
            busy=slot.busy,
            pinned=slot.preset.pin,
            measured=taken,
            asleep=True,
            ram_via="pages",
            ram_cost=slot.ram_bytes,
            reload_s=slot.reload_s,
        )
        for device in host_devices
    ]


def claimed(
    claims: Iterable[Claim],
    residents: Sequence[policy.Resident],
    slots: Mapping[str, Slot],
    exclude: Slot,
    now: float,
) -> list[policy.Resident]:
    """Room other loads are making: what each will take beyond its victims still leaving.

    A victim on its way down still counts what it holds; the load counts the rest of
    its need, and all of it once the victims are down, so that nothing else (a victim's
    own queued requests included) takes the room it made. ``residents`` are the current
    models' (``slots``): a model a reload removed is never a victim, so a namesake of
    it draining is left out by the caller, not matched here.
    """
    claims_seen = []
    for claim in claims:
        slot = claim.slot
        if slot is exclude:
            continue
        leaving = [
            r
            for r in residents
            if r.name in claim.victims
            and r.device == claim.device
            and (victim := slots.get(r.name)) is not None
            and victim.state in _LEAVING
        ]
        claims_seen.append(
            policy.Resident(
                crf=crf_now(slot, now),
                name=slot.preset.name,
                device=claim.device,
                usage=max(0, claim.need - sum(r.usage for r in leaving)),
                last_used=slot.last_used,
                # Busy, not pinned: a load that needs this room waits for it to be
                # taken (and then evicts it as any resident), it is not refused.
                busy=True,
                measured=0,  # nothing taken yet: all of it comes out of free
                asleep=any(not r.asleep for r in leaving),  # counted once, by its victim
            )
        )
    return claims_seen


def ram_entries(
    slots: Iterable[Slot], retiring: Collection[Slot], now: float
) -> tuple[policy.RamEntry, ...]:
    """What the ram tier holds: sleepers and locked pages, with what each takes."""
    return tuple(
        policy.RamEntry(
            s.preset.name,
            s.ram_bytes,
            s.last_used,
            "pages" if s.pages is not None else "sleep",
            busy=s.busy or s in retiring,  # its retirement takes it down
            crf=crf_now(s, now),
            reload_s=s.reload_s,
        )
        for s in slots
        # A sleeper whose wake waits for room, and a start from locked pages (which
        # keeps them until ready), still hold their bytes.
        if s.tier == "ram" or s.pages is not None
    )
