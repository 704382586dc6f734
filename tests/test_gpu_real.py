"""Admission against real VRAM on an NVIDIA GPU, read through NVML (skips without one).

The backends are the fake upstream holding real device memory through the CUDA
driver API (``--cuda-bytes``: a context and an allocation, no toolkit needed);
an outside process holds more the same way. The fake vLLM gives that allocation
back while asleep and keeps its context, as vLLM does. swapd's probe, admission
and footprint measurement are the real ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import StartDaemon
from daemon import FAKE_UPSTREAM, fake_preset, wait_for
from fakes.cuda_hold import nvml_free, nvml_used_by
from test_tiers import vllm_preset

GIB = 1024**3
MIB = 1024**2
HOLD = 3 * GIB  # per backend: two of them and their contexts exceed the 5 GiB budget


@contextlib.contextmanager
def _holding(nbytes: int) -> Iterator[subprocess.Popen[str]]:
    """A process outside swapd holding ``nbytes`` of VRAM on GPU 0 until the block ends."""
    with subprocess.Popen(
        [sys.executable, str(FAKE_UPSTREAM.parent / "cuda_hold.py"), str(nbytes)],
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "held"
            yield holder
        finally:
            holder.terminate()
            holder.wait(timeout=30)


@pytest.fixture
def cuda_driver() -> None:
    """Skip unless the CUDA driver library loads (the backends hold VRAM through it)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        pytest.skip(f"no CUDA driver library: {error}")


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_driver")
def test_admission_against_real_vram(nvml: Any, start_daemon: StartDaemon) -> None:
    """Measured footprint = NVML's; a second model that does not fit evicts the first."""
    presets = {
        n: fake_preset(n.upper(), "--cuda-bytes", str(HOLD), memory=HOLD, devices=[0])
        for n in ("a", "b")
    }
    d = start_daemon(presets, {"devices": [0], "budget": "5GiB", "reserve": 0})
    assert d.chat("a")[0] == 200
    a = d.model("a")
    wait_for(lambda: d.model("a")["memory"]["measured"] is not None, timeout=30)
    measured = d.model("a")["memory"]["measured"]
    nvml_says = nvml_used_by(nvml, a["pid"])
    assert nvml_says >= HOLD
    assert abs(measured - nvml_says) < 64 * MIB, (measured, nvml_says)
    assert d.chat("b")[0] == 200
    assert [e["victims"] for e in d.events("model.evict")] == [["a"]]
    assert d.model("a")["state"] == "stopped"
    wait_for(lambda: nvml_used_by(nvml, a["pid"]) == 0, timeout=30)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_driver")
def test_the_least_recently_used_model_leaves_real_vram(
    nvml: Any, start_daemon: StartDaemon
) -> None:
    """Two models fit the budget and three do not: after a, b, a the third one evicts b."""
    hold = 2 * GIB
    presets = {
        n: fake_preset(n.upper(), "--cuda-bytes", str(hold), memory=hold, devices=[0])
        for n in ("a", "b", "c")
    }
    # Two holders and their CUDA contexts fit; a third holder's 2 GiB on top does not,
    # for any context size from 0.25 to 1.25 GiB.
    d = start_daemon(presets, {"devices": [0], "budget": "6656MiB", "reserve": 0})
    for name in ("a", "b", "a"):
        assert d.chat(name)[0] == 200
        wait_for(lambda name=name: d.model(name)["memory"]["measured"] is not None, timeout=30)
    pids = {n: d.model(n)["pid"] for n in ("a", "b")}
    assert d.chat("c")[0] == 200
    assert [e["victims"] for e in d.events("model.evict")] == [["b"]]
    assert [d.model(n)["state"] for n in ("a", "b", "c")] == ["ready", "stopped", "ready"]
    wait_for(lambda: nvml_used_by(nvml, pids["b"]) == 0, timeout=30)
    assert nvml_used_by(nvml, pids["a"]) >= hold


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_driver")
def test_real_vram_held_outside_swapd_is_respected(nvml: Any, start_daemon: StartDaemon) -> None:
    """With all but 1 GiB taken by another process, a 3 GiB model gets 503, then fits."""
    d = start_daemon(
        {"a": fake_preset("A", "--cuda-bytes", str(HOLD), memory=HOLD, devices=[0])},
        {"devices": [0], "reserve": 0},
    )
    with _holding(nvml_free(nvml) - GIB):
        status, body = d.chat("a")
        assert (status, body["error"]["code"]) == (503, "insufficient_memory")
        assert "used outside swapd" in body["error"]["message"]
    wait_for(lambda: nvml_free(nvml) > HOLD + GIB, timeout=30)
    wait_for(lambda: d.chat("a")[0] == 200, timeout=30)


