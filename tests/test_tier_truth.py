"""Sequences of moves between tiers, each step followed by a check against the system.

After every step the test waits for a quiet moment and :class:`tier_truth.TierTruth`
compares status and metrics with the processes alive, swapd's mappings and locked bytes,
and the cache directory's contents. Budgets are small so that every move has to make
room; ``ttl`` and ``ram_ttl`` are short so that timers move models between the steps.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon, hook_env, wait_for
from test_split_gguf_tiers import _LIMITED_TIGHT_HOST
from test_tiers import vllm_preset
from tier_truth import TierTruth

pytestmark = pytest.mark.llama

# The copy of a staged model takes 3 s more: a reload or an unload lands while it runs.
SLOW_COPY = """
import time
import swapd._copy as c
_real = c.copy
def copy(source, *args, **kwargs):
    time.sleep(3)
    return _real(source, *args, **kwargs)
c.copy = copy
"""


def llama(model: Path, **keys: Any) -> dict[str, Any]:
    """A llama-server preset on ``model`` with a small context."""
    return {"backend": "llama-server", "model": str(model), "args": ["-c", "256"], **keys}


def copies(gguf: Path, folder: Path, *names: str) -> dict[str, Path]:
    """A copy of the GGUF of each name's own, in ``folder``."""
    folder.mkdir(exist_ok=True)
    paths = {name: folder / f"{name}.gguf" for name in names}
    for path in paths.values():
        shutil.copyfile(gguf, path)
    return paths


