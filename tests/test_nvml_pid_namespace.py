"""NVML lists host pids; in a container's pid namespace they match nothing here.

The driver does not know pid namespaces (NVIDIA/nvidia-docker#1483), so inside the shipped
Kubernetes DaemonSet (its own pod pid namespace) every listed pid is a host pid. A reading
must then not claim per-process figures: a claimed 0 makes each resident count twice.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from swapd import policy
from swapd.probe import Reading
from swapd.probe._nvml import open_nvml

GIB = 1024**3


def plan_beside_one_resident(reading: Reading, pid: int, need: int) -> policy.Plan:
    """The plan for ``need`` on gpu0 beside ``pid``, a 40 GiB model counted as swapd does."""
    known = reading.per_process_supported
    measured = reading.by_pid.get(pid, 0) if known else None  # as Manager._resident does
    resident = policy.Resident(
        crf=1.0,
        name="a",
        device="gpu0",
        usage=policy.counted_usage(measured, 40 * GIB),
        last_used=0.0,
        busy=False,
        pinned=False,
        measured=measured,
    )
    return policy.best_plan(
        {"gpu0": need},
        [policy.DeviceView("gpu0", reading.total, reading.free)],
        [resident],
        policy.Limits(),
    )


HOST_PID = 4_194_000  # above any pid_max here: no such process in this namespace


class NVMLError(Exception):
    """Stands in for pynvml's NVMLError."""


@pytest.fixture
def backend(sleeper: int) -> int:
    """A live process standing in for a backend whose pid NVML cannot report."""
    return sleeper


def test_host_pids_from_nvml_do_not_claim_per_process_zero(
    monkeypatch: pytest.MonkeyPatch, backend: int
) -> None:
    """The listed pids are not ours: per-process figures give way to the device delta."""
    assert not Path(f"/proc/{HOST_PID}").exists()
    module = types.ModuleType("pynvml")
    module.__dict__.update(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"g{i}",
        nvmlDeviceGetName=lambda _h: "NVIDIA H100",
        # The backend (container pid `backend`, host pid HOST_PID) holds 40 GiB of 80.
        nvmlDeviceGetMemoryInfo=lambda _h: types.SimpleNamespace(total=80 * GIB, free=40 * GIB),
        nvmlDeviceGetComputeRunningProcesses=lambda _h: [
            types.SimpleNamespace(pid=HOST_PID, usedGpuMemory=40 * GIB)
        ],
        nvmlDeviceGetGraphicsRunningProcesses=lambda _h: [],
    )
    monkeypatch.setitem(sys.modules, "pynvml", module)
    [reading] = open_nvml(None, []).read([backend])
    # A 30 GiB model fits in the 40 GiB that are really free, beside the resident.
    plan = plan_beside_one_resident(reading, backend, 30 * GIB)
    assert plan == policy.Admit("gpu0"), (reading, plan)
