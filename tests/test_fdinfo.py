"""Per-process AMD VRAM from DRM fdinfo, read from a fake /proc tree that each test writes.

The fake tree has the shape the kernel gives: ``PID/fd/N`` links (to
``/dev/dri/renderD128`` for DRM files, elsewhere for the rest) and
``PID/fdinfo/N`` records. The links dangle here, as they may: the reader only
reads where they point. GPU hardware is the only thing stood in for: the amdsmi
module, the sysfs folder and /proc.
"""

from __future__ import annotations

import os
import sys
import types
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from swapd.probe import _fdinfo
from swapd.probe._amdsmi import open_amdsmi
from swapd.probe._drm import DrmVram
from swapd.probe._fdinfo import scan_vram
from swapd.probe._sysfs import open_amd_sysfs

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
GPU_A = "0000:03:00.0"
GPU_B = "0000:0c:00.0"


PLAIN = "pos:\t0\nflags:\t02100002\nmnt_id:\t26\nino:\t1066\n"


def record(pdev: str, client: int, *memory: str, driver: str = "amdgpu") -> str:
    """A DRM fdinfo record with the given memory lines, laid out as the kernel prints it."""
    head = f"drm-driver:\t{driver}\ndrm-pdev:\t{pdev}\ndrm-client-id:\t{client}\npasid:\t32771\n"
    lines = "".join(f"{line}\n" for line in memory)
    return f"{PLAIN}{head}{lines}drm-engine-gfx:\t1234 ns\n"


def old_style(pdev: str, client: int, vram_kib: int, driver: str = "amdgpu") -> str:
    """An amdgpu record as kernels before the generic keys print it."""
    return record(
        pdev,
        client,
        f"drm-memory-vram:\t{vram_kib} KiB",
        "drm-memory-gtt:\t2048 KiB",
        "drm-memory-cpu:\t0 KiB",
        "amd-memory-visible-vram:\t0 KiB",
        driver=driver,
    )


def new_style(pdev: str, client: int, resident: str, total: str) -> str:
    """An amdgpu record with the generic keys; resident and total are written as given."""
    return record(
        pdev,
        client,
        "drm-total-gtt:\t9 MiB",
        "drm-resident-gtt:\t9 MiB",
        f"drm-total-vram:\t{total}",
        "drm-shared-vram:\t0",
        f"drm-resident-vram:\t{resident}",
    )


def stat_line(pid: int, state: str, vsize: int) -> str:
    """A ``/proc/PID/stat`` line; a name with spaces and parens, as a process may choose."""
    # Fields 4-22: ppid to flags, page faults and times, priority to starttime.
    middle = ["1", "1", "1", "0", "-1", "4194560", *["0"] * 8, "20", "0", "1", "0", "100"]
    return f"{pid} (vllm (worker) 1) {state} {' '.join(middle)} {vsize} 0\n"


def add_stat(proc: Path, pid: int, state: str = "S", vsize: int = 9 * GIB) -> None:
    """Give ``pid`` a ``stat`` file, that of a running process unless it has one already."""
    stat = proc / str(pid) / "stat"
    if not stat.exists():
        stat.parent.mkdir(parents=True, exist_ok=True)
        stat.write_text(stat_line(pid, state, vsize), encoding="utf-8")


def add_fd(proc: Path, pid: int, fd: int, target: str, record: str | None = None) -> Path:
    """Add fd ``fd`` of ``pid`` linking to ``target`` with ``record`` as its fdinfo.

    A record of None writes none, as when the fd closes between listing and
    reading. The process gets the ``stat`` of a running one unless it has a
    ``stat`` already. Returns the fdinfo path.
    """
    (proc / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "fdinfo").mkdir(parents=True, exist_ok=True)
    add_stat(proc, pid)
    (proc / str(pid) / "fd" / str(fd)).symlink_to(target)
    info = proc / str(pid) / "fdinfo" / str(fd)
    if record is not None:
        info.write_text(record, encoding="utf-8")
    return info


def add_plain_fds(proc: Path, pid: int) -> None:
    """Give ``pid`` the non-DRM fds a backend has: stdio, sockets, a model file, /dev/kfd.

    Their fdinfo entries are folders, which cannot be read as files: a reader
    that opened them would report an unreadable entry.
    """
    for fd, target in enumerate(
        [
            "/dev/null",
            "pipe:[1]",
            "socket:[2]",
            "/models/m.gguf",
            "/dev/kfd",
            "anon_inode:[eventfd]",
        ]
    ):
        add_fd(proc, pid, fd, target).mkdir()


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """An empty fake /proc."""
    root = tmp_path / "proc"
    root.mkdir()
    return root