def reload(d: Daemon, presets: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``presets`` (a name left out is removed) and reload."""
    for gone in set(d.presets) - set(presets):
        (d.root / "presets" / f"{gone}.yaml").unlink()
    d.presets = presets
    d.write()
    assert d.request("POST", "/swapd/reload")[0] == 200


def serve(d: Daemon, truth: TierTruth, *names: str) -> None:
    """A request for each model in turn, each followed by a check."""
    for name in names:
        status, body = d.chat(name, max_tokens=1)
        assert status == 200, (name, body)
        truth.check()


def test_vllm_sleepers_and_held_pages_swap_through_a_tight_ram_budget(
    start_daemon: StartDaemon,
    vllm_binary: str,
    tiny_gguf: Path,
    tmp_path: Path,
) -> None:
    """max_running 1 and a ram budget of about one sleeper: every load pushes one down.

    Two llama-server presets share one GGUF (one hold, counted once).
    """
    gguf = copies(tiny_gguf, tmp_path / "m", "a")["a"]
    presets = {
        "v1": vllm_preset(vllm_binary, tmp_path / "v1", ttl="2s", ram_ttl="2s"),
        "v2": vllm_preset(vllm_binary, tmp_path / "v2", sleep=2, ttl="1s"),
        "a": llama(gguf, ttl="1s", ram_ttl="2s"),
        "a2": {**llama(gguf, ttl="1s"), "args": ["-c", "512"]},
    }
    d = start_daemon(presets, {"max_running": 1, "ram_budget": "60MiB"})
    truth = TierTruth(d)
    truth.check()
    serve(d, truth, "v1", "a", "v2", "a2", "v1", "a", "a2", "v2", "a")
    wait_for(lambda: all(d.model(n)["tier"] != "device" for n in presets), 40)
    truth.check()
    assert d.request("POST", "/swapd/models/a/unload")[0] == 200
    truth.check()
    assert d.request("POST", "/swapd/unload")[0] == 200
    truth.check()


def test_a_sleeper_killed_and_reloads_of_models_in_ram(
    start_daemon: StartDaemon, vllm_binary: str, tiny_gguf: Path, tmp_path: Path
) -> None:
    """SIGKILL of an asleep vLLM; sleep, ram_ttl and removal given to models in ram."""
    gguf = copies(tiny_gguf, tmp_path / "m", "t")["t"]
    presets = {
        "v": vllm_preset(vllm_binary, tmp_path / "v", ttl="1s"),
        "w": vllm_preset(vllm_binary, tmp_path / "w", ttl="1s"),
        "t": llama(gguf, ttl="1s"),
    }
    d = start_daemon(presets, {"ram_budget": "512MiB"})
    truth = TierTruth(d)
    serve(d, truth, *presets)
    wait_for(lambda: all(d.model(n)["tier"] == "ram" for n in presets), 40)
    truth.check()
    os.kill(d.model("v")["pid"], signal.SIGKILL)
    wait_for(lambda: d.model("v")["state"] != "asleep", 20)
    truth.check()
    reload(
        d, {**presets, "w": {**presets["w"], "sleep": 0}, "t": {**presets["t"], "ram_ttl": "1s"}}
    )
    truth.check()
    wait_for(lambda: d.model("t")["tier"] == "disk", 20)
    truth.check()
    serve(d, truth, "t")
    wait_for(lambda: d.model("t")["tier"] == "ram", 40)
    truth.check()
    reload(d, {n: p for n, p in d.presets.items() if n != "t"})
    truth.check()
    serve(d, truth, "v", "w")
    wait_for(lambda: d.model("v")["state"] == "asleep", 40)
    truth.check()


def test_staged_models_through_a_small_cache_and_a_copy_deleted_by_hand(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """Room in the cache for two copies of three, in ram for one; then a copy is deleted."""
    size = tiny_gguf.stat().st_size
    models = copies(tiny_gguf, tmp_path / "slow", "a", "b", "c")
    presets = {n: llama(p, stage=True, ttl="1s", ram_ttl="2s") for n, p in models.items()}
    cache = tmp_path / "cache"
    settings = {"cache_budget": size * 5 // 2, "ram_budget": size * 3 // 2, "max_running": 1}
    d = start_daemon(presets, {"cache_dir": str(cache), **settings})
    truth = TierTruth(d, cache)
    truth.check()
    serve(d, truth, "a", "b", "a", "c", "b")
    wait_for(lambda: all(d.model(n)["tier"] not in ("device", "ram") for n in presets), 40)
    truth.check()
    [entry, *_] = [e for e in cache.iterdir() if (e / "data").is_dir()]
    shutil.rmtree(entry / "data")
    truth.check()
    serve(d, truth, "a", "b", "c")


def test_reloads_and_unloads_while_staging_or_in_ram(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """stage turned off and on in ram; a model removed, another unloaded, while copied."""
    size = tiny_gguf.stat().st_size
    models = copies(tiny_gguf, tmp_path / "slow", "a", "b", "c")
    presets = {n: llama(p, stage=True, ttl="1s") for n, p in models.items()}
    cache = tmp_path / "cache"
    d = start_daemon(
        presets,
        {"cache_dir": str(cache), "cache_budget": size * 5 // 2, "ram_budget": size * 3},
        env=hook_env(tmp_path / "hook", SLOW_COPY),
    )
    truth = TierTruth(d, cache)
    serve(d, truth, "a")
    wait_for(lambda: d.model("a")["tier"] == "ram", 40)
    truth.check()
    reload(d, {**presets, "a": {**presets["a"], "stage": False}})
    truth.check()
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(d.chat, "b", max_tokens=1)
        wait_for(lambda: d.model("b")["staging"] is not None, 20)
        reload(d, {n: p for n, p in d.presets.items() if n != "b"})
        load.result()
        truth.check()
        load = pool.submit(d.chat, "c", max_tokens=1)
        wait_for(lambda: d.model("c")["staging"] is not None, 20)
        assert d.request("POST", "/swapd/models/c/unload?force=true")[0] == 200
        load.result()
        truth.check()
    serve(d, truth, "c", "a")
    wait_for(lambda: d.model("a")["tier"] == "ram" and d.model("c")["tier"] == "ram", 40)
    truth.check()
    reload(d, {"a": presets["a"], "c": {**presets["c"], "stage": False}})
    truth.check()
    assert d.request("POST", "/swapd/unload")[0] == 200
    truth.check()


def test_presets_of_one_file_staged_or_not_under_changes(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """Three presets of one GGUF, two staged: the held copy deleted, reloads while copied."""
    size = tiny_gguf.stat().st_size
    gguf = copies(tiny_gguf, tmp_path / "slow", "m")["m"]
    presets = {
        "a": llama(gguf, stage=True, ttl="1s"),
        "b": {**llama(gguf, stage=True, ttl="1s"), "args": ["-c", "512"]},
        "c": {**llama(gguf, ttl="1s"), "args": ["-c", "384"]},
    }
    cache = tmp_path / "cache"
    d = start_daemon(
        presets,
        {"cache_dir": str(cache), "cache_budget": size * 3, "ram_budget": size * 4},
        env=hook_env(tmp_path / "hook", SLOW_COPY),
    )
    truth = TierTruth(d, cache)
    serve(d, truth, "a", "b", "c")
    wait_for(lambda: all(d.model(n)["tier"] == "ram" for n in presets), 40)
    truth.check()
    for entry in cache.iterdir():
        if (entry / "data").is_dir():
            shutil.rmtree(entry / "data")
    wait_for(lambda: d.model("a")["tier"] != "ram" and d.model("b")["tier"] != "ram", 30)
    truth.check()
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(d.chat, "a", max_tokens=1)
        wait_for(lambda: d.model("a")["staging"] is not None, 20)
        changed = {"a": {**presets["a"], "ram_ttl": "1s"}, "b": {**presets["b"], "stage": False}}
        reload(d, {**presets, **changed})
        assert load.result()[0] == 200
    truth.check()
    wait_for(lambda: d.model("a")["tier"] == "disk", 30)
    truth.check()
    serve(d, truth, "b")
    reload(d, {n: p for n, p in d.presets.items() if n != "c"})
    truth.check()
    assert d.request("POST", "/swapd/unload")[0] == 200
    truth.check()


def test_held_pages_under_a_lock_limit(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """RLIMIT_MEMLOCK of one and a half files: later holds stay unlocked, still counted."""
    size = tiny_gguf.stat().st_size
    models = copies(tiny_gguf, tmp_path / "m", "a", "b", "c")
    presets = {n: llama(p, ttl="1s", ram_ttl="3s") for n, p in models.items()}
    env = hook_env(tmp_path / "hook", _LIMITED_TIGHT_HOST)
    env |= {"AUDIT_HOST_TOTAL": str(64 << 30), "AUDIT_MEMLOCK": str(size * 3 // 2)}
    d = start_daemon(presets, {"max_running": 1, "ram_budget": size * 5 // 2}, env)
    truth = TierTruth(d)
    serve(d, truth, "a", "b", "c", "a", "b")
    wait_for(lambda: all(d.model(n)["tier"] == "disk" for n in presets), 40)
    truth.check()
    serve(d, truth, "c", "a")
