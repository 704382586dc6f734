"""Warm file pages: held files stay resident and locked, drop_cache makes the rest cold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swapd.pages import WarmFile, WarmSet, drop_cache, memory_fs, resident_bytes

MIB = 1 << 20
LIMITED = Path(__file__).parent / "fakes" / "memlock_limited.py"
# A clean, unheld file drops to zero; leave a page or two for a kernel that keeps some.
SLACK = 2 * os.sysconf("SC_PAGE_SIZE")


def _filesystem(path: Path) -> str:
    """The type of the filesystem that holds ``path``, from the longest matching mount."""
    target, best, kind = str(path.resolve()), "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, *_ = line.split()
        point = point.replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A directory whose page cache obeys POSIX_FADV_DONTNEED (tmpfs pages cannot be dropped)."""
    kind = _filesystem(tmp_path)
    if kind in {"tmpfs", "ramfs"}:
        pytest.skip(f"{tmp_path} is on {kind}, which keeps its pages whatever it is told")
    return tmp_path


def _write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _cold(path: Path) -> Path:
    """Drop the path's pages, so that what is resident later was read by the code under test."""
    assert drop_cache(path).after <= SLACK
    return path


def _limited(path: Path, limit: int, *flags: str) -> dict[str, object]:
    """Hold ``path`` in a process whose lock limit is ``limit``; what the hold reported."""
    argv = [sys.executable, str(LIMITED), str(path), str(limit), *flags]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def test_open_reads_and_locks_every_page(disk: Path) -> None:
    """A cold file is wholly resident and locked once WarmFile.open returns."""
    path = _cold(_write(disk / "model.gguf", 8 * MIB + 123))
    with WarmFile.open(path) as warm:
        assert (warm.path, warm.size) == (path, 8 * MIB + 123)
        assert warm.locked
        assert warm.lock_error is None
        assert warm.resident_bytes() == warm.size
        assert resident_bytes(path) == warm.size


def test_drop_cache_empties_a_file_nobody_holds(disk: Path) -> None:
    """drop_cache turns a freshly written (dirty, cached) file cold and reports both counts."""
    path = _write(disk / "model.gguf", 8 * MIB)
    cached = resident_bytes(path)
    dropped = drop_cache(path)
    assert cached > 4 * MIB
    assert dropped.before == cached
    assert dropped.after <= SLACK
    assert resident_bytes(path) <= SLACK


def test_locked_pages_survive_drop_cache_until_close(disk: Path) -> None:
    """While a WarmFile holds a file, drop_cache leaves it resident; after close it drops."""
    path = _cold(_write(disk / "model.gguf", 8 * MIB))
    with WarmFile.open(path) as warm:
        held = drop_cache(path)
        assert held == (8 * MIB, 8 * MIB)
        assert warm.resident_bytes() == 8 * MIB
    assert warm.closed
    assert drop_cache(path).after <= SLACK


def test_failed_lock_keeps_pages_cached_and_says_why(disk: Path) -> None:
    """Past RLIMIT_MEMLOCK, open does not raise: pages are read in unlocked, with a reason."""
    path = _cold(_write(disk / "model.gguf", 4 * MIB))
    report = _limited(path, 64 * 1024)
    assert report["locked"] is False
    assert report["lock_error"] == (
        "mlock failed: Cannot allocate memory (RLIMIT_MEMLOCK is 64 KiB, this file needs"
        " 4 MiB; raise LimitMEMLOCK= in the unit)"
    )
    assert report["resident"] == report["size"] == 4 * MIB


def test_failed_lock_reads_pages_in_without_populate_advice(disk: Path) -> None:
    """On a kernel without MADV_POPULATE_READ, an unlocked hold still reads every page in."""
    path = _cold(_write(disk / "model.gguf", 4 * MIB))
    report = _limited(path, 64 * 1024, "--old-kernel")
    assert report["locked"] is False
    assert report["resident"] == report["size"] == 4 * MIB