def test_scan_reads_both_key_styles_and_prefers_resident(proc: Path) -> None:
    """drm-memory-vram (old kernels) and drm-resident-vram count; resident beats total."""
    add_plain_fds(proc, 100)
    add_fd(proc, 100, 20, "/dev/dri/renderD128", old_style(GPU_A, 1, 1024))
    add_plain_fds(proc, 200)
    add_fd(proc, 200, 20, "/dev/dri/renderD128", new_style(GPU_A, 2, "2 MiB", "3 MiB"))
    # A record with only the total, in bytes without a unit, counts the total.
    add_fd(proc, 300, 7, "/dev/dri/card0", record(GPU_A, 3, "drm-total-vram:\t4096"))
    scan = scan_vram({100: frozenset({100}), 200: frozenset({200}), 300: frozenset({300})}, proc)
    assert scan.vram == {GPU_A: {100: MIB, 200: 2 * MIB, 300: 4096}}
    assert (scan.blind, scan.other_drivers, scan.unreadable) == (frozenset(), frozenset(), None)


def test_scan_counts_a_shared_client_once_per_tree(proc: Path) -> None:
    """Fds of one client count once per tree, however many processes share them.

    Other clients add up, and a client passed to another tree counts in that tree too.
    """
    add_fd(proc, 100, 5, "/dev/dri/renderD128", old_style(GPU_A, 7, 1024))
    add_fd(proc, 100, 6, "/dev/dri/renderD128", old_style(GPU_A, 7, 1024))
    # The child inherited fd 5 across fork: the same client.
    add_fd(proc, 101, 5, "/dev/dri/renderD128", old_style(GPU_A, 7, 1024))
    add_fd(proc, 101, 9, "/dev/dri/renderD128", old_style(GPU_A, 8, 512))
    add_fd(proc, 300, 4, "/dev/dri/renderD128", old_style(GPU_A, 7, 1024))
    scan = scan_vram({100: frozenset({100, 101}), 300: frozenset({300})}, proc)
    assert scan.vram == {GPU_A: {100: 1536 * KIB, 300: MIB}}


def test_scan_keeps_two_gpus_apart(proc: Path) -> None:
    """Each GPU's clients count on that GPU only, even when their client ids coincide."""
    add_fd(proc, 100, 5, "/dev/dri/renderD128", new_style(GPU_A, 4, "1 MiB", "1 MiB"))
    add_fd(proc, 100, 6, "/dev/dri/renderD129", new_style(GPU_B.upper(), 4, "5 MiB", "5 MiB"))
    add_fd(proc, 200, 5, "/dev/dri/renderD129", new_style(GPU_B, 9, "7 MiB", "7 MiB"))
    scan = scan_vram({100: frozenset({100}), 200: frozenset({200})}, proc)
    assert scan.vram == {GPU_A: {100: MIB}, GPU_B: {100: 5 * MIB, 200: 7 * MIB}}


def test_scan_skips_other_drivers_and_never_reads_non_drm_fdinfo(proc: Path) -> None:
    """i915 records are named but not counted; fds outside /dev/dri are not read at all."""
    add_plain_fds(proc, 100)
    add_fd(proc, 100, 30, "/dev/dri/renderD129", old_style("0000:00:02.0", 1, 4096, "i915"))
    scan = scan_vram({100: frozenset({100})}, proc)
    assert scan.vram == {}
    assert scan.other_drivers == {"i915"}
    assert scan.unreadable is None


def test_scan_skips_a_vanished_pid_and_a_closed_fd(proc: Path) -> None:
    """A pid with no /proc entry and an fd whose fdinfo is gone hold nothing: no error."""
    add_fd(proc, 100, 5, "/dev/dri/renderD128", old_style(GPU_A, 1, 1024))
    add_fd(proc, 100, 6, "/dev/dri/renderD128", None)
    scan = scan_vram({100: frozenset({100, 4_000_001}), 4_000_002: frozenset({4_000_002})}, proc)
    assert scan.vram == {GPU_A: {100: MIB}}
    assert scan.unreadable is None


