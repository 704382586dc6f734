"""The ram tier's held pages let go when their file goes away or host memory runs short.

Real llama-servers on a tiny GGUF; swapd's own mappings read from ``/proc/PID/maps``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from daemon import Daemon, hook_env, wait_for
from test_pages_faults import _TIGHT_HOST

from swapd.pages import WarmSet

if TYPE_CHECKING:
    from conftest import StartDaemon

pytestmark = pytest.mark.llama
MIB = 1 << 20


def mapped(d: Daemon, path: Path) -> list[str]:
    """swapd's mappings of ``path`` (a deleted file's end in ``(deleted)``)."""
    assert d.proc is not None
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    return [line for line in maps.splitlines() if str(path) in line]


def to_ram(d: Daemon, name: str) -> None:
    """Serve ``name`` once, then wait for its TTL to leave its pages in the ram tier."""
    assert d.chat(name, max_tokens=1)[0] == 200
    wait_for(lambda: d.model(name)["state"] == "stopped" and d.model(name)["tier"] == "ram", 40)


def events(d: Daemon, name: str) -> list[dict[str, object]]:
    """swapd's log lines of event ``name``."""
    lines = (json.loads(line) for line in d.log_path.read_text().splitlines() if name in line)
    return [line for line in lines if line.get("event") == name]


def copy_of(gguf: Path, where: Path) -> Path:
    """A copy of the GGUF of this test's own, to delete or replace."""
    shutil.copyfile(gguf, where)
    return where


def in_ram(start_daemon: StartDaemon, model: Path) -> Daemon:
    """A swapd serving ``model`` as ``t`` once, its pages then held in the ram tier."""
    preset = {"backend": "llama-server", "model": str(model), "args": ["-c", "256"], "ttl": "1s"}
    d = start_daemon({"t": preset}, {"ram_budget": 256 * MIB})
    to_ram(d, "t")
    return d


