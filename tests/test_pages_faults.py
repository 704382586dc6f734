"""The ram tier's locked pages under faults: a file cut short, a start from its own pages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from daemon import hook_env, wait_for

from swapd import pages
from swapd.pages import WarmFile

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import StartDaemon

MIB = 1 << 20


def _truncating_map(path: Path, keep: int) -> Callable[[int, int], int]:
    """``pages._map`` that cuts the file to ``keep`` bytes once mapped: a file truncated mid-hold.

    This is what a model file rewritten in place (``truncate`` then write, as ``cp`` over it
    does) looks like to a hold that is being taken.
    """
    real = pages._map

    def mapped(fd: int, size: int) -> int:
        address = real(fd, size)
        os.truncate(path, keep)
        return address

    return mapped


def test_a_lock_that_fails_on_a_truncated_file_leaves_nothing_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlock fails (ENOMEM) on a mapping longer than its file, but leaves the VMA VM_LOCKED.

    The hold says ``locked`` False, yet the whole mapping counts in VmLck, that is against
    RLIMIT_MEMLOCK, until close: the next model's lock is refused for pages nobody locked.
    """
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(4 * MIB))
    monkeypatch.setattr(pages, "_map", _truncating_map(path, 4096))
    before = pages._status_field("VmLck:")
    with WarmFile.open(path) as warm:
        assert warm.locked is False
        assert pages._status_field("VmLck:") - before == 0, "a failed lock left the mapping locked"


def test_a_lock_that_fails_on_a_truncated_file_does_not_blame_rlimit_memlock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOMEM from mlock of a short file is reported as RLIMIT_MEMLOCK, 4 MiB against 8 MiB.

    status ``pages.note`` then tells the operator to raise LimitMEMLOCK=, which changes nothing.
    """
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(4 * MIB))
    monkeypatch.setattr(pages, "_map", _truncating_map(path, 4096))
    with WarmFile.open(path) as warm:
        assert warm.locked is False
        assert warm.lock_error is not None
        assert "RLIMIT_MEMLOCK" not in warm.lock_error, warm.lock_error


# Host RAM as the kernel reports it: MemAvailable leaves out what is locked (mlocked file
# pages sit on the unevictable list). TOTAL is set by the test through the environment.
_TIGHT_HOST = """
import os
from pathlib import Path

import swapd.probe._host as _host

_TOTAL = int(os.environ["AUDIT_HOST_TOTAL"])


def _locked() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def host_memory(limits=None):
    return _TOTAL, _TOTAL - _locked()


_host.host_memory = host_memory
"""


@pytest.mark.llama
def test_a_model_starts_from_its_own_locked_pages_where_it_starts_from_disk(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """On host RAM, a start from the ram tier counts the model's own locked pages twice.

    The locked GGUF is gone from MemAvailable (free), and the need counts the file again,
    while the backend maps those very pages. The slot is left out of the residents, so
    nothing may push its pages down: a model that starts from disk is refused from ram.
    """
    size = tiny_gguf.stat().st_size
    need = size + 64 * 1024
    total = need + size // 2  # room for a start from disk, not for the file twice
    env = hook_env(tmp_path / "hook", _TIGHT_HOST) | {"AUDIT_HOST_TOTAL": str(total)}
    preset = {"backend": "llama-server", "model": str(tiny_gguf), "ttl": "1s", "memory": need}
    d = start_daemon({"t": preset}, {"reserve": 0, "ram_budget": 64 * MIB}, env)
    assert d.chat("t")[0] == 200  # from disk: it fits
    wait_for(lambda: d.model("t")["state"] == "stopped", timeout=40)
    assert d.model("t")["tier"] == "ram"
    assert d.model("t")["pages"] == {"locked": True, "note": None}
    status, body = d.chat("t")
    assert status == 200, body
