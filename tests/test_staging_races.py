"""Staging's edge cases: a changed source, a replaced file, a removed cache, copies in use."""

from __future__ import annotations

import errno
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import StartDaemon
from daemon import hook_env, wait_for
from test_staging import complete, leftovers, write
from test_staging_daemon import MIB, _cached_entries, _model, staged_preset

from swapd import _copy
from swapd.staging import StagingCache, StagingError


def test_a_changed_source_restages_even_when_its_own_stale_copy_fills_the_cache(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """a (6 MiB, budget 10 MiB) ran once and stopped; a.gguf is then rewritten.

    The only entry in the cache is a's own stale, unused copy: evicting it makes room
    (before, a's own load counted it as in use, and the load failed with cache_full).
    """
    a = _model(tmp_path / "slow" / "a.gguf", 6 * MIB)
    d = start_daemon(
        {"a": staged_preset(a)},
        {"cache_dir": str(tmp_path / "cache"), "cache_budget": "10MiB", "queue_timeout": "5s"},
    )
    assert d.chat("a")[0] == 200
    assert d.request("POST", "/swapd/models/a/unload")[0] == 200
    _model(a, 6 * MIB)  # new weights, same path
    status, body = d.chat("a")
    assert status == 200, (status, body)


def test_a_model_file_replaced_with_same_size_and_mtime_is_not_served_from_the_old_copy(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Reload sees the new inode and restarts a; the restart runs the new bytes.

    The cache told copies apart by size and mtime only; the inode now counts too.
    """
    a = _model(tmp_path / "slow" / "a.gguf", 2 * MIB)
    old_bytes = a.read_bytes()
    d = start_daemon({"a": staged_preset(a)}, {"cache_dir": str(tmp_path / "cache")})
    assert d.chat("a")[0] == 200
    before = a.stat()
    fresh = _model(tmp_path / "slow" / "a.gguf.new", 2 * MIB)
    os.utime(fresh, ns=(before.st_atime_ns, before.st_mtime_ns))
    fresh.rename(a)  # replaced by rename: new inode, same size and mtime
    status, plan = d.request("POST", "/swapd/reload")
    assert status == 200
    assert plan["restarted"] == ["a"], plan
    wait_for(lambda: d.model("a")["state"] == "ready")
    spawn = d.events("backend.spawn")[-1]
    [served] = [arg for arg in spawn["argv"] if "/cache/" in arg]
    assert Path(served).read_bytes() != old_bytes, "restarted on the copy of the old file"
    assert Path(served).read_bytes() == a.read_bytes()


def test_a_removed_cache_dir_is_made_again_and_no_longer_counted(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The cache directory is deleted while swapd runs (an operator's rm -rf).

    Status stops counting the gone copies, and the next stage makes the directory again
    (before: 500 load_failed, on every stage until a restart).
    """
    a = _model(tmp_path / "slow" / "a.gguf", 2 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 2 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon({"a": staged_preset(a), "b": staged_preset(b)}, {"cache_dir": str(cache)})
    assert d.chat("a")[0] == 200
    assert d.request("POST", "/swapd/models/a/unload")[0] == 200
    shutil.rmtree(cache)
    _, status = d.get("/swapd/status")
    disk = status["tiers"]["disk"]["bytes"]
    assert disk == 0
    status_b, body_b = d.chat("b")
    assert status_b == 200, body_b


def test_a_copy_a_draining_process_runs_on_is_not_evicted_after_a_reload(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """a's preset now names a2.gguf; its old process still serves a request from a1's copy.

    Staging b (budget: room for one copy) does not evict the copy that process uses.
    """
    a1 = _model(tmp_path / "slow" / "a1.gguf", 6 * MIB)
    a2 = _model(tmp_path / "slow" / "a2.gguf", 6 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 6 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"a": staged_preset(a1), "b": staged_preset(b)},
        {"cache_dir": str(cache), "cache_budget": "10MiB"},
    )
    assert d.chat("a")[0] == 200
    [a1_copy] = _cached_entries(cache)
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(d.chat, "a", "long", fake_delay=6)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        preset = yaml.safe_load((d.root / "presets" / "a.yaml").read_text())
        preset["model"] = str(a2)
        (d.root / "presets" / "a.yaml").write_text(yaml.safe_dump(preset))
        assert d.request("POST", "/swapd/reload")[1]["restarted"] == ["a"]
        wait_for(lambda: d.model("a")["state"] == "draining")
        for_b = pool.submit(d.chat, "b")
        wait_for(lambda: d.events("model.staged")[-1]["model"] == "b" or for_b.done())
        still_serving = d.model("a")["state"] == "draining"
        evicted = [e for e in d.events("staging.evict") if e["source"] == str(a1)]
        assert not (still_serving and evicted), (
            "a1's copy was evicted while a's process still ran on it",
            a1_copy.exists(),
            evicted,
        )
        long.result()
        for_b.result()


SLOW_SCAN = """
import time
import swapd._copy as c
_real = c.scan
def scan(path):
    if path.name == "b.gguf":
        time.sleep(3)  # a slow stat or a large model directory's walk
    return _real(path)
c.scan = scan
"""


def test_a_copy_a_starting_model_just_got_is_not_evicted_by_a_stage_already_under_way(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """b's stage begins (a not loading); a's load then hits its copy and starts from it.

    b's copy plans room with what is in use when it plans, not when it began: a's copy
    stays, and b, with no room to be made while a runs, gets 503 cache_full.
    """
    a = _model(tmp_path / "slow" / "a.gguf", 6 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 6 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"a": staged_preset(a), "b": staged_preset(b)},
        {"cache_dir": str(cache), "cache_budget": "10MiB", "queue_timeout": "4s"},
        env=hook_env(tmp_path / "hook", SLOW_SCAN),
    )
    assert d.chat("a")[0] == 200
    assert d.request("POST", "/swapd/models/a/unload")[0] == 200
    with ThreadPoolExecutor(1) as pool:
        for_b = pool.submit(d.chat, "b")
        wait_for(lambda: d.model("b")["state"] == "queued")
        time.sleep(0.5)
        assert d.chat("a")[0] == 200  # a starts from its cached copy
        a_path = next(x for x in d.events("backend.spawn")[-1]["argv"] if "/cache/" in x)
        status_b, body_b = for_b.result()
    assert (status_b, body_b["error"]["code"]) == (503, "cache_full"), body_b
    assert d.model("a")["state"] == "ready"
    assert Path(a_path).exists(), f"a runs from {a_path}, evicted for b"


@pytest.mark.asyncio
async def test_enospc_mid_copy_is_a_staging_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up half-way through a copy: a StagingError, and nothing left behind."""
    source = write(tmp_path / "m.gguf", 4 * MIB)
    real = _copy._chunk
    calls = []

    def full_after_one(method: str, src_fd: int, dst_fd: int, want: int, buffer: memoryview) -> int:
        calls.append(method)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(method, src_fd, dst_fd, min(want, MIB), buffer)

    monkeypatch.setattr(_copy, "_chunk", full_after_one)
    async with StagingCache(tmp_path / "cache", 100 * MIB) as cache:
        try:
            await cache.stage(source)
        except StagingError:
            pass
        except OSError as exc:
            pytest.fail(f"stage() raised {type(exc).__name__}: {exc}, not a StagingError")
        assert leftovers(cache.cache_dir) == []
        assert complete(cache.cache_dir) == []
        assert cache.usage()[0] == 0
