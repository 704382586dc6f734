"""``Manager.unload_all``: one model removed meanwhile does not fail the others' unloads.

Unit test with a stand-in manager whose ``unload`` records each call.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from swapd.errors import UnknownModel
from swapd.manager import Manager


def _stand_in(fail: dict[str, BaseException]) -> tuple[Any, list[str]]:
    done: list[str] = []

    async def unload(name: str, *, force: bool = False) -> None:
        await asyncio.sleep(0)
        if name in fail:
            raise fail[name]
        done.append(f"{name}{' (force)' if force else ''}")

    return SimpleNamespace(slots={"a": None, "b": None, "c": None}, unload=unload), done


@pytest.mark.asyncio
async def test_a_model_a_reload_removed_meanwhile_is_passed_over() -> None:
    """``b`` is gone by its turn (404 for it alone): ``a`` and ``c`` are unloaded, no error."""
    manager, done = _stand_in({"b": UnknownModel("b", ["a", "c"])})
    await Manager.unload_all(cast("Manager", manager), force=True)
    assert sorted(done) == ["a (force)", "c (force)"]


@pytest.mark.asyncio
async def test_every_unload_ends_before_a_failure_is_raised() -> None:
    """Another failure is raised, once the other unloads have run to their end."""
    manager, done = _stand_in({"a": RuntimeError("stop failed")})
    with pytest.raises(RuntimeError, match="stop failed"):
        await Manager.unload_all(cast("Manager", manager))
    assert sorted(done) == ["b", "c"]
