"""Which processes belong to an asked pid: the pid itself and all its descendants."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

_PROC = Path("/proc")
# Threads whose children lists one reading reads, at about 14 us each; the pass over
# the process table costs 2-3 ms, about 200 threads' worth. Past this, the table.
_TASKS_MAX = 150


def process_trees(roots: Collection[int]) -> dict[int, frozenset[int]]:
    """Map each root to itself plus its live descendants.

    Where the kernel lists each task's children (``/proc/PID/task/TID/children``,
    CONFIG_PROC_CHILDREN, on in the usual distribution kernels) only the roots'
    own trees are read: 0.2 ms against 2-3 ms for a pass over the whole process
    table, on the path of every admission. Elsewhere, one pass over the table
    serves every root.
    """
    if not roots:
        return {}
    if _children_listed():
        trees = _walk(roots)
        if trees is not None:
            return trees
    return _from_table(roots)


@functools.cache
def _children_listed() -> bool:
    """Whether this kernel lists each task's children (it cannot change while swapd runs)."""
    return (_PROC / "self" / "task" / str(threading.get_native_id()) / "children").exists()


def _walk(roots: Collection[int]) -> dict[int, frozenset[int]] | None:
    """Each root and its descendants, from each task's list of children.

    Each thread has its own list, one file read each: None once the roots' trees
    hold more than ``_TASKS_MAX`` threads in all (threads by the hundred, as in vLLM
    or PyTorch workers: the table is quicker).
    """
    budget = _TASKS_MAX
    trees: dict[int, frozenset[int]] = {}
    for root in roots:
        seen = {root}
        stack = [root]
        while stack:
            pid = stack.pop()
            try:
                tasks = list((_PROC / str(pid) / "task").iterdir())
            except OSError:
                continue  # gone meanwhile
            budget -= len(tasks)
            if budget < 0:
                return None
            for task in tasks:
                try:
                    children = (task / "children").read_text().split()
                except OSError:
                    continue
                for child in map(int, children):
                    if child not in seen:
                        seen.add(child)
                        stack.append(child)
        trees[root] = frozenset(seen)
    return trees


def _from_table(roots: Collection[int]) -> dict[int, frozenset[int]]:
    """One pass over the process table; asking psutil per root would scan it per root."""
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info.get("ppid")
        if isinstance(ppid, int):
            children.setdefault(ppid, []).append(proc.pid)
    trees: dict[int, frozenset[int]] = {}
    for root in roots:
        seen = {root}
        stack = [root]
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        trees[root] = frozenset(seen)
    return trees


def foreign_list(usage: Mapping[int, int], trees: Mapping[int, frozenset[int]]) -> str | None:
    """Why a driver's per-pid list cannot be matched to ``trees``, or None when it can.

    A driver knows no pid namespaces: in a container it lists host pids, which match
    nothing here, and claiming 0 for the trees would count each model twice. A listed
    pid of one of the trees proves the namespace shared; then a pid swapd cannot see
    (one that just exited, or another user's under ``hidepid=``) is only left out.
    """
    unknown = [pid for pid in usage if not psutil.pid_exists(pid)]
    if not unknown or any(pid in usage for tree in trees.values() for pid in tree):
        return None
    return f"the driver lists pid {unknown[0]}, not in this pid namespace"


def attribute(usage: Mapping[int, int], trees: Mapping[int, frozenset[int]]) -> dict[int, int]:
    """Sum per-pid usage over each root's tree; roots whose tree uses nothing are left out."""
    totals: dict[int, int] = {}
    for root, tree in trees.items():
        total = sum(usage.get(pid, 0) for pid in tree)
        if total > 0:
            totals[root] = total
    return totals
