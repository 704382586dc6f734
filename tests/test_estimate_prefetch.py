"""Memory estimates are read ahead of a model's first load, not on its request's path."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import structlog

from swapd import admission as admission_module
from swapd import needs as needs_module
from swapd import policy
from swapd.admission import Admission
from swapd.footprints import Footprints
from swapd.presets import Preset
from swapd.probe import Device, HostRamProbe


def _admission(tmp_path: Path) -> Admission:
    return Admission(HostRamProbe(), Footprints(tmp_path), policy.Limits())


def _count_estimates(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = needs_module.estimate_bytes

    def counted(preset: Preset, device: Device, total: int) -> int | None:
        calls.append(preset.name)
        return real(preset, device, total)

    monkeypatch.setattr(admission_module, "estimate_bytes", counted)
    return calls


def test_prefetch_reads_each_gguf_once_and_the_load_reuses_it(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the prefetch, a load's needs come from the cache: no GGUF read on its path."""
    calls = _count_estimates(monkeypatch)
    preset = Preset(name="tiny", file="tiny.yaml", backend="llama-server", model=tiny_gguf)
    adm = _admission(tmp_path)

    async def run() -> tuple[int, int]:
        await adm.prefetch([preset])
        after_prefetch = len(calls)
        snap = await adm.read(())
        needs = await adm.needs(preset, adm.candidates(preset), snap)
        assert all(n.source == "estimate" and n.bytes > 0 for n in needs.values())
        return after_prefetch, len(calls)

    after_prefetch, after_load = asyncio.run(run())
    assert after_prefetch == 1  # one device: host RAM
    assert after_load == after_prefetch


def test_a_model_that_cannot_be_estimated_is_logged_and_the_rest_go_on(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An estimate that raises stops neither the prefetch nor the others: its load retries it."""
    real = needs_module.estimate_bytes

    def failing(preset: Preset, device: Device, total: int) -> int | None:
        if preset.name == "bad":
            raise OSError(5, "Input/output error")
        return real(preset, device, total)

    monkeypatch.setattr(admission_module, "estimate_bytes", failing)
    bad = Preset(name="bad", file="bad.yaml", backend="llama-server", model=tiny_gguf)
    good = Preset(name="good", file="good.yaml", backend="llama-server", model=tiny_gguf)
    adm = _admission(tmp_path)

    async def run() -> int:
        with structlog.testing.capture_logs() as logs:
            await adm.prefetch([bad, good])
        failures = [e for e in logs if e["event"] == "model.estimate.fail"]
        assert [e["model"] for e in failures] == ["bad"]
        assert "Input/output error" in failures[0]["error"]
        snap = await adm.read(())
        with pytest.raises(OSError, match="Input/output error"):  # not cached: tried again
            await adm.needs(bad, adm.candidates(bad), snap)
        return (await adm.needs(good, adm.candidates(good), snap))["cpu"].bytes

    assert asyncio.run(run()) > 0


def test_a_changed_launch_is_estimated_afresh_even_without_forget(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """The launch is in the cache's key: a reload racing a prefetch cannot keep a stale value."""
    old = Preset(name="m", file="m.yaml", backend="llama-server", model=tiny_gguf)
    new = Preset(
        name="m", file="m.yaml", backend="llama-server", model=tiny_gguf, args=("-c", "65536")
    )
    adm = _admission(tmp_path)

    async def run() -> tuple[int, int]:
        snap = await adm.read(())
        before = (await adm.needs(old, adm.candidates(old), snap))["cpu"].bytes
        after = (await adm.needs(new, adm.candidates(new), snap))["cpu"].bytes
        return before, after

    before, after = asyncio.run(run())
    assert after > before  # a longer context: a larger KV cache


def test_a_model_file_that_appears_later_is_estimated_then(tmp_path: Path, tiny_gguf: Path) -> None:
    """No estimate for a missing file is not remembered: once the file is there, it counts."""
    late = tmp_path / "late.gguf"
    preset = Preset(name="late", file="late.yaml", backend="llama-server", model=late)
    adm = _admission(tmp_path)

    async def run() -> tuple[str, str]:
        await adm.prefetch([preset])
        snap = await adm.read(())
        missing = (await adm.needs(preset, adm.candidates(preset), snap))["cpu"].source
        await asyncio.to_thread(shutil.copyfile, tiny_gguf, late)
        present = (await adm.needs(preset, adm.candidates(preset), snap))["cpu"].source
        return missing, present

    assert asyncio.run(run()) == ("default", "estimate")


def test_a_model_with_no_estimate_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that is there but gives no estimate (not a GGUF, a command's model) is read once."""
    calls = _count_estimates(monkeypatch)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a gguf")
    bad = Preset(name="bad", file="bad.yaml", backend="llama-server", model=junk)
    cmd = Preset(name="cmd", file="cmd.yaml", backend="command", cmd=("true",), model=junk)
    adm = _admission(tmp_path)

    async def run() -> list[str]:
        await adm.prefetch([bad, cmd])
        snap = await adm.read(())
        for _ in range(3):
            for preset in (bad, cmd):
                need = (await adm.needs(preset, adm.candidates(preset), snap))["cpu"]
                # A file llama-server cannot read still needs its bytes; a command, the default.
                assert need.source == ("estimate" if preset is bad else "default")
        return calls

    assert sorted(asyncio.run(run())) == ["bad", "cmd"]