@pytest.mark.parametrize("breakage", ["fdinfo is a folder", "fd is a file"])
def test_scan_records_an_entry_it_cannot_read(proc: Path, breakage: str) -> None:
    """An entry that exists but cannot be read (like EACCES) is recorded with its path."""
    add_fd(proc, 100, 5, "/dev/dri/renderD128", old_style(GPU_A, 1, 1024))
    if breakage == "fdinfo is a folder":
        add_fd(proc, 200, 5, "/dev/dri/renderD128").mkdir()
        where = f"{proc}/200/fdinfo/5"
    else:
        add_stat(proc, 200)
        (proc / "200" / "fd").write_text("", encoding="utf-8")
        where = f"{proc}/200/fd"
    scan = scan_vram({100: frozenset({100}), 200: frozenset({200})}, proc)
    assert scan.unreadable is not None
    assert scan.unreadable.startswith(f"{where}: ")


@pytest.mark.parametrize(
    "state",
    ["Z", "R", None],
    ids=["zombie", "exiting, memory released", "reaped before its stat was read"],
)
def test_scan_skips_a_process_that_has_let_go_of_its_memory(proc: Path, state: str | None) -> None:
    """Entries of a process without an address space are skipped, not reported unreadable.

    The kernel makes such a process's fd folders root's (a zombie's, or one that is
    exiting), so a reader that is not root gets EACCES there: the process holds no
    files, or is closing them.
    """
    add_fd(proc, 100, 5, "/dev/dri/renderD128", old_style(GPU_A, 1, 1024))
    (proc / "101").mkdir()
    if state is not None:
        add_stat(proc, 101, state, vsize=0)
    (proc / "101" / "fd").write_text("", encoding="utf-8")  # cannot be listed
    # A running child whose fdinfo cannot be read is still reported.
    add_fd(proc, 102, 5, "/dev/dri/renderD128").mkdir()
    assert scan_vram({100: frozenset({100, 101})}, proc) == _fdinfo.DrmScan(
        vram={GPU_A: {100: MIB}}, blind=frozenset(), other_drivers=frozenset(), unreadable=None
    )
    unreadable = scan_vram({100: frozenset({100, 101, 102})}, proc).unreadable
    assert unreadable is not None
    assert unreadable.startswith(f"{proc}/102/fdinfo/5: ")


def test_unreadable_entries_fall_back_to_device_totals_and_log_once(proc: Path) -> None:
    """An unreadable entry makes fdinfo answer None (device totals) and logs probe.fallback once."""
    add_fd(proc, 100, 5, "/dev/dri/renderD128", old_style(GPU_A, 1, 1024))
    add_fd(proc, 200, 5, "/dev/dri/renderD128").mkdir()
    drm = DrmVram(proc)
    trees = {100: frozenset({100}), 200: frozenset({200})}
    with capture_logs() as logs:
        assert drm.for_trees(trees).on(GPU_A) is None
        assert drm.for_trees(trees).on(GPU_A) is None
    assert [entry["event"] for entry in logs] == ["probe.fallback"]
    assert "DRM fdinfo cannot be read" in logs[0]["detail"]
    assert f"{proc}/200/fdinfo/5" in logs[0]["detail"]


@pytest.mark.parametrize(
    "record",
    [
        record(GPU_A, 1, "drm-memory-gtt:\t2048 KiB"),
        PLAIN,
    ],
    ids=["amdgpu without VRAM keys", "no drm keys at all"],
)
def test_kernel_without_vram_keys_falls_back_and_logs_once(proc: Path, record: str) -> None:
    """A DRM file that reports no VRAM figure means device totals, logged once per probe."""
    add_fd(proc, 100, 5, "/dev/dri/renderD128", record)
    drm = DrmVram(proc)
    with capture_logs() as logs:
        assert drm.for_trees({100: frozenset({100})}).on(GPU_A) is None
        assert drm.for_trees({100: frozenset({100})}).on(GPU_A) is None
    assert [entry["event"] for entry in logs] == ["probe.fallback"]
    assert "no VRAM per client" in logs[0]["detail"]


