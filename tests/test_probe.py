"""Device memory probes: host RAM, the fake file, the amdsmi adapter, and fallbacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from conftest import StartDaemon
from daemon import fake_preset, hook_env, wait_for

from swapd.errors import SwapdError
from swapd.probe import FakeFileProbe, HostRamProbe, open_probe
from swapd.probe import _fdinfo as fdinfo
from swapd.probe import _sysfs as sysfs

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB
ALLOCATION = 50 * MIB

# The child allocates; its parent only waits, so a sum that reaches the
# allocation proves that descendants are counted.
TREE_SCRIPT = f"""
import subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c",
     "import sys, time; block = b'x' * {ALLOCATION}; print('ready', flush=True); time.sleep(60)"],
    stdout=subprocess.PIPE, text=True,
)
child.stdout.readline()
print(child.pid, flush=True)
child.wait()
"""


@pytest.fixture
def process_tree() -> Iterator[tuple[int, int]]:
    """Run a parent whose child holds ALLOCATION bytes; yield (parent pid, child pid)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", TREE_SCRIPT],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        yield parent.pid, child_pid
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


@pytest.fixture
def dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def no_gpu_libraries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Make NVML and amdsmi unimportable, sysfs and /proc empty; return the fake sysfs root.

    With an empty /proc, DRM fdinfo finds no GPU clients, whatever this machine runs.
    """
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    root = tmp_path / "drm"
    root.mkdir()
    monkeypatch.setattr(sysfs, "DRM_ROOT", root)
    proc = tmp_path / "proc"
    proc.mkdir()
    monkeypatch.setattr(fdinfo, "PROC_ROOT", proc)
    return root


def write_fake(path: Path, devices: dict[str, Any], processes: dict[int, Any]) -> None:
    """Write a fake probe file in the documented format."""
    body = {"devices": devices, "processes": {str(pid): e for pid, e in processes.items()}}
    path.write_text(json.dumps(body), encoding="utf-8")


def test_host_ram_probe_reads_real_memory() -> None:
    """The host probe reports one "cpu" device with real total and available RAM."""
    probe = HostRamProbe()
    [device] = probe.devices
    assert (device.id, device.kind, device.index, device.visible_env) == ("cpu", "cpu", None, {})
    [reading] = probe.read()
    assert reading.device == "cpu"
    assert reading.total > 0
    assert 0 < reading.free <= reading.total
    assert (reading.per_process_supported, reading.source) == (True, "host")
    assert reading.by_pid == {}


def test_host_ram_probe_sums_rss_over_the_process_tree(
    process_tree: tuple[int, int], dead_pid: int
) -> None:
    """by_pid gives the RSS of an asked pid plus its descendants; gone pids are left out."""
    parent_pid, child_pid = process_tree
    [reading] = HostRamProbe().read([parent_pid, dead_pid])
    assert set(reading.by_pid) == {parent_pid}
    tree = reading.by_pid[parent_pid]
    assert tree >= ALLOCATION
    assert tree >= psutil.Process(child_pid).memory_info().rss


def test_fake_probe_counts_outside_and_live_processes_only(
    tmp_path: Path, sleeper: int, dead_pid: int
) -> None:
    """Used memory is outside plus entries of live pids; a dead pid's entry frees its bytes."""
    path = tmp_path / "probe.json"
    write_fake(
        path,
        {"gpu0": {"total": 10 * GIB, "outside": GIB}},
        {
            sleeper: {"device": "gpu0", "bytes": 2 * GIB, "released_at": None},
            dead_pid: {"device": "gpu0", "bytes": 3 * GIB, "released_at": None},
        },
    )
    probe = FakeFileProbe(path)
    [device] = probe.devices
    assert (device.id, device.kind, device.index) == ("gpu0", "fake", 0)
    assert device.visible_env == {"CUDA_VISIBLE_DEVICES": "0"}
    [reading] = probe.read([sleeper, dead_pid])
    assert (reading.total, reading.free) == (10 * GIB, 7 * GIB)
    assert reading.by_pid == {sleeper: 2 * GIB}
    assert (reading.per_process_supported, reading.source) == (True, "fake")


