"""A backend's process tree, read from the kernel's children lists or the whole table."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Collection, Iterator

import psutil
import pytest
from daemon import wait_for

from swapd.probe import _tree

# A leader with a child and a grandchild; one of them leaves the group (setsid).
SCRIPT = "sleep 60 & (setsid sleep 61 & sleep 62; true) & wait"


@pytest.fixture
def tree() -> Iterator[subprocess.Popen[bytes]]:
    """A small real process tree, three levels deep."""
    leader = subprocess.Popen(["sh", "-c", SCRIPT], start_new_session=True)
    try:
        wait_for(lambda: len(psutil.Process(leader.pid).children(recursive=True)) >= 4)
        yield leader
    finally:
        for proc in psutil.Process(leader.pid).children(recursive=True):
            proc.kill()
        leader.kill()
        leader.wait()


def _expected(leader: subprocess.Popen[bytes]) -> dict[int, frozenset[int]]:
    """The leader's tree as psutil sees it."""
    members = psutil.Process(leader.pid).children(recursive=True)
    return {leader.pid: frozenset({leader.pid, *(p.pid for p in members)})}


def test_the_children_lists_and_the_table_agree(tree: subprocess.Popen[bytes]) -> None:
    """Both readings give the leader and every descendant, whatever group it is in."""
    assert _tree._children_listed(), "this kernel lists no children: the fast path is untested"
    assert _tree.process_trees([tree.pid]) == _expected(tree)
    assert _tree._from_table([tree.pid]) == _expected(tree)


def test_without_children_lists_the_table_is_read(
    tree: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel without CONFIG_PROC_CHILDREN: the same answer from one pass over the table."""
    monkeypatch.setattr(_tree, "_children_listed", lambda: False)
    assert _tree.process_trees([tree.pid]) == _expected(tree)


def test_a_root_that_is_gone_is_itself_alone() -> None:
    """A pid that exited meanwhile: its tree is just the pid, with nothing read for it."""
    gone = max(psutil.pids()) + 100_000
    assert _tree.process_trees([gone]) == {gone: frozenset({gone})}


THREADS = (
    "import threading, time\n"
    "for _ in range(200):\n"
    "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    "print('up', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_tree_with_hundreds_of_threads_is_read_from_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Children lists are per thread: past the budget the one table pass is cheaper."""
    with subprocess.Popen([sys.executable, "-c", THREADS], stdout=subprocess.PIPE) as busy:
        try:
            assert busy.stdout is not None
            assert busy.stdout.readline() == b"up\n"
            table_calls: list[int] = []
            real = _tree._from_table

            def spy(roots: Collection[int]) -> dict[int, frozenset[int]]:
                table_calls.append(len(roots))
                return real(roots)

            monkeypatch.setattr(_tree, "_from_table", spy)
            assert _tree.process_trees([busy.pid]) == {busy.pid: frozenset({busy.pid})}
            assert table_calls == [1]
        finally:
            busy.kill()