def test_a_deleted_file_held_in_the_ram_tier_is_let_go(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """Its pages would stay locked, and its disk space taken, for as long as they were held."""
    model = copy_of(tiny_gguf, tmp_path / "m.gguf")
    d = in_ram(start_daemon, model)
    assert mapped(d, model)
    model.unlink()
    wait_for(lambda: d.model("t")["tier"] == "disk", 30)
    wait_for(lambda: not mapped(d, model), 10)
    _, status = d.get("/swapd/status")
    assert status["tiers"]["ram"]["bytes"] == 0
    assert events(d, "model.pages.stale")


def test_a_replaced_file_is_started_from_disk_not_counted_from_ram(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """A new download renamed over the file: the start reads the new file, and says so."""
    model = copy_of(tiny_gguf, tmp_path / "m.gguf")
    d = in_ram(start_daemon, model)
    copy_of(tiny_gguf, tmp_path / "m.gguf.new").replace(model)
    assert d.chat("t", max_tokens=1)[0] == 200
    done = events(d, "model.load.done")
    assert [e["from_tier"] for e in done] == ["disk", "disk"]
    assert events(d, "model.pages.stale")
    assert not [line for line in mapped(d, model) if "(deleted)" in line]


# Host memory whose available bytes the test sets through a file, read at every reading.
SQUEEZED_HOST = """
import os
from pathlib import Path

import swapd.probe._host as _host

_AVAILABLE = Path(os.environ["SWAPD_TEST_AVAILABLE"])


def host_memory(limits=None):
    return 16 << 30, int(_AVAILABLE.read_text())


_host.host_memory = host_memory
"""


def test_locked_pages_go_down_when_host_memory_runs_short(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """Taken while memory was plentiful; another program then took it.

    The kernel cannot reclaim locked pages (only its OOM killer can act), so swapd lets
    them go itself, as it would have refused to take them.
    """
    available = tmp_path / "available"
    available.write_text(str(8 << 30))
    env = hook_env(tmp_path / "hook", SQUEEZED_HOST) | {"SWAPD_TEST_AVAILABLE": str(available)}
    preset = {
        "backend": "llama-server",
        "model": str(tiny_gguf),
        "args": ["-c", "256"],
        "ttl": "1s",
    }
    d = start_daemon({"t": preset}, {"ram_budget": 256 * MIB, "reserve": 256 * MIB}, env)
    to_ram(d, "t")
    available.write_text(str(16 * MIB))  # 240 MiB short of the reserve
    wait_for(lambda: d.model("t")["tier"] == "disk", 30)
    _, status = d.get("/swapd/status")
    assert status["tiers"]["ram"]["bytes"] == 0


def test_a_hold_knows_when_its_file_changed(tiny_gguf: Path, tmp_path: Path) -> None:
    """Deleted, replaced by a rename, or rewritten in place: each is a change, with the path."""
    model = copy_of(tiny_gguf, tmp_path / "m.gguf")
    with WarmSet.open(model) as held:
        assert held.changed() is None
        copy_of(tiny_gguf, tmp_path / "new.gguf").replace(model)
        assert str(model) in (held.changed() or "")
    with WarmSet.open(model) as held:
        model.write_bytes(model.read_bytes() + b"\0")
        assert held.changed() is not None
    with WarmSet.open(model) as held:
        model.unlink()
        assert "No such file" in (held.changed() or "")


def vmlck(d: Daemon) -> int:
    """Bytes swapd has locked (VmLck)."""
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def test_two_presets_of_one_file_hold_its_pages_once(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """Another context size of the same GGUF: one mapping, counted once, by the tier too.

    A budget of one and a half files holds both: the second does not push the first's
    pages (the same pages) down.
    """
    size = tiny_gguf.stat().st_size
    base = {"backend": "llama-server", "model": str(tiny_gguf), "ttl": "1s"}
    presets = {"a": {**base, "args": ["-c", "256"]}, "b": {**base, "args": ["-c", "512"]}}
    d = start_daemon(presets, {"ram_budget": size * 3 // 2})
    to_ram(d, "a")
    to_ram(d, "b")
    assert_held_once(d, size)
    assert len(mapped(d, tiny_gguf)) == 1
    # The one that counts them starts (and lets go): the other counts them from then on.
    assert d.chat("a", max_tokens=1)[0] == 200
    wait_for(lambda: d.model("b")["memory"]["ram"] == size, 10)
    wait_for(lambda: d.model("a")["tier"] == "ram", 40)  # back, sharing b's
    _, status = d.get("/swapd/status")
    assert status["tiers"]["ram"]["bytes"] == size


def assert_held_once(d: Daemon, size: int) -> None:
    """a and b in the ram tier on one hold of ``size`` bytes: counted once, locked once."""
    _, status = d.get("/swapd/status")
    assert {m["name"]: m["tier"] for m in status["models"]} == {"a": "ram", "b": "ram"}
    assert status["tiers"]["ram"]["bytes"] == size
    assert sorted(m["memory"]["ram"] for m in status["models"]) == [0, size]
    assert vmlck(d) < 2 * size


def link_to(model: Path, link: Path, how: str) -> Path:
    """Another name for ``model``: a symbolic link, or a hard link."""
    if how == "symlink":
        link.symlink_to(model)
    else:
        os.link(model, link)
    return link


def maps_of(d: Daemon, *paths: Path) -> int:
    """How many of swapd's mappings are of any of ``paths``."""
    return sum(len(mapped(d, path)) for path in paths)


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_two_presets_of_one_file_under_two_names_hold_its_pages_once(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path, how: str
) -> None:
    """A link to the GGUF is the same file: its pages are the same pages.

    Matched by name only, the second preset's demotion counted them again, and with a
    budget of one and a half files pushed the first's pages (the very pages) down to disk.
    """
    model = copy_of(tiny_gguf, tmp_path / "m.gguf")
    other = link_to(model, tmp_path / "other.gguf", how)
    size = model.stat().st_size
    base = {"backend": "llama-server", "ttl": "1s"}
    presets = {
        "a": {**base, "model": str(model), "args": ["-c", "256"]},
        "b": {**base, "model": str(other), "args": ["-c", "512"]},
    }
    d = start_daemon(presets, {"ram_budget": size * 3 // 2})
    to_ram(d, "a")
    to_ram(d, "b")
    assert_held_once(d, size)
    assert maps_of(d, model, other) == 1


def test_a_link_pointed_at_another_file_lets_its_shared_pages_go(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """Pages shared through a link are of no use to that preset once the link moves."""
    model = copy_of(tiny_gguf, tmp_path / "m.gguf")
    other = link_to(model, tmp_path / "other.gguf", "symlink")
    base = {"backend": "llama-server", "ttl": "1s"}
    presets = {
        "a": {**base, "model": str(model), "args": ["-c", "256"]},
        "b": {**base, "model": str(other), "args": ["-c", "512"]},
    }
    d = start_daemon(presets, {"ram_budget": 256 * MIB})
    to_ram(d, "a")
    to_ram(d, "b")
    moved = tmp_path / "moved.gguf"
    link_to(copy_of(tiny_gguf, tmp_path / "new.gguf"), moved, "symlink")
    moved.replace(other)
    wait_for(lambda: d.model("b")["tier"] == "disk", 30)
    assert d.model("a")["tier"] == "ram", "a's own file did not change"
    assert [e["model"] for e in events(d, "model.pages.stale")] == ["b"]
    assert d.chat("b", max_tokens=1)[0] == 200
    assert [e["from_tier"] for e in events(d, "model.load.done")][-1] == "disk"


def test_a_load_that_pushes_shared_pages_down_frees_them_for_every_preset(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """Two presets of one file in the ram tier; a load on host RAM needs their memory.

    The plan counts the pages with the preset that took them and pushes that one down.
    Dropped for it alone, the other preset took the count over and kept them locked: the
    memory never showed as free, and the load waited out all of ``release_timeout``.
    """
    model = copy_of(tiny_gguf, tmp_path / "m.gguf")
    size = model.stat().st_size
    big = 4 * size
    total = big + size // 2  # room for the big one once the file's pages are unlocked
    env = hook_env(tmp_path / "hook", _TIGHT_HOST) | {"AUDIT_HOST_TOTAL": str(total)}
    base = {"backend": "llama-server", "ttl": "1s", "memory": 64 * 1024}
    presets = {
        "a": {**base, "model": str(model), "args": ["-c", "256"]},
        "b": {**base, "model": str(model), "args": ["-c", "512"]},
        "big": {**base, "model": str(copy_of(tiny_gguf, tmp_path / "big.gguf")), "memory": big},
    }
    # Far past the client's timeout: a load that waits for the release never answers.
    settings = {"reserve": 0, "ram_budget": 64 * MIB, "release_timeout": "1h"}
    d = start_daemon(presets, settings, env)
    to_ram(d, "a")
    to_ram(d, "b")
    assert vmlck(d) >= size
    status, body = d.chat("big", max_tokens=1)
    assert status == 200, body
    assert d.model("a")["tier"] == d.model("b")["tier"] == "disk"
    down = [e for e in events(d, "model.tier") if e["tier"] == "disk"]
    assert sorted((e["model"], e["reason"]) for e in down) == [("a", "evict"), ("b", "evict")]
    assert vmlck(d) == 0