def test_fake_probe_holds_released_memory_until_released_at(tmp_path: Path, dead_pid: int) -> None:
    """An entry with released_at counts until that time passes, even after the pid died."""
    path = tmp_path / "probe.json"
    write_fake(
        path,
        {"gpu0": {"total": 8 * GIB, "outside": 0}},
        {dead_pid: {"device": "gpu0", "bytes": 5 * GIB, "released_at": 1000.0}},
    )
    now = [999.0]
    probe = FakeFileProbe(path, clock=lambda: now[0])
    [before] = probe.read([dead_pid])
    assert before.free == 3 * GIB
    assert before.by_pid == {dead_pid: 5 * GIB}
    now[0] = 1000.0
    [after] = probe.read([dead_pid])
    assert after.free == 8 * GIB
    assert after.by_pid == {}


def test_fake_probe_sums_descendants_into_the_asked_root(tmp_path: Path, sleeper: int) -> None:
    """Bytes held by a descendant are reported under the ancestor that was asked about."""
    path = tmp_path / "probe.json"
    root = os.getpid()
    write_fake(
        path,
        {"gpu0": {"total": 8 * GIB}},
        {
            root: {"device": "gpu0", "bytes": GIB, "released_at": None},
            sleeper: {"device": "gpu0", "bytes": 2 * GIB, "released_at": None},
        },
    )
    [reading] = FakeFileProbe(path).read([root])
    assert reading.by_pid == {root: 3 * GIB}
    assert reading.free == 5 * GIB


def test_fake_probe_keeps_two_devices_apart(tmp_path: Path, sleeper: int) -> None:
    """Entries count only on their own device, and the file is re-read on every read."""
    path = tmp_path / "probe.json"
    devices = {"gpu0": {"total": 4 * GIB, "outside": 0}, "gpu1": {"total": 6 * GIB, "outside": GIB}}
    write_fake(path, devices, {sleeper: {"device": "gpu1", "bytes": 2 * GIB, "released_at": None}})
    probe = FakeFileProbe(path)
    assert [d.id for d in probe.devices] == ["gpu0", "gpu1"]
    gpu0, gpu1 = probe.read([sleeper])
    assert (gpu0.free, gpu0.by_pid) == (4 * GIB, {})
    assert (gpu1.free, gpu1.by_pid) == (3 * GIB, {sleeper: 2 * GIB})
    write_fake(path, devices, {})
    assert [r.free for r in probe.read([sleeper])] == [4 * GIB, 5 * GIB]


def test_open_probe_fake_file_selects_indices(tmp_path: Path) -> None:
    """With a fake file, a tuple spec keeps the listed devices and warns about missing ones."""
    path = tmp_path / "probe.json"
    write_fake(path, {"gpu0": {"total": GIB}, "gpu1": {"total": GIB}}, {})
    probe, warnings = open_probe((1, 5), fake_file=path)
    assert [d.id for d in probe.devices] == ["gpu1"]
    assert probe.devices[0].visible_env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert len(warnings) == 1
    assert "gpu5 does not exist" in warnings[0]


def test_open_probe_fake_file_missing_or_malformed_raises(tmp_path: Path) -> None:
    """A fake file that is missing or not in the format is an error at open, naming the file."""
    missing = tmp_path / "missing.json"
    with pytest.raises(SwapdError, match=r"missing\.json"):
        open_probe("auto", fake_file=missing)
    bad = tmp_path / "bad.json"
    write_fake(bad, {"gpu0": {"total": -1}}, {})
    with pytest.raises(SwapdError, match=r"devices\.gpu0\.total"):
        open_probe("auto", fake_file=bad)


def test_open_probe_cpu_uses_host_ram() -> None:
    """The "cpu" spec gives the host probe without touching GPU libraries or warning."""
    probe, warnings = open_probe("cpu")
    assert isinstance(probe, HostRamProbe)
    assert warnings == []


def nvml_works() -> bool:
    """Tell whether NVML initialises on this machine."""
    try:
        import pynvml  # optional: only to tell whether a GPU is here
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_open_probe_auto_without_gpu_falls_back_to_host_ram() -> None:
    """On a machine without a usable GPU, "auto" warns why NVML failed and uses host RAM."""
    if nvml_works():
        pytest.skip("NVML works on this machine, so auto does not fall back")
    if sysfs.find_cards():
        pytest.skip("amdgpu sysfs counters exist on this machine")
    probe, warnings = open_probe("auto")
    assert isinstance(probe, HostRamProbe)
    assert len(warnings) == 1
    assert warnings[0].startswith("NVML unavailable (")
    assert warnings[0].endswith("; using host RAM")


