"""llama-server with Gemma from the ram tier and from a cold disk (issue 8, section 3).

A llama-server model reaches the ram tier when it stops: swapd maps its GGUF, reads it
in and locks it, so the next start finds every page in RAM. Unloading it drops that hold
(the disk tier); ``swapd.pages.drop_cache`` then evicts the file from the page cache, so
the next start reads the disk. Both starts must answer the README's prompt with Paris.
Times are in ``docs/benchmarks.md`` (``scripts/bench_tiers.py``), never asserted here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import Daemon, wait_for

from swapd.pages import Dropped, drop_cache, resident_bytes

pytestmark = pytest.mark.llama
PROMPT = "Q: What is the capital of France?\nA:"
# A clean file nobody maps drops to nothing; leave a page or two for a kernel that keeps some.
SLACK = 2 * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def private_gemma(gemma: Path, tmp_path: Path) -> Path:
    """A copy of Gemma that only this test maps, on a filesystem whose pages can be dropped.

    The shared file may be mapped by another test's llama-server at any moment, and the
    kernel never drops mapped pages.
    """
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    kinds = {line.split()[1]: line.split()[2] for line in mounts}
    target = str(tmp_path.resolve())
    inside = [m for m in kinds if target == m or target.startswith(m.rstrip("/") + "/")]
    mount = max(inside, key=len)
    if kinds[mount] in {"tmpfs", "ramfs"}:
        pytest.skip(f"{tmp_path} is on {kinds[mount]}, which keeps its pages whatever it is told")
    copy = tmp_path / "gemma.gguf"
    shutil.copyfile(gemma, copy)
    return copy


def gemma_preset(model: Path) -> dict[str, Any]:
    """Gemma on llama-server with a small context and a TTL short enough to wait for."""
    return {"backend": "llama-server", "model": str(model), "args": ["-c", "1024"], "ttl": "1s"}


def answer(d: Daemon) -> str:
    """The README's request through swapd: greedy, 8 tokens, on /v1/completions."""
    body = {"model": "gemma", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    status, reply = d.request("POST", "/v1/completions", body, timeout=120)
    assert status == 200, reply
    text: str = reply["choices"][0]["text"]
    return text


def in_ram_tier(d: Daemon) -> dict[str, Any] | None:
    """The model's status once its TTL has stopped it into the ram tier, else None."""
    model = d.model("gemma")
    return model if (model["state"], model["tier"]) == ("stopped", "ram") else None


def test_gemma_restarts_from_its_locked_pages_in_the_ram_tier(
    start_daemon: StartDaemon, gemma: Path
) -> None:
    """Past its TTL Gemma stops with its GGUF locked in RAM; a request starts it from there.

    Both answers contain Paris; the second start is a new process (llama-server has no
    sleep mode), which found the whole file resident.
    """
    d = start_daemon({"gemma": gemma_preset(gemma)})
    assert "Paris" in answer(d)
    model = wait_for(lambda: in_ram_tier(d), timeout=30)
    size = gemma.stat().st_size
    assert model["pages"] == {"locked": True, "note": None}
    assert model["memory"]["ram"] == size
    assert model["pid"] is None
    assert resident_bytes(gemma) == size
    assert "Paris" in answer(d)
    assert [e["how"] for e in d.events("model.load.done")] == ["start", "start"]
    assert len(d.events("backend.spawn")) == 2


def test_gemma_starts_from_a_cold_disk_after_unload_drops_its_pages(
    start_daemon: StartDaemon, private_gemma: Path
) -> None:
    """Unload releases the held pages; evicted from the page cache, Gemma starts from disk.

    The answer still contains Paris, and the file is resident again afterwards: the new
    llama-server read it back from the disk.
    """
    d = start_daemon({"gemma": gemma_preset(private_gemma)})
    assert "Paris" in answer(d)
    wait_for(lambda: in_ram_tier(d), timeout=30)
    status, model = d.request("POST", "/swapd/models/gemma/unload")
    assert status == 200, model
    assert (model["state"], model["tier"], model["pages"]) == ("stopped", "disk", None)
    assert model["memory"]["ram"] == 0

    def dropped() -> Dropped | None:
        # The hold is closed in a thread after unload answers: retry until it lets go.
        result = drop_cache(private_gemma)
        return result if result.after <= SLACK else None

    result = wait_for(dropped, timeout=30, interval=0.1)
    assert result.before > 0, "the file was not cached before the drop"
    assert result.after <= SLACK
    assert "Paris" in answer(d)
    assert resident_bytes(private_gemma) > SLACK, "llama-server did not read the file back"
    assert [e["how"] for e in d.events("model.load.done")] == ["start", "start"]
