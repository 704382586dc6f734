"""A copy just made is in use at once: no other copy may evict it while evicted paths are forgotten.

Unit test of :meth:`swapd.manager.Manager._stage`, with a cache that records what the
manager says is in use while the refresh that follows a copy reads the cache.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from swapd.backends import KINDS
from swapd.manager import Manager
from swapd.presets import Preset
from swapd.slot import Slot


def _slot(name: str, model: Path) -> Slot:
    preset = Preset(
        name=name, file=f"presets/{name}.yaml", backend="llama-server", model=model, stage=True
    )
    return Slot(preset, KINDS["llama-server"])


def test_a_fresh_copy_is_in_use_while_the_refresh_reads_the_cache(tmp_path: Path) -> None:
    """The refresh after a copy awaits a thread per staged model; meanwhile the copy is pinned.

    Another load's copy planning room then (its in_use) must see the fresh copy as in use,
    or it evicts it and the backend starts on a path that is gone.
    """
    x = _slot("x", tmp_path / "x.gguf")
    y = _slot("y", tmp_path / "y.gguf")
    y.staged_path, y.staged_source = str(tmp_path / "cache" / "y"), tmp_path / "y.gguf"
    pinned_meanwhile: list[list[Path]] = []

    class Cache:
        async def stage(self, source: Path, **_: Any) -> Path:
            return tmp_path / "cache" / source.name

        def cached_path(self, source: Path) -> Path | None:
            # What another load's copy would be told is in use, at this very moment.
            pinned_meanwhile.append(manager._sources_in_use(staging=y))
            return tmp_path / "cache" / source.name

    namespace = SimpleNamespace(
        staging=Cache(),
        config=SimpleNamespace(queue_timeout=60.0),
        slots={"x": x, "y": y},
        _uses_staged_copy=Manager._uses_staged_copy,
        _every_slot=lambda: [x, y],
    )
    manager = cast("Manager", namespace)
    namespace._refresh_staged = lambda exclude: Manager._refresh_staged(manager, exclude)
    namespace._sources_in_use = lambda staging=None: Manager._sources_in_use(manager, staging)
    namespace._cached_copy = lambda source: Manager._cached_copy(manager, source)

    async def main() -> None:
        x.load_task = asyncio.create_task(Manager._stage(manager, x))
        await x.load_task

    asyncio.run(main())
    assert x.staged_path == str(tmp_path / "cache" / "x.gguf")
    assert pinned_meanwhile == [[tmp_path / "x.gguf"]]