@pytest.mark.usefixtures("no_gpu_libraries")
def test_open_probe_warning_names_each_missing_library() -> None:
    """Without NVML, amdsmi or sysfs counters the warning says so and how to install them."""
    probe, warnings = open_probe((0, 1))
    assert isinstance(probe, HostRamProbe)
    assert warnings == [
        (
            "NVML unavailable (nvidia-ml-py not installed: pip install swapd[nvidia]); "
            "amdsmi not installed (pip install swapd[amd]); using host RAM"
        )
    ]


class AmdSmiLibraryError(Exception):
    """Stands in for amdsmi's AmdSmiLibraryException (its base here is the module's)."""


def fake_amdsmi(calls: list[str]) -> types.ModuleType:
    """Build a stand-in amdsmi module with three GPUs answering as different ROCm builds do.

    h0 answers the byte calls and lists processes as dicts; h1 refuses the byte
    calls (MB fallback) and per-process lists; h2 lists old-style handles and
    has no PCI address to match DRM fdinfo by.
    """
    module = types.ModuleType("amdsmi")
    not_supported = AmdSmiLibraryError("AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported")

    def refuse_on_h1(handle: str, value: int) -> int:
        if handle == "h1":
            raise not_supported
        return value

    def process_list(handle: str) -> list[object]:
        if handle == "h1":
            raise not_supported
        if handle == "h2":
            return [object()]
        return [
            {"pid": os.getpid(), "memory_usage": {"vram_mem": GIB}},
            {"pid": 1, "memory_usage": {"vram_mem": "N/A"}},
        ]

    names = {"h0": "Radeon RX 7900 XTX", "h1": "", "h2": "AMD Instinct MI300X"}

    def bdf(handle: str) -> str:
        if handle == "h2":
            raise not_supported
        return {"h0": "0000:03:00.0", "h1": "0000:0C:00.0"}[handle]

    module.__dict__.update(
        AmdSmiException=AmdSmiLibraryError,
        AmdSmiMemoryType=types.SimpleNamespace(VRAM=0),
        amdsmi_init=lambda: calls.append("init"),
        amdsmi_shut_down=lambda: calls.append("shut_down"),
        amdsmi_get_processor_handles=lambda: ["h0", "h1", "h2"],
        amdsmi_get_gpu_asic_info=lambda h: {"market_name": names[h]},
        amdsmi_get_gpu_device_bdf=bdf,
        amdsmi_get_gpu_memory_total=lambda h, _kind: refuse_on_h1(h, 24 * GIB),
        amdsmi_get_gpu_memory_usage=lambda h, _kind: refuse_on_h1(h, 4 * GIB),
        amdsmi_get_gpu_vram_usage=lambda _h: {"vram_total": 16368, "vram_used": 512},
        amdsmi_get_gpu_process_list=process_list,
    )
    return module


@pytest.mark.usefixtures("no_gpu_libraries")
def test_amdsmi_adapter_converts_units_and_degrades_per_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The adapter keeps amdsmi bytes, scales the MB fallback, and on refusal turns to fdinfo.

    Without a PCI address (h2) fdinfo cannot be matched, so only device totals remain.
    """
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(calls))
    probe, warnings = open_probe("auto")
    assert [(d.id, d.kind, d.name) for d in probe.devices] == [
        ("gpu0", "amd", "Radeon RX 7900 XTX"),
        ("gpu1", "amd", "AMD GPU 1"),
        ("gpu2", "amd", "AMD Instinct MI300X"),
    ]
    # ROCr filters to the one GPU first, so HIP must then call it device 0.
    assert probe.devices[1].visible_env == {
        "ROCR_VISIBLE_DEVICES": "1",
        "HIP_VISIBLE_DEVICES": "0",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    assert len(warnings) == 3
    assert warnings[0].startswith("gpu1 (AMD GPU 1): amdsmi does not report per-process VRAM")
    assert "NOT_SUPPORTED" in warnings[0]
    assert warnings[1].startswith("gpu2 (AMD Instinct MI300X): amdsmi does not report")
    assert warnings[2] == (
        "gpu2 (AMD Instinct MI300X): amdsmi gives no PCI address, "
        "so DRM fdinfo cannot stand in for per-process VRAM"
    )
    gpu0, gpu1, gpu2 = probe.read([os.getpid()])
    assert (gpu0.total, gpu0.free) == (24 * GIB, 20 * GIB)
    assert gpu0.by_pid == {os.getpid(): GIB}
    assert (gpu0.per_process_supported, gpu0.source) == (True, "amdsmi")
    assert (gpu1.total, gpu1.free) == (16368 * MIB, (16368 - 512) * MIB)
    # The empty fake /proc holds no DRM client, so fdinfo tells that nothing is used.
    assert (gpu1.by_pid, gpu1.per_process_supported, gpu1.source) == ({}, True, "fdinfo")
    assert (gpu2.by_pid, gpu2.per_process_supported, gpu2.source) == ({}, False, "device-delta")
    probe.close()
    probe.close()
    assert calls == ["init", "shut_down"]


@pytest.mark.usefixtures("no_gpu_libraries")
def test_amdsmi_adapter_drops_missing_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tuple spec keeps the amdsmi GPUs that exist and warns about the rest."""
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi([]))
    probe, warnings = open_probe((0, 7))
    assert [d.id for d in probe.devices] == ["gpu0"]
    assert warnings == ["gpu7 does not exist (amdsmi found gpu0, gpu1, gpu2); dropped"]


