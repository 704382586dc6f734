"""Local security of swapd's files and processes: what other users and other programs may meet.

Each test stands for one problem found in an audit and fails until it is fixed: copies in
``cache_dir`` readable by everyone, a cleanup that deletes what swapd never made, a lock file
opened through a symbolic link, a pid record from an earlier boot that kills an unrelated
process group, and ``swapd logs`` passing a backend's terminal escapes to the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_leftovers import double_forked_worker, gone

from swapd import cli
from swapd._client import Client, Target
from swapd.pidfiles import PidRecords
from swapd.staging import StagingCache

MIB = 1024 * 1024


def _private(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _others_bits(path: Path) -> int:
    """The permission bits that let the file's group or anyone else read, write or run it."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077


# ---------------------------------------------------------------- staging: modes of copies


@pytest.mark.asyncio
async def test_a_staged_copy_of_a_private_model_file_is_not_readable_by_everyone(
    tmp_path: Path,
) -> None:
    """A model file only its owner may read (0600) stays so in ``cache_dir``.

    The copy is created with a fixed 0644 (swapd/_copy.py ``_copy_file``), whatever the
    source's mode: private weights on a shared host become readable by every local user
    once staged (the unit's CacheDirectory= is 0755).
    """
    source = _private(tmp_path / "models" / "private.gguf", b"weights" * 1000)
    async with StagingCache(tmp_path / "cache", 64 * MIB) as cache:
        copy = await cache.stage(source)
    assert copy.read_bytes() == source.read_bytes()
    assert _others_bits(copy) == 0, f"copy of a 0600 file has mode {copy.stat().st_mode:o}"


@pytest.mark.asyncio
async def test_a_link_out_of_a_model_folder_does_not_publish_its_target(tmp_path: Path) -> None:
    """A folder's link to a private file elsewhere is copied no more readable than its target.

    Links are followed on purpose (a Hugging Face snapshot links into ``blobs/``), but the
    bytes then land in ``cache_dir`` as 0644: whoever may write in a model folder (a shared
    ``/models``) can plant ``tokenizer.json -> /etc/swapd/admin.keys`` (0640, group swapd)
    and read the keys from the cache once the model is staged.
    """
    secret = _private(tmp_path / "etc" / "admin.keys", b"sk-admin-secret\n")
    folder = tmp_path / "models" / "llm"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").symlink_to(secret)
    async with StagingCache(tmp_path / "cache", 64 * MIB) as cache:
        copy = await cache.stage(folder)
    leaked = copy / "tokenizer.json"
    assert leaked.read_bytes() == secret.read_bytes()
    assert _others_bits(leaked) == 0, f"a 0600 target copied as {leaked.stat().st_mode:o}"


@pytest.mark.asyncio
async def test_a_copy_is_private_to_swapd_also_when_only_its_folder_was(tmp_path: Path) -> None:
    """A 0644 model in a 0700 home is kept from others by the home; its copy, by its entry.

    Each entry's folder is 0700, and an entry made before that is narrowed at start.
    """
    home = tmp_path / "home"
    model = home / "m.gguf"
    home.mkdir(mode=0o700)
    model.write_bytes(b"weights" * 1000)
    model.chmod(0o644)
    cache_dir = tmp_path / "cache"
    async with StagingCache(cache_dir, 64 * MIB) as cache:
        copy = await cache.stage(model)
    entry = copy.parent.parent
    assert entry.parent == cache_dir
    assert _others_bits(entry) == 0, f"entry folder has mode {entry.stat().st_mode:o}"
    entry.chmod(0o755)  # as an earlier version left it
    async with StagingCache(cache_dir, 64 * MIB):
        assert _others_bits(entry) == 0


# ---------------------------------------------------------------- staging: what is not its own


def test_opening_the_cache_keeps_a_folder_swapd_did_not_make(tmp_path: Path) -> None:
    """A folder named like a key but with no manifest of swapd's is left alone, not rmtree'd.

    ``_cache_dir.load`` deletes every name of 32 hex digits whose ``entry.json`` cannot be
    read, and everything starting with ``.partial-`` or ``.evicted-``: a ``cache_dir`` set to
    a directory that already holds other things (``/mnt/nvme``, a scratch folder) loses any
    folder named by an MD5 (a common choice of other caches) at swapd's first start.
    """
    cache_dir = tmp_path / "nvme"
    theirs = cache_dir / "d41d8cd98f00b204e9800998ecf8427e"
    theirs.mkdir(parents=True)
    (theirs / "results.csv").write_text("someone else's work\n")
    notes = cache_dir / ".partial-notes.txt"
    notes.write_text("not a copy of swapd's\n")
    cache = StagingCache(cache_dir, 64 * MIB)
    cache.open()
    try:
        assert (theirs / "results.csv").exists(), "a folder swapd never made was deleted"
        assert notes.exists(), "a file swapd never made was deleted"
    finally:
        asyncio.run(cache.aclose())


