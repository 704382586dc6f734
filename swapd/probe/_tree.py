"""Which processes belong to an asked pid: the pid itself and all its descendants."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping


def process_trees(roots: Collection[int]) -> dict[int, frozenset[int]]:
    """Map each root to itself plus its live descendants.

    One pass over the process table serves every root; asking psutil for each
    root's children would scan the table once per root.
    """
    if not roots:
        return {}
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


def attribute(usage: Mapping[int, int], trees: Mapping[int, frozenset[int]]) -> dict[int, int]:
    """Sum per-pid usage over each root's tree; roots whose tree uses nothing are left out."""
    totals: dict[int, int] = {}
    for root, tree in trees.items():
        total = sum(usage.get(pid, 0) for pid in tree)
        if total > 0:
            totals[root] = total
    return totals
