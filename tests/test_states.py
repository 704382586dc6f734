"""The state table: every move is listed, checked against where it comes from."""

from __future__ import annotations

import pytest

from swapd.states import EDGES, BadTransition, State, check


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.STARTING, State.STOPPED),
        (State.FAILED, State.STOPPED),
        (State.FAILED, State.QUEUED),
        (State.READY, State.DRAINING),
        (State.DRAINING, State.SLEEPING),
        (State.ASLEEP, State.QUEUED),
        (State.QUEUED, State.WAKING),
    ],
)
def test_the_issues_edges_are_in_the_table_with_a_reason(old: State, new: State) -> None:
    """Issue 8 names the edges the old diagram left out; each is listed, and says why."""
    assert EDGES[(old, new)]
    check(old, old, new)


def test_a_move_from_another_state_than_expected_is_refused() -> None:
    """A read that gated the move went stale: the move must not happen."""
    with pytest.raises(BadTransition, match="expected READY, found ASLEEP"):
        check(State.ASLEEP, State.READY, State.STOPPING)


def test_a_move_the_table_does_not_list_is_refused() -> None:
    """STOPPED -> READY skips the start: no such edge."""
    with pytest.raises(BadTransition, match="no edge STOPPED -> READY"):
        check(State.STOPPED, State.STOPPED, State.READY)


def test_every_state_is_reached_and_left() -> None:
    """No state is a dead end or unreachable."""
    sources = {old for old, _ in EDGES}
    targets = {new for _, new in EDGES}
    assert set(State) == sources == targets