def test_a_set_locks_what_the_limit_allows_and_names_the_rest(disk: Path) -> None:
    """In a set, files lock in order until the limit; lock_error counts and names the first miss."""
    _write(disk / "model" / "a.safetensors", 4 * MIB)
    second = _write(disk / "model" / "b.safetensors", 4 * MIB)
    report = _limited(_cold(disk / "model"), 6 * MIB)
    assert report["locked"] is False
    assert report["files"] == [True, False]
    assert report["lock_error"] == (
        f"1 of 2 files not locked; {second}: mlock failed: Cannot allocate memory"
        " (RLIMIT_MEMLOCK is 6 MiB, 4 MiB already locked, this file needs 4 MiB;"
        " raise LimitMEMLOCK= in the unit)"
    )
    assert report["resident"] == report["size"] == 8 * MIB


def test_a_set_holds_every_file_under_a_directory_once(disk: Path) -> None:
    """WarmSet.open holds each regular file under a tree once, following links to files."""
    model = disk / "model"
    first = _write(model / "a.safetensors", 2 * MIB)
    second = _write(model / "sub" / "b.safetensors", 3 * MIB)
    config = _write(model / "config.json", 100)
    (model / "link.safetensors").symlink_to(first)
    (model / "loop").symlink_to(model)
    _cold(model)
    with WarmSet.open(model) as held:
        assert sorted(file.path for file in held.files) == sorted([first, second, config])
        assert held.size == 5 * MIB + 100
        assert held.locked
        assert held.lock_error is None
        assert held.resident_bytes() == held.size
        assert resident_bytes(model) == held.size
        assert drop_cache(model) == (held.size, held.size)
    assert drop_cache(model).after <= SLACK


def test_a_set_of_one_file_holds_that_file(disk: Path) -> None:
    """WarmSet.open on a file holds just that file, so one call fits GGUFs and model trees."""
    path = _cold(_write(disk / "model.gguf", MIB))
    with WarmSet.open(path) as held:
        assert [file.path for file in held.files] == [path]
        assert held.resident_bytes() == MIB


def test_close_is_idempotent(disk: Path) -> None:
    """Closing twice is harmless, and a closed hold refuses to count pages."""
    path = _write(disk / "model.gguf", MIB)
    warm = WarmFile.open(path)
    held = WarmSet.open(path)
    for hold in (warm, held):
        hold.close()
        hold.close()
    assert warm.closed
    assert all(file.closed for file in held.files)
    with pytest.raises(ValueError, match="closed"):
        warm.resident_bytes()


def test_an_empty_file_is_held_with_nothing_to_lock(disk: Path) -> None:
    """A zero-byte file maps to nothing and counts as locked with no resident bytes."""
    path = disk / "empty.gguf"
    path.touch()
    with WarmFile.open(path) as warm:
        assert (warm.size, warm.locked, warm.resident_bytes()) == (0, True, 0)
    assert drop_cache(path) == (0, 0)


def test_a_missing_path_raises_file_not_found_with_the_path(tmp_path: Path) -> None:
    """Every entry point names the missing path in a FileNotFoundError."""
    missing = tmp_path / "absent.gguf"
    for call in (WarmFile.open, WarmSet.open, resident_bytes, drop_cache):
        with pytest.raises(FileNotFoundError) as raised:
            call(missing)
        assert raised.value.filename == str(missing)


def test_warm_file_refuses_a_directory(tmp_path: Path) -> None:
    """WarmFile.open on a directory raises IsADirectoryError that points to WarmSet."""
    with pytest.raises(IsADirectoryError, match="WarmSet"):
        WarmFile.open(tmp_path)


@pytest.mark.parametrize("where", ["tmp", "shm", "repo"])
def test_memory_fs_names_the_filesystems_whose_files_live_in_ram(
    tmp_path: Path, where: str
) -> None:
    """tmpfs and ramfs, as ``stat -f`` names the filesystem; None for any other."""
    folder = {"tmp": tmp_path, "shm": Path("/dev/shm"), "repo": Path(__file__).parent}[where]  # noqa: S108
    if not folder.is_dir():
        pytest.skip(f"no {folder} here")
    kind = subprocess.run(
        ["stat", "-f", "-c", "%T", str(folder)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert memory_fs(folder) == (kind if kind in {"tmpfs", "ramfs"} else None)
    assert memory_fs(folder / "no such file") is None
