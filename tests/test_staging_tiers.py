"""A staged model's tier follows its copy: in ``disk`` while the cache holds it, else ``store``.

Each test was written against a way status departed from the cache's contents; its
docstring says what the older code did.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import StartDaemon
from daemon import Daemon, hook_env, wait_for
from test_metrics import scrape, value
from test_pages_stale import mapped, to_ram
from test_staging_daemon import MIB, _model, staged_preset
from test_staging_faults import SLOW_COPY
from tier_truth import TierTruth


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


def _held_copy(start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path) -> tuple[Daemon, Path]:
    """A swapd whose staged llama-server ``t`` holds its copy's pages in the ram tier."""
    model = tmp_path / "slow" / "t.gguf"
    model.parent.mkdir()
    shutil.copyfile(tiny_gguf, model)
    preset = {"backend": "llama-server", "model": str(model), "stage": True, "ttl": "1s"}
    d = start_daemon({"t": preset}, {"cache_dir": str(tmp_path / "cache"), "ram_budget": 64 * MIB})
    to_ram(d, "t")
    [staged] = d.events("model.staged")
    assert mapped(d, Path(staged["path"]))
    return d, model


def _replace(model: Path, tmp_path: Path) -> None:
    """A new file at the model's path (a rename over it): its copy is of the old one."""
    new = tmp_path / "new.gguf"
    shutil.copyfile(model, new)
    new.replace(model)


@pytest.mark.llama
def test_held_pages_of_a_copy_whose_source_changed_are_let_go(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """The source of a staged copy held in the ram tier is replaced: the pages are of no use.

    The next start stages the new file and reads that copy. The copy's pages stayed
    locked and counted in the ram tier (only the copy itself was checked for changes).
    """
    d, model = _held_copy(start_daemon, tiny_gguf, tmp_path)
    _replace(model, tmp_path)
    wait_for(lambda: d.model("t")["tier"] == "store", timeout=30)  # the look every 5 s
    [staged] = d.events("model.staged")
    assert not mapped(d, Path(staged["path"]))
    assert d.get("/swapd/status")[1]["tiers"]["ram"]["bytes"] == 0
    assert [e["model"] for e in d.events("model.pages.stale")] == ["t"]


@pytest.mark.llama
def test_a_start_after_the_source_of_its_held_copy_changed_is_one_from_store(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """A start counted the outdated copy's pages as already in RAM, and said it came from ram.

    It read the new file's copy, made by that very load.
    """
    d, model = _held_copy(start_daemon, tiny_gguf, tmp_path)
    _replace(model, tmp_path)
    assert d.chat("t", max_tokens=1)[0] == 200
    assert [e["from_tier"] for e in d.events("model.load.done")] == ["store", "store"]


def test_a_copy_whose_source_changed_at_rest_is_no_disk_tier(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A stopped staged model's source is rewritten: its copy is stale, the model in store.

    Status and the metrics said ``disk``, as if the next load would start from the copy,
    and that load (which copies the new file) said it came from disk.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon({"s": staged_preset(model)}, {"cache_dir": str(cache)})
    truth = TierTruth(d, cache)
    assert d.chat("s")[0] == 200
    assert d.request("POST", "/swapd/models/s/unload")[0] == 200
    assert truth.check()["models"][0]["tier"] == "disk"
    _model(model, 3 * MIB)  # written again in place, bigger
    wait_for(lambda: d.model("s")["tier"] == "store", timeout=30)  # the look every 5 s
    truth.check()
    [stale] = [e for e in d.events("model.tier") if e["tier"] == "store"]
    assert (stale["model"], stale["reason"]) == ("s", "source_changed")
    assert d.chat("s")[0] == 200
    assert [e["from_tier"] for e in d.events("model.load.done")] == ["store", "store"]
    assert len(d.events("staging.copy.done")) == 2


def test_a_load_right_after_its_source_changed_comes_from_store(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The source is rewritten and the model loaded at once, before any look: from store.

    The load copied the new file, yet said (event and metric) it came from disk.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    d = start_daemon({"s": staged_preset(model)}, {"cache_dir": str(tmp_path / "cache")})
    assert d.chat("s")[0] == 200
    assert d.request("POST", "/swapd/models/s/unload")[0] == 200
    _model(model, 3 * MIB)
    assert d.chat("s")[0] == 200
    assert [e["from_tier"] for e in d.events("model.load.done")] == ["store", "store"]
    assert value(scrape(d), "swapd_loads_total", model="s", from_tier="store") == 2


# Slow storage that stops answering: a stat of a GGUF beside a file named EIO fails so,
# and is counted in that file (os.stat is under every Path.stat and scan).
_NO_ANSWER = """
import errno
import os
_real = os.stat
def stat(path, *args, **kwargs):
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
    flag = os.path.join(os.path.dirname(text), "EIO")
    if text.endswith(".gguf") and os.path.exists(flag):
        with open(flag, "a") as out:
            out.write("x")
        raise OSError(errno.EIO, "Input/output error", text)
    return _real(path, *args, **kwargs)
os.stat = stat
"""


def test_a_source_that_does_not_answer_keeps_its_copy(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Slow storage that fails a stat (EIO) says nothing of the copy: the model stays in disk.

    Only a source that answers, changed, or is gone makes its copy stale: taken for a
    change, a mount's hiccup would put the model in store, its copy whole in the cache.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    d = start_daemon(
        {"s": staged_preset(model)},
        {"cache_dir": str(tmp_path / "cache")},
        env=hook_env(tmp_path / "hook", _NO_ANSWER),
    )
    assert d.chat("s")[0] == 200
    assert d.request("POST", "/swapd/models/s/unload")[0] == 200
    flag = model.parent / "EIO"
    flag.touch()
    # Two looks met the fault (so one has ended), or the model left disk.
    wait_for(lambda: len(flag.read_text()) >= 2 or d.model("s")["tier"] != "disk", timeout=30)
    assert d.model("s")["tier"] == "disk"
    assert [e for e in d.events("model.tier") if e["tier"] == "store"] == []


def test_a_source_put_back_as_it_was_takes_its_model_out_of_store(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A source moved away puts its model in store; moved back, its copy is good again: disk.

    The next load starts from the copy, and says so.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    d = start_daemon({"s": staged_preset(model)}, {"cache_dir": str(tmp_path / "cache")})
    assert d.chat("s")[0] == 200
    assert d.request("POST", "/swapd/models/s/unload")[0] == 200
    away = model.rename(model.with_name("away.gguf"))
    wait_for(lambda: d.model("s")["tier"] == "store", timeout=30)
    away.rename(model)  # the same inode, size and mtime: the file the copy was made of
    wait_for(lambda: d.model("s")["tier"] == "disk", timeout=30)
    assert d.chat("s")[0] == 200
    assert [e["from_tier"] for e in d.events("model.load.done")] == ["store", "disk"]
    assert len(d.events("staging.copy.done")) == 1