def _context_bytes(nvml: Any) -> int:
    """What one CUDA context costs on GPU 0: NVML's figure for a process holding 2 MiB, less 2."""
    held = 2 * MIB
    with _holding(held) as holder:
        return nvml_used_by(nvml, holder.pid) - held


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_driver")
def test_a_sleeping_vllm_keeps_only_its_context_and_admission_counts_it(
    nvml: Any, start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """Issue 8's ram tier on real VRAM: sleep gives the weights back, the context is counted.

    Three fake vLLMs (``sleep: auto``, so level 1 on a GPU) hold HOLD while awake and only
    their CUDA context asleep. The budget fits one awake and one asleep, not one awake and
    two asleep: b's load puts a to sleep (same pid, NVML shows its context only); c's load
    puts b to sleep and stops a, because the contexts the sleepers keep are counted; a
    request for b wakes it without a new process and puts c to sleep.
    """
    context = _context_bytes(nvml)
    need = HOLD + context
    budget = need + context * 3 // 2
    presets = {
        n: vllm_preset(vllm_binary, tmp_path / n, sleep="auto", memory=need, devices=[0])
        for n in ("a", "b", "c")
    }
    d = start_daemon(
        presets,
        {"devices": [0], "budget": budget, "reserve": 0},
        env={"FAKE_VLLM_UPSTREAM_ARGS": f"--cuda-bytes {HOLD}"},
    )
    assert d.chat("a")[0] == 200
    a = d.model("a")
    assert a["sleep"]["level"] == 1
    assert all("--enable-sleep-mode" in e["argv"] for e in d.events("backend.spawn"))
    assert nvml_used_by(nvml, a["pid"]) >= HOLD

    assert d.chat("b")[0] == 200
    wait_for(lambda: d.model("a")["state"] == "asleep", timeout=30)
    assert (d.model("a")["tier"], d.model("a")["pid"]) == ("ram", a["pid"])
    kept = nvml_used_by(nvml, a["pid"])
    assert 0 < kept < context + 64 * MIB, (kept, context)

    assert d.chat("c")[0] == 200
    states = {n: (d.model(n)["state"], d.model(n)["tier"]) for n in ("a", "b", "c")}
    assert states == {"a": ("stopped", "disk"), "b": ("asleep", "ram"), "c": ("ready", "device")}
    wait_for(lambda: nvml_used_by(nvml, a["pid"]) == 0, timeout=30)
    b_pid, c_pid = d.model("b")["pid"], d.model("c")["pid"]
    assert nvml_used_by(nvml, b_pid) + nvml_used_by(nvml, c_pid) <= budget

    status, body = d.chat("b", "again")
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "b: again"
    assert (d.model("b")["state"], d.model("b")["pid"]) == ("ready", b_pid)
    assert d.model("c")["state"] == "asleep"
    assert len(d.events("backend.spawn")) == 3
    assert nvml_used_by(nvml, b_pid) >= HOLD
    assert nvml_used_by(nvml, b_pid) + nvml_used_by(nvml, c_pid) <= budget
