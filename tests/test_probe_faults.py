"""Audit of the memory probes: readings that go wrong on real machines, with stand-in drivers.

Each test stands in only for GPU hardware (pynvml, amdsmi, sysfs, /proc's DRM fdinfo) and
states what a correct probe reports there.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from test_nvml_pid_namespace import plan_beside_one_resident

from swapd import policy
from swapd.probe import _fdinfo
from swapd.probe import _sysfs as sysfs
from swapd.probe._amdsmi import open_amdsmi
from swapd.probe._nvml import NvmlProbe, open_nvml
from swapd.probe._open import open_probe

GIB = 1024**3
HOST_PID = 4_194_000  # above any pid_max here: no such process in this namespace
GPU_A = "0000:03:00.0"


@pytest.fixture
def no_other_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No amdsmi, no amdgpu sysfs cards and an empty /proc for fdinfo; return that /proc."""
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    drm = tmp_path / "drm"
    drm.mkdir()
    monkeypatch.setattr(sysfs, "DRM_ROOT", drm)
    proc = tmp_path / "proc"
    proc.mkdir()
    monkeypatch.setattr(_fdinfo, "PROC_ROOT", proc)
    return proc


class NVMLError(Exception):
    """Stands in for pynvml's NVMLError base."""


class NVMLErrorNoPermission(NVMLError):
    """Stands in for pynvml's NVMLError_NoPermission."""


def fake_pynvml(
    processes: list[types.SimpleNamespace], *, count: int = 1, refused: int | None = None
) -> types.ModuleType:
    """A stand-in pynvml: ``count`` 80 GiB GPUs; GPU ``refused`` answers NO_PERMISSION.

    NVML's count includes GPUs that the caller may not talk to (its docs: "returns count
    of all devices in the system even if nvmlDeviceGetHandleByIndex_v2 returns
    NVML_ERROR_NO_PERMISSION for such device"), as under a unit or container that is
    allowed only some of the /dev/nvidiaN nodes.
    """
    module = types.ModuleType("pynvml")

    def handle(index: int) -> str:
        if index == refused:
            raise NVMLErrorNoPermission("Insufficient Permissions")
        return f"g{index}"

    module.__dict__.update(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: count,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: f"NVIDIA H100 {h}",
        nvmlDeviceGetMemoryInfo=lambda _h: types.SimpleNamespace(total=80 * GIB, free=40 * GIB),
        nvmlDeviceGetComputeRunningProcesses=lambda _h: processes,
        nvmlDeviceGetGraphicsRunningProcesses=lambda _h: [],
    )
    return module


@pytest.mark.usefixtures("no_other_gpus")
def test_nvml_gpu_without_permission_drops_that_gpu_not_all_of_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One GPU that NVML may not open is dropped with a warning; the others stay in use.

    The probe drops a GPU whose first reading fails, yet a handle that fails takes
    NVML down as a whole and swapd falls back to host RAM on a machine full of GPUs.
    """
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], count=2, refused=1))
    probe, warnings = open_probe("auto")
    assert isinstance(probe, NvmlProbe), warnings
    assert [d.id for d in probe.devices] == ["gpu0"]
    assert any("gpu1" in warning for warning in warnings), warnings


def test_nvml_one_unknown_pid_keeps_the_figures_of_our_own_backend(
    monkeypatch: pytest.MonkeyPatch, sleeper: int
) -> None:
    """NVML listing our backend proves it shares our pid namespace: keep its figure.

    Another listed pid may be gone by the time it is checked (a job that just exited)
    or hidden from swapd (/proc mounted with hidepid=, systemd ProtectProc=): psutil
    then says it does not exist. That must not throw away every per-process figure of
    the GPU, which makes admission count each model at its grant, not its measure.
    """
    listed = [
        types.SimpleNamespace(pid=sleeper, usedGpuMemory=30 * GIB),
        types.SimpleNamespace(pid=HOST_PID, usedGpuMemory=10 * GIB),
    ]
    assert not Path(f"/proc/{HOST_PID}").exists()
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(listed))
    [reading] = open_nvml(None, []).read([sleeper])
    assert (reading.per_process_supported, reading.source) == (True, "nvml"), reading
    assert reading.by_pid == {sleeper: 30 * GIB}


class AmdSmiLibraryError(Exception):
    """Stands in for amdsmi's AmdSmiLibraryException."""