def test_other_drivers_are_logged_once_and_leave_amdgpu_figures(proc: Path) -> None:
    """A tree with an i915 client still gets its amdgpu figure; the i915 one is named once."""
    add_fd(proc, 100, 5, "/dev/dri/renderD128", old_style(GPU_A, 1, 1024))
    add_fd(proc, 100, 6, "/dev/dri/renderD129", old_style(GPU_B, 2, 99, "i915"))
    drm = DrmVram(proc)
    with capture_logs() as logs:
        assert drm.for_trees({100: frozenset({100})}).on(GPU_A) == {100: MIB}
        assert drm.for_trees({100: frozenset({100})}).on(GPU_B) == {}
    assert [entry["detail"] for entry in logs] == [
        "DRM fdinfo: i915 clients are not counted, only amdgpu"
    ]


# ---------------------------------------------------------------- through the AMD probes


class AmdSmiLibraryError(Exception):
    """Stands in for amdsmi's AmdSmiLibraryException."""


def fake_amdsmi(process_list: Callable[[str], list[object]]) -> types.ModuleType:
    """A stand-in amdsmi with two RX 7900 XTX cards, h0 at GPU_A and h1 at GPU_B."""
    module = types.ModuleType("amdsmi")
    module.__dict__.update(
        AmdSmiException=AmdSmiLibraryError,
        AmdSmiMemoryType=types.SimpleNamespace(VRAM=0),
        amdsmi_init=lambda: None,
        amdsmi_shut_down=lambda: None,
        amdsmi_get_processor_handles=lambda: ["h0", "h1"],
        amdsmi_get_gpu_asic_info=lambda _h: {"market_name": "Radeon RX 7900 XTX"},
        amdsmi_get_gpu_device_bdf=lambda h: {"h0": GPU_A, "h1": GPU_B.upper()}[h],
        amdsmi_get_gpu_memory_total=lambda _h, _kind: 24 * GIB,
        amdsmi_get_gpu_memory_usage=lambda _h, _kind: 4 * GIB,
        amdsmi_get_gpu_process_list=process_list,
    )
    return module


@pytest.fixture
def child(sleeper: int) -> int:
    """A child of the test process, so that the test process's tree has two pids."""
    return sleeper


def backend_tree(proc: Path, child: int) -> int:
    """Fake /proc for the test process and its child sharing one client on GPU_B; the root pid.

    The tree holds 3 GiB on GPU_B (resident) and nothing on GPU_A.
    """
    root = os.getpid()
    add_plain_fds(proc, root)
    add_fd(proc, root, 10, "/dev/dri/renderD129", new_style(GPU_B, 5, "3 GiB", "4 GiB"))
    add_fd(proc, child, 3, "/dev/dri/renderD129", new_style(GPU_B, 5, "3 GiB", "4 GiB"))
    return root


def refuse(_handle: str) -> list[object]:
    """Answer the process list as consumer cards do."""
    raise AmdSmiLibraryError("AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported")


def test_amdsmi_without_process_list_uses_fdinfo(
    monkeypatch: pytest.MonkeyPatch, proc: Path, child: int
) -> None:
    """When amdsmi answers NOT_SUPPORTED, by_pid comes from fdinfo of the whole tree."""
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(refuse))
    root = backend_tree(proc, child)
    probe = open_amdsmi(None, [], proc)
    gpu0, gpu1 = probe.read([root])
    assert (gpu0.by_pid, gpu0.source, gpu0.per_process_supported) == ({}, "fdinfo", True)
    assert (gpu1.by_pid, gpu1.source, gpu1.per_process_supported) == (
        {root: 3 * GIB},
        "fdinfo",
        True,
    )
    assert (gpu1.total, gpu1.free) == (24 * GIB, 20 * GIB)


def test_amdsmi_zeros_for_a_drm_client_are_replaced_by_fdinfo(
    monkeypatch: pytest.MonkeyPatch, proc: Path, child: int
) -> None:
    """A process list that gives a DRM client 0 bytes gives way to fdinfo on that GPU only."""
    entries: list[object] = [{"pid": child, "memory_usage": {"vram_mem": 0}}]
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(lambda _h: entries))
    root = backend_tree(proc, child)
    gpu0, gpu1 = open_amdsmi(None, [], proc).read([root])
    # fdinfo sees nothing of the tree on GPU_A, so amdsmi's empty answer stands there.
    assert (gpu0.by_pid, gpu0.source) == ({}, "amdsmi")
    assert (gpu1.by_pid, gpu1.source) == ({root: 3 * GIB}, "fdinfo")