def test_sysfs_counters_serve_when_amdsmi_is_missing(no_gpu_libraries: Path) -> None:
    """Without amdsmi, amdgpu sysfs counters (bytes) give device totals, fdinfo per-process use."""
    # As in sysfs, the card's device folder is a link to one named by its PCI address.
    card = no_gpu_libraries.parent / "devices" / "0000:03:00.0"
    card.mkdir(parents=True)
    (no_gpu_libraries / "card1").mkdir()
    (no_gpu_libraries / "card1" / "device").symlink_to(card)
    (card / "mem_info_vram_total").write_text(f"{16 * GIB}\n")
    (card / "mem_info_vram_used").write_text(f"{GIB}\n")
    # Connectors and cards without VRAM counters are not GPUs to place models on.
    (no_gpu_libraries / "card1-DP-1").mkdir()
    (no_gpu_libraries / "card0" / "device").mkdir(parents=True)
    probe, warnings = open_probe("auto")
    assert [(d.id, d.kind, d.index) for d in probe.devices] == [("gpu0", "amd", 0)]
    assert warnings == [
        (
            "amdsmi not installed (pip install swapd[amd]); "
            "reading VRAM from amdgpu sysfs and per-process VRAM from DRM fdinfo"
        )
    ]
    [reading] = probe.read([os.getpid()])
    assert (reading.total, reading.free) == (16 * GIB, 15 * GIB)
    assert (reading.by_pid, reading.per_process_supported, reading.source) == ({}, True, "fdinfo")


class NVMLError(Exception):
    """Stands in for pynvml's NVMLError base."""


class NVMLErrorNotSupported(NVMLError):
    """Stands in for pynvml's NVMLError_NotSupported."""


def fake_pynvml(calls: list[str], sleeper: int) -> types.ModuleType:
    """Build a stand-in pynvml with two GPUs: g0 lists processes, g1 refuses to.

    On g0 the test process has a compute and a graphics context (listed twice
    with the same bytes) and its child ``sleeper`` has a context whose size NVML
    cannot tell (None, as under WDDM).
    """
    module = types.ModuleType("pynvml")

    def compute(handle: str) -> list[object]:
        if handle == "g1":
            raise NVMLErrorNotSupported("Not Supported")
        return [
            types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=GIB),
            types.SimpleNamespace(pid=sleeper, usedGpuMemory=None),
        ]

    def graphics(handle: str) -> list[object]:
        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=GIB)] if handle == "g0" else []

    module.__dict__.update(
        NVMLError=NVMLError,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: f"g{i}",
        nvmlDeviceGetName=lambda h: f"NVIDIA Test {h}",
        nvmlDeviceGetMemoryInfo=lambda _h: types.SimpleNamespace(total=80 * GIB, free=70 * GIB),
        nvmlDeviceGetComputeRunningProcesses=compute,
        nvmlDeviceGetGraphicsRunningProcesses=graphics,
    )
    return module


