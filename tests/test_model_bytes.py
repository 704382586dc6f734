"""The ram tier costs a llama-server's pages at what its file holds now, not at its first start."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import StartDaemon
from daemon import wait_for
from fakes.tiny_gguf import write_tiny_llama_gguf

MIB = 1024**2


@pytest.mark.llama
def test_a_model_file_replaced_in_place_is_costed_at_its_new_size(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """Evicting a model into the ram tier must not overrun ram_budget with a stale size."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    shutil.copy(tiny_gguf, a)
    shutil.copy(tiny_gguf, b)
    presets = {n: {"backend": "llama-server", "model": str(p)} for n, p in (("a", a), ("b", b))}
    d = start_daemon(presets, {"max_running": 1, "ram_budget": "1MiB"})
    assert d.chat("a")[0] == 200
    # A new version of the weights lands by rename (as a download tool does).
    write_tiny_llama_gguf(tmp_path / "a.new", n_embd=256, n_layers=4)
    assert (tmp_path / "a.new").stat().st_size > MIB
    (tmp_path / "a.new").replace(a)
    assert d.chat("b")[0] == 200  # evicts a, down to the ram tier if it fits
    wait_for(lambda: d.model("a")["state"] == "stopped", timeout=40)
    _, status = d.get("/swapd/status")
    ram = status["tiers"]["ram"]
    assert ram["bytes"] <= ram["budget"], (ram, d.model("a")["tier"])
