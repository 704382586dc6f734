"""A staged model's tier follows its copy: in ``disk`` while the cache holds it, else ``store``.

Each test was written against a way status departed from the cache's contents; its
docstring says what the older code did.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import StartDaemon
from test_staging_daemon import MIB, _model, staged_preset


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