@pytest.mark.usefixtures("no_gpu_libraries")
def test_nvml_adapter_attributes_processes_and_degrades_per_process(
    monkeypatch: pytest.MonkeyPatch, sleeper: int
) -> None:
    """NVML bytes are summed per process tree once per pid; NotSupported drops per-process."""
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls, sleeper))
    probe, warnings = open_probe("auto")
    assert [(d.id, d.kind, d.index, d.name) for d in probe.devices] == [
        ("gpu0", "nvidia", 0, "NVIDIA Test g0"),
        ("gpu1", "nvidia", 1, "NVIDIA Test g1"),
    ]
    # NVML numbers GPUs by PCI bus; CUDA must be told to do the same.
    assert probe.devices[1].visible_env == {
        "CUDA_VISIBLE_DEVICES": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    assert warnings == [
        (
            "gpu1 (NVIDIA Test g1): NVML does not report per-process memory "
            "(NVMLErrorNotSupported: Not Supported)"
        )
    ]
    gpu0, gpu1 = probe.read([os.getpid()])
    assert (gpu0.total, gpu0.free) == (80 * GIB, 70 * GIB)
    assert (gpu0.by_pid, gpu0.per_process_supported, gpu0.source) == (
        {os.getpid(): GIB},
        True,
        "nvml",
    )
    assert (gpu1.by_pid, gpu1.per_process_supported, gpu1.source) == ({}, False, "device-delta")
    probe.close()
    probe.close()
    assert calls == ["init", "shutdown"]


@pytest.mark.gpu
def test_nvml_probe_matches_nvml(nvml: Any) -> None:
    """On an NVIDIA machine the probe's readings agree with nvmlDeviceGetMemoryInfo."""
    probe, warnings = open_probe("auto")
    try:
        assert probe.devices, warnings
        readings = probe.read([os.getpid()])
        for device, reading in zip(probe.devices, readings, strict=True):
            assert device.kind == "nvidia"
            assert device.index is not None
            assert device.visible_env["CUDA_VISIBLE_DEVICES"] == str(device.index)
            assert reading.total > 0
            assert 0 <= reading.free <= reading.total
            # This test holds no CUDA context, so it uses nothing on the GPU.
            assert os.getpid() not in reading.by_pid
            memory = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(device.index))
            assert reading.total == memory.total
            # Free drifts as other processes run; a few hundred MiB bounds it.
            assert abs(reading.free - memory.free) < 256 * MIB
    finally:
        probe.close()


# A stand-in pynvml (loaded into the daemon through sitecustomize): one GPU whose totals NVML
# reports but whose per-process lists it does not (NotSupported, as on some boards or in
# containers), so swapd has device totals only: the "device-delta" source.
_NVML_WITHOUT_PROCESS_LISTS = """
import sys, types

class NVMLError(Exception):
    pass

def _not_supported(_handle):
    raise NVMLError("Not Supported")

GIB = 1024**3
module = types.ModuleType("pynvml")
module.__dict__.update(
    NVMLError=NVMLError,
    nvmlInit=lambda: None,
    nvmlShutdown=lambda: None,
    nvmlDeviceGetCount=lambda: 1,
    nvmlDeviceGetHandleByIndex=lambda i: f"g{i}",
    nvmlDeviceGetName=lambda _h: "Stand-in GPU",
    nvmlDeviceGetMemoryInfo=lambda _h: types.SimpleNamespace(
        total=80 * GIB, free=70 * GIB, used=10 * GIB
    ),
    nvmlDeviceGetComputeRunningProcesses=_not_supported,
    nvmlDeviceGetGraphicsRunningProcesses=_not_supported,
)
sys.modules["pynvml"] = module
"""


def test_status_names_device_delta_as_the_memory_source(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """With device totals only (no per-process figures), status says ``device-delta``.

    ``memory.source`` stayed null: it was set only from a figure for the backend's own pid.
    """
    d = start_daemon(
        {"a": fake_preset("A", memory="1GiB")},
        {"devices": "auto"},
        env=hook_env(tmp_path / "hook", _NVML_WITHOUT_PROCESS_LISTS),
    )
    assert [e["detail"] for e in d.events("probe.fallback")], "the stand-in NVML was not used"
    status, _ = d.chat("a")
    assert status == 200
    wait_for(lambda: d.model("a")["memory"]["source"] is not None)  # measured 1 s after ready
    model = d.model("a")
    assert model["device"] == "gpu0", model
    assert model["memory"]["source"] == "device-delta", model["memory"]
