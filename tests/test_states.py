"""The state table: every move is listed, checked against where it comes from."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import swapd
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


def _literal_moves(source: str) -> list[tuple[State, State, int]]:
    """Every ``.move(FROM, TO)`` whose states are written out: (from, to, line)."""

    def states(node: ast.expr) -> list[State]:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return [State[node.attr]] if node.value.id == "State" else []
        if isinstance(node, ast.Tuple):
            return [s for element in node.elts for s in states(element)]
        if isinstance(node, ast.IfExp):
            return states(node.body) + states(node.orelse)
        return []

    moves = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "move"
            and len(node.args) == 2
        ):
            targets = states(node.args[1])
            moves += [(old, new, node.lineno) for old in states(node.args[0]) for new in targets]
    return moves


def test_every_move_the_code_makes_is_in_the_table() -> None:
    """Each written-out move in swapd is an edge: one missing fails at run time, not here.

    draining -> ready (a model drained for a swap that took another) was missing: the
    load that had drained it failed with a 500 the first time that happened.
    """
    package = Path(swapd.__file__).parent
    moves = [
        (path.name, line, old, new)
        for path in sorted(package.rglob("*.py"))
        for old, new, line in _literal_moves(path.read_text())
    ]
    assert len(moves) > 20
    assert [m for m in moves if (m[2], m[3]) not in EDGES] == []