def test_amdsmi_figures_win_when_every_tree_has_one(
    monkeypatch: pytest.MonkeyPatch, proc: Path, child: int
) -> None:
    """Where amdsmi reports a figure for each asked tree, it is used as is."""
    entries: list[object] = [{"pid": child, "memory_usage": {"vram_mem": 2 * GIB}}]
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(lambda _h: entries))
    root = backend_tree(proc, child)
    _, gpu1 = open_amdsmi(None, [], proc).read([root])
    assert (gpu1.by_pid, gpu1.source, gpu1.per_process_supported) == (
        {root: 2 * GIB},
        "amdsmi",
        True,
    )


def test_amdsmi_and_fdinfo_both_blind_means_device_totals(
    monkeypatch: pytest.MonkeyPatch, proc: Path, child: int
) -> None:
    """NOT_SUPPORTED plus a client without VRAM keys leaves that GPU on totals, logged once."""
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(refuse))
    root = os.getpid()
    add_fd(proc, child, 3, "/dev/dri/renderD129", record(GPU_B, 5, "drm-memory-gtt:\t4 KiB"))
    probe = open_amdsmi(None, [], proc)
    with capture_logs() as logs:
        readings = probe.read([root]) + probe.read([root])
    # The tree has no client on GPU_A, so fdinfo can tell that it uses nothing there.
    assert [(r.device, r.source, r.per_process_supported) for r in readings] == [
        ("gpu0", "fdinfo", True),
        ("gpu1", "device-delta", False),
    ] * 2
    assert all(r.by_pid == {} for r in readings)
    assert [entry["event"] for entry in logs] == ["probe.fallback"]


def fake_card(drm_root: Path, card: int, pdev: str, used: int) -> None:
    """A sysfs card whose ``device`` links to a folder named by its PCI address."""
    target = drm_root.parent / "devices" / pdev
    target.mkdir(parents=True)
    (target / "mem_info_vram_total").write_text(f"{24 * GIB}\n", encoding="ascii")
    (target / "mem_info_vram_used").write_text(f"{used}\n", encoding="ascii")
    (drm_root / f"card{card}").mkdir(parents=True)
    (drm_root / f"card{card}" / "device").symlink_to(target)


def test_sysfs_probe_takes_per_process_vram_from_fdinfo(
    tmp_path: Path, proc: Path, child: int
) -> None:
    """Without amdsmi, the sysfs counters give totals and fdinfo each tree's VRAM per card."""
    drm_root = tmp_path / "class" / "drm"
    fake_card(drm_root, 0, GPU_A, GIB)
    fake_card(drm_root, 1, GPU_B, 5 * GIB)
    root = backend_tree(proc, child)
    warnings: list[str] = []
    probe = open_amd_sysfs(None, warnings, drm_root, proc)
    assert warnings == []
    gpu0, gpu1 = probe.read([root])
    assert (gpu0.free, gpu0.by_pid, gpu0.source) == (23 * GIB, {}, "fdinfo")
    assert (gpu1.free, gpu1.by_pid, gpu1.source) == (19 * GIB, {root: 3 * GIB}, "fdinfo")
    assert gpu1.per_process_supported


def test_sysfs_card_without_pci_address_reports_device_totals(tmp_path: Path, proc: Path) -> None:
    """A card whose device folder names no PCI address is read, warned about, without by_pid."""
    card = tmp_path / "drm" / "card0" / "device"
    card.mkdir(parents=True)
    (card / "mem_info_vram_total").write_text(f"{8 * GIB}\n", encoding="ascii")
    (card / "mem_info_vram_used").write_text("0\n", encoding="ascii")
    warnings: list[str] = []
    probe = open_amd_sysfs(None, warnings, tmp_path / "drm", proc)
    assert len(warnings) == 1
    assert "no PCI address" in warnings[0]
    [reading] = probe.read([os.getpid()])
    assert (reading.source, reading.per_process_supported) == ("device-delta", False)


def test_default_proc_root_follows_the_module_value(
    monkeypatch: pytest.MonkeyPatch, proc: Path
) -> None:
    """DrmVram without a root reads the module's PROC_ROOT, which is /proc outside tests."""
    assert _fdinfo.PROC_ROOT.as_posix() == "/proc"
    monkeypatch.setattr(_fdinfo, "PROC_ROOT", proc)
    assert DrmVram().proc == proc