def test_amdsmi_host_pids_with_blind_fdinfo_do_not_claim_zero(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sleeper: int
) -> None:
    """amdsmi's list names no asked tree and fdinfo cannot tell: device totals, not zeros.

    KFD names each process by its pid in the host's namespace, so inside the DaemonSet
    (its own pid namespace) amdsmi lists pids that match none of swapd's children, as
    NVML does. On a kernel whose fdinfo has no VRAM keys the reading then claims that
    the backend uses 0 bytes (source "amdsmi"), so admission counts its memory twice:
    once as used on the device and once as the backend's grant. The README: where amdsmi
    has no per-process figure and fdinfo fails, "only device totals are used".
    """
    proc = tmp_path / "proc"
    (proc / str(sleeper) / "fd").mkdir(parents=True)
    (proc / str(sleeper) / "fdinfo").mkdir()
    (proc / str(sleeper) / "fd" / "9").symlink_to("/dev/dri/renderD128")
    # An amdgpu client without any VRAM key, as older kernels print it.
    (proc / str(sleeper) / "fdinfo" / "9").write_text(
        f"drm-driver:\tamdgpu\ndrm-pdev:\t{GPU_A}\ndrm-client-id:\t5\ndrm-memory-gtt:\t4 KiB\n",
        encoding="utf-8",
    )
    module = types.ModuleType("amdsmi")
    module.__dict__.update(
        AmdSmiException=AmdSmiLibraryError,
        AmdSmiMemoryType=types.SimpleNamespace(VRAM=0),
        amdsmi_init=lambda: None,
        amdsmi_shut_down=lambda: None,
        amdsmi_get_processor_handles=lambda: ["h0"],
        amdsmi_get_gpu_asic_info=lambda _h: {"market_name": "AMD Instinct MI300X"},
        amdsmi_get_gpu_device_bdf=lambda _h: GPU_A,
        # The backend (container pid `sleeper`, host pid HOST_PID) holds 40 GiB of 192.
        amdsmi_get_gpu_memory_total=lambda _h, _kind: 192 * GIB,
        amdsmi_get_gpu_memory_usage=lambda _h, _kind: 40 * GIB,
        amdsmi_get_gpu_process_list=lambda _h: [
            {"pid": HOST_PID, "memory_usage": {"vram_mem": 40 * GIB}}
        ],
    )
    monkeypatch.setitem(sys.modules, "amdsmi", module)
    [reading] = open_amdsmi(None, [], proc).read([sleeper])
    # 150 GiB fits in the 152 GiB that are really free, beside the resident.
    plan = plan_beside_one_resident(reading, sleeper, 150 * GIB)
    assert plan == policy.Admit("gpu0"), (reading, plan)
    assert (reading.source, reading.per_process_supported) == ("device-delta", False)


def test_a_gpu_lost_after_start_is_left_out_and_the_others_still_read(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GPU whose memory read fails (fallen off the bus) is left out of the readings.

    Each read raised for the whole probe: every load on every healthy GPU answered 500
    until swapd restarted. The failure is logged once, and the return too; with no GPU
    left to read, the reading is empty (a load then gets 503, as on a lost GPU of several).
    """
    lost: set[str] = set()
    module = fake_pynvml([], count=2)

    def memory(handle: str) -> types.SimpleNamespace:
        if handle in lost:
            raise NVMLError("GPU is lost")
        return types.SimpleNamespace(total=80 * GIB, free=40 * GIB)

    module.__dict__["nvmlDeviceGetMemoryInfo"] = memory
    monkeypatch.setitem(sys.modules, "pynvml", module)
    probe = open_nvml(None, [])
    lost.add("g1")
    assert [r.device for r in probe.read()] == ["gpu0"]
    assert [r.device for r in probe.read()] == ["gpu0"]
    lost.clear()
    assert [r.device for r in probe.read()] == ["gpu0", "gpu1"]
    out = capsys.readouterr().out
    assert out.count("probe.device.fail") == 1, out
    assert "GPU is lost" in out
    assert out.count("probe.device.back") == 1, out
    lost.update({"g0", "g1"})
    assert probe.read() == []
