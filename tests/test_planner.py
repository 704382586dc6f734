"""The capacity planner's packing: pure, table-driven."""

from __future__ import annotations

import pytest

from swapd.planner import DeviceMemory, Room, Want, capacity, pack

GIB = 1024**3


def room(device: str, total: int, free: int, swapd: int = 0, reserve: int = 0) -> Room:
    """A device whose room is what swapd's models may use with all of them stopped."""
    memory = DeviceMemory(device, device, total * GIB, free * GIB, swapd * GIB)
    return Room(memory, capacity(memory, reserve * GIB, None))


def test_room_leaves_out_what_others_use_and_the_reserve() -> None:
    """What swapd's own backends use counts as room; everything else does not."""
    memory = DeviceMemory("gpu0", "gpu0", 24 * GIB, 6 * GIB, 12 * GIB)
    assert memory.outside == 6 * GIB
    assert capacity(memory, GIB, None) == 17 * GIB
    assert capacity(memory, GIB, 10 * GIB) == 10 * GIB


@pytest.mark.parametrize(
    ("wants", "expected"),
    [
        # Two fit together; the third only alone, evicting what was packed.
        (
            [Want("a", {"gpu0": 10 * GIB}, "estimate"), Want("b", {"gpu0": 8 * GIB}, "measured"),
             Want("c", {"gpu0": 20 * GIB}, "preset")],
            {"c": ("together", "gpu0"), "a": ("alone", "gpu0"), "b": ("alone", "gpu0")},
        ),
        # Larger than the device: never.
        ([Want("big", {"gpu0": 30 * GIB}, "preset")], {"big": ("never", None)}),
        # A pinned model is packed first, whatever its size; a model that would need it
        # evicted never fits (admission never evicts it), one beside it fits alone.
        (
            [Want("a", {"gpu0": 15 * GIB}, "preset"),
             Want("p", {"gpu0": 10 * GIB}, "preset", pinned=True)],
            {"p": ("together", "gpu0"), "a": ("never", None)},
        ),
        (
            [Want("a", {"gpu0": 9 * GIB}, "preset"), Want("b", {"gpu0": 5 * GIB}, "preset"),
             Want("p", {"gpu0": 10 * GIB}, "preset", pinned=True)],
            {"p": ("together", "gpu0"), "a": ("together", "gpu0"), "b": ("alone", "gpu0")},
        ),
        # A model allowed on no present device: never.
        ([Want("x", {}, "default")], {"x": ("never", None)}),
    ],
)  # fmt: skip
def test_models_pack_largest_first(
    wants: list[Want], expected: dict[str, tuple[str, str | None]]
) -> None:
    """Pinned first, then largest first; what does not fit packed may still fit alone."""
    plan = pack(wants, [room("gpu0", 24, 24, reserve=2)])
    assert {m.name: (m.fit, m.device) for m in plan.models} == expected
    assert [m.name for m in plan.models] == [w.name for w in wants]  # the presets' order


def test_models_spread_over_devices_with_the_most_room_left() -> None:
    """Each model goes where the most room is left after it (a tie: the first device)."""
    wants = [Want(n, {"gpu0": 8 * GIB, "gpu1": 8 * GIB}, "estimate") for n in ("a", "b", "c")]
    plan = pack(wants, [room("gpu0", 24, 24), room("gpu1", 16, 16)])
    assert [r.together for r in plan.rooms] == [["a", "b"], ["c"]]
    assert [r.used for r in plan.rooms] == [16 * GIB, 8 * GIB]
    assert plan.as_json()["devices"][0]["capacity"] == 24 * GIB


def test_no_more_than_max_running_are_packed_together() -> None:
    """``max_running: 1``: two that fit in memory together still run one at a time."""
    wants = [Want("a", {"gpu0": 8 * GIB}, "estimate"), Want("b", {"gpu0": 4 * GIB}, "estimate")]
    plan = pack(wants, [room("gpu0", 24, 24)], max_running=1)
    assert {m.name: (m.fit, m.device) for m in plan.models} == {
        "a": ("together", "gpu0"),
        "b": ("alone", "gpu0"),
    }
    [b] = [m for m in plan.models if m.name == "b"]
    assert b.reason == "fits, but max_running is 1; loading it stops another"
    assert [r.together for r in plan.rooms] == [["a"]]
    unbounded = pack(wants, [room("gpu0", 24, 24)])
    assert [r.together for r in unbounded.rooms] == [["a", "b"]]
