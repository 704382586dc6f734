"""``watch_config`` against writes that race the reads: nothing written is missed, nothing reread.

The real watch and the real reload of a ``Runtime`` (no manager, no daemon), on real files.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from swapd import reload
from swapd import runtime as runtime_module
from swapd.config import Config, load_config
from swapd.errors import ConfigErrors
from swapd.runtime import Runtime
from swapd.watch import watch

EVERY = 0.1


def layout(root: Path, **settings: Any) -> Path:
    """A config with one command preset ``a`` (ttl 1m) watched every EVERY seconds."""
    (root / "presets").mkdir(parents=True, exist_ok=True)
    set_ttl(root, "1m")
    config = {"state_dir": "state", "devices": "cpu", "watch_config": f"{EVERY}s", **settings}
    path = root / "swapd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def set_ttl(root: Path, ttl: str) -> None:
    """Write preset ``a`` with this ttl."""
    preset = {"backend": "command", "cmd": [sys.executable, "-c", "pass", "${PORT}"], "ttl": ttl}
    (root / "presets" / "a.yaml").write_text(yaml.safe_dump(preset))


async def watching(
    runtime: Runtime, act: Callable[[], Awaitable[None]], settle: float = 2.0
) -> list[str]:
    """Run the watch while ``act`` edits files, then ``settle`` seconds; each reload's outcome."""
    outcomes: list[str] = []

    async def reload() -> None:
        try:
            await runtime.reload()
        except ConfigErrors as exc:
            outcomes.append(f"refused: {exc}")
            return
        outcomes.append("ok")

    task = asyncio.create_task(watch(lambda: runtime.config, reload))
    await asyncio.sleep(3 * EVERY)
    await act()
    await asyncio.sleep(settle)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return outcomes


def ttl(runtime: Runtime) -> float:
    """The running ttl of preset ``a``."""
    return runtime.config.presets[0].ttl


@pytest.mark.asyncio
async def test_a_write_landing_while_a_reload_runs_is_reloaded(tmp_path: Path) -> None:
    """Written after the reload read the files, before it ended: reloaded next."""
    path = layout(tmp_path)
    reads: list[float] = []

    def load() -> Config:
        config = load_config(path)
        reads.append(config.presets[0].ttl)
        if len(reads) == 1:
            set_ttl(tmp_path, "3m")  # after the first reload's read
        return config

    runtime = Runtime(load_config(path), load)

    async def act() -> None:
        set_ttl(tmp_path, "2m")

    outcomes = await watching(runtime, act)
    assert reads == [120.0, 180.0]
    assert outcomes == ["ok", "ok"]
    assert ttl(runtime) == 180.0


@pytest.mark.asyncio
async def test_a_write_during_a_slow_comparison_is_reloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload's comparison takes a while (a new binary's --help); a write lands then."""
    path = layout(tmp_path)
    compare = reload.diff

    def slow_diff(*args: Any, **kwargs: Any) -> Any:
        time.sleep(6 * EVERY)
        return compare(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "diff", slow_diff)
    runtime = Runtime(load_config(path), lambda: load_config(path))

    async def act() -> None:
        set_ttl(tmp_path, "2m")
        await asyncio.sleep(4 * EVERY)  # settled and read; the comparison runs
        set_ttl(tmp_path, "3m")

    outcomes = await watching(runtime, act, settle=3.0)
    assert outcomes == ["ok", "ok"]
    assert ttl(runtime) == 180.0


@pytest.mark.asyncio
async def test_a_change_before_the_watch_began_is_reloaded(tmp_path: Path) -> None:
    """Written after the start read the config, before the watch's first look."""
    path = layout(tmp_path)
    runtime = Runtime(load_config(path), lambda: load_config(path))
    set_ttl(tmp_path, "2m")

    async def act() -> None:
        pass

    assert await watching(runtime, act) == ["ok"]
    assert ttl(runtime) == 120.0


@pytest.mark.asyncio
async def test_a_half_written_preset_refused_is_taken_once_complete(tmp_path: Path) -> None:
    """The reload reads half a preset and refuses it; the rest lands right after the read."""
    path = layout(tmp_path)
    preset = tmp_path / "presets" / "a.yaml"
    full = preset.read_text().replace("1m", "2m")
    loads: list[int] = []

    def load() -> Config:
        loads.append(1)
        try:
            return load_config(path)
        finally:
            if len(loads) == 1:
                preset.write_text(full)

    runtime = Runtime(load_config(path), load)

    async def act() -> None:
        preset.write_text(full[: len(full) // 2])

    outcomes = await watching(runtime, act)
    assert [o.split(":")[0] for o in outcomes] == ["refused", "ok"]
    assert ttl(runtime) == 120.0


@pytest.mark.asyncio
async def test_a_reload_by_another_hand_is_not_repeated_by_the_watch(tmp_path: Path) -> None:
    """A change a SIGHUP (or the route) already reloaded is not reloaded again."""
    path = layout(tmp_path, watch_config="1s")
    runtime = Runtime(load_config(path), lambda: load_config(path))

    async def act() -> None:
        set_ttl(tmp_path, "2m")
        await runtime.reload()  # before the watch's next look

    assert await watching(runtime, act, settle=3.0) == []
    assert ttl(runtime) == 120.0


@pytest.mark.asyncio
async def test_an_editor_lock_beside_the_presets_reloads_nothing(tmp_path: Path) -> None:
    """Emacs' ``.#a.yaml`` (a link to nowhere) is no preset: no reload, none refused."""
    path = layout(tmp_path)
    runtime = Runtime(load_config(path), lambda: load_config(path))

    async def act() -> None:
        (tmp_path / "presets" / ".#a.yaml").symlink_to("user@host.4242:1700000000")

    assert await watching(runtime, act) == []
    await runtime.reload()  # and a reload by hand takes the config as it is


def test_hidden_yaml_files_are_not_presets(tmp_path: Path) -> None:
    """The ``._a.yaml`` a copy from a Mac leaves beside each file is not read."""
    path = layout(tmp_path)
    (tmp_path / "presets" / "._a.yaml").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    assert [p.name for p in load_config(path).presets] == ["a"]


@pytest.mark.asyncio
async def test_a_config_file_caught_empty_is_refused_and_the_whole_one_taken(
    tmp_path: Path,
) -> None:
    """Truncated, then written again after a pause: the empty file is refused.

    Read as every default it would drop the keys and switch the watch off, so the rest of
    the write would never be read.
    """
    path = layout(tmp_path, api_keys=["key-0123456789abcdef"], max_body="1MiB")
    full = path.read_text()
    runtime = Runtime(load_config(path), lambda: load_config(path))

    async def act() -> None:
        path.write_text("")
        await asyncio.sleep(5 * EVERY)  # the writer pauses: the empty file settles
        path.write_text(full.replace("1MiB", "2MiB"))

    outcomes = await watching(runtime, act)
    assert len(outcomes) == 2
    assert "sets no key" in outcomes[0]
    assert outcomes[1] == "ok"
    assert runtime.config.max_body == 2 * 2**20
    assert runtime.config.api_keys == ("key-0123456789abcdef",)
