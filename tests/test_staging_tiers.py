"""A staged model's tier follows its copy: in ``disk`` while the cache holds it, else ``store``.

Each test was written against a way status departed from the cache's contents; its
docstring says what the older code did.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import StartDaemon
from daemon import hook_env, wait_for
from test_staging_daemon import MIB, _model, staged_preset
from test_staging_faults import SLOW_COPY


def test_a_copy_deleted_by_hand_puts_its_model_back_in_store(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The cache stops counting a copy deleted behind its back; its model is in store.

    The model went on showing the disk tier, its copy gone and counted nowhere, and its
    next load (a copy from slow storage) said it came from disk.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon({"s": staged_preset(model)}, {"cache_dir": str(cache)})
    assert d.chat("s")[0] == 200
    assert d.request("POST", "/swapd/models/s/unload")[0] == 200
    assert d.model("s")["tier"] == "disk"
    [entry] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    shutil.rmtree(entry / "data")
    _, status = d.get("/swapd/status")
    assert status["tiers"]["disk"]["bytes"] == 0
    assert d.model("s")["tier"] == "store"
    assert d.chat("s")[0] == 200
    assert [e["from_tier"] for e in d.events("model.load.done")] == ["store", "store"]


def test_a_copy_a_forced_unload_left_to_finish_takes_its_model_out_of_store(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A forced unload cuts a load while it copies; the copy, the cache's, still ends.

    The cache held and counted the copy, but the model showed ``store`` until its next
    load found it there.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    d = start_daemon(
        {"s": staged_preset(model)},
        {"cache_dir": str(tmp_path / "cache")},
        env=hook_env(tmp_path / "hook", SLOW_COPY),
    )
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(d.chat, "s")
        wait_for(lambda: d.model("s")["staging"] is not None)
        assert d.request("POST", "/swapd/models/s/unload?force=true")[0] == 200
        assert load.result()[0] == 503
    wait_for(lambda: d.events("staging.copy.done"))
    wait_for(lambda: d.model("s")["tier"] == "disk", timeout=10)
    assert d.get("/swapd/status")[1]["tiers"]["disk"]["bytes"] == 2 * MIB


def test_a_copy_made_for_one_preset_takes_another_of_its_file_out_of_store(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Two staged presets of one file share its copy: once made, neither is in store.

    The other preset showed ``store`` beside a cache holding its file, until its own load.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    d = start_daemon(
        {"a": staged_preset(model), "b": staged_preset(model)},
        {"cache_dir": str(tmp_path / "cache")},
    )
    assert d.chat("a")[0] == 200
    wait_for(lambda: d.model("b")["tier"] == "disk", timeout=10)
    assert d.chat("b")[0] == 200
    assert [e["from_tier"] for e in d.events("model.load.done")] == ["store", "disk"]