def test_a_symlinked_cache_lock_does_not_truncate_its_target(tmp_path: Path) -> None:
    """``cache_dir/.lock`` is opened without following a link, so no other file is clobbered.

    ``_cache_dir.lock`` opens it with ``O_RDWR | O_CREAT`` (links followed), truncates it and
    writes its pid: a user who shares a group-writable ``cache_dir`` (two swapds, one cache)
    makes the other's swapd truncate any file that swapd may write (its config, its keys
    file, its footprints).
    """
    victim = tmp_path / "home" / "swapd.yaml"
    victim.parent.mkdir()
    victim.write_text("admin_keys_file: admin.keys\n")
    cache_dir = tmp_path / "shared-cache"
    cache_dir.mkdir()
    (cache_dir / ".lock").symlink_to(victim)
    cache = StagingCache(cache_dir, 64 * MIB)
    try:
        cache.open()
    except Exception:  # noqa: BLE001, S110 - refusing the link is a fix too
        pass
    else:
        asyncio.run(cache.aclose())
    assert victim.read_text() == "admin_keys_file: admin.keys\n"


# ---------------------------------------------------------------- pid records


def test_a_record_from_an_earlier_boot_kills_no_group(tmp_path: Path) -> None:
    """A record written before this boot names no process of this boot: nothing is killed.

    Records survive a power loss in ``state_dir/children`` (under systemd /var/lib/swapd).
    After the reboot its pid is someone else's. A record without a ``mark`` (written by a
    swapd from before marks, or a damaged one) takes any member of a leaderless group with
    that id as its own (``_ours``), and every process of this boot started after the
    record's time, so a daemon whose session leader exited (the double fork) is SIGKILLed.
    """
    leader_pid, worker = double_forked_worker()
    try:
        children = tmp_path / "state" / "children"
        children.mkdir(parents=True)
        record = {
            "pid": leader_pid,
            "model": "qwen",
            "create_time": psutil.boot_time() - 3600,  # the last boot's backend
            "owner": 4242,
        }
        (children / f"{leader_pid}.json").write_text(json.dumps(record))
        ended = PidRecords(tmp_path / "state").end_leftovers()
        assert ended == [], f"killed {ended}: a group of this boot, for a record of the last"
        assert not gone(worker.pid), "an unrelated process was SIGKILLed"
        assert not list(children.iterdir()), "the stale record is dropped all the same"
    finally:
        if not gone(worker.pid):
            worker.send_signal(signal.SIGKILL)


@pytest.mark.parametrize(("boot", "killed"), [("another boot", False), (None, True)])
def test_a_record_names_its_boot_and_only_this_boots_are_acted_on(
    tmp_path: Path, boot: str | None, *, killed: bool
) -> None:
    """A record carries the kernel's boot id: one of another boot is dropped, unacted on.

    The same process, recorded with this boot's id (None: as swapd writes it), is ended.
    """
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        records = PidRecords(tmp_path / "state")
        records.add(sleeper.pid, "qwen")
        path = records.directory / f"{sleeper.pid}.json"
        record = json.loads(path.read_text())
        assert record["boot"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        if boot is not None:
            path.write_text(json.dumps({**record, "boot": boot}))
        assert records.end_leftovers() == ([sleeper.pid] if killed else [])
        assert (sleeper.wait(timeout=10) if killed else sleeper.poll()) == (-9 if killed else None)
        assert not list(records.directory.iterdir())
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- swapd logs


class _Lines(Client):
    """A client whose ``/swapd/models/NAME/logs`` answers the given lines."""

    def __init__(self, lines: list[str]) -> None:  # no session: nothing is sent
        self.target = Target("http://127.0.0.1:1", None)
        self._lines = lines

    async def call(
        self, method: str, path: str, *, within: float | None = None, expect: str | None = None
    ) -> Any:
        assert (method, expect) == ("GET", "lines")
        assert within is not None  # a frozen swapd is no endless wait
        assert path.startswith("/swapd/models/a/logs")
        return {"lines": self._lines}


@pytest.mark.asyncio
async def test_swapd_logs_does_not_pass_a_backends_terminal_escapes_through(
    capsys: pytest.CaptureFixture[str],
) -> None:
    r"""``swapd logs`` shows control characters of a backend's output, never sends them raw.

    A backend prints what it is given (llama-server's ``--verbose`` logs prompts), so a
    client's text can reach the operator's terminal: OSC 52 writes the clipboard, OSC 0
    the title, ``ESC[2K`` and ``\r`` hide the lines before. The journal escapes them
    (JSON); ``swapd logs`` prints them as they came (swapd/cli.py ``verb_logs``).
    """
    hostile = "ok\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07\x1b[2K\rall is fine"
    args = argparse.Namespace(name="a", lines=10, follow=False, json=False)
    assert await cli.verb_logs(_Lines([hostile]), args) == 0
    out = capsys.readouterr().out
    assert "all is fine" in out
    assert "\x1b" not in out, f"a raw escape reached the terminal: {out!r}"
    assert "\x07" not in out
