"""The staging cache on disk: one directory per complete entry, published by one rename.

    cache_dir/
    ├── .lock                       flock held by the swapd that owns the cache
    ├── 3f9a…e1/                    a complete entry, named by its key
    │   ├── entry.json              what it is a copy of (source, size, fingerprint, sha256);
    │   │                           its mtime is the entry's last use
    │   └── data/qwen.gguf          the copy, under the source's own name
    ├── .partial-77c0…-a1b2c3/      a copy in progress (or cut short by a crash)
    └── .evicted-3f9a…e1-d4e5f6/    an entry being deleted

An entry is built under a ``.partial-`` name: data, then ``entry.json``, then one ``rename``
to its key. Whatever carries a dot-prefixed name is a leftover that :func:`load` deletes,
as is an ``entry.json.XXXXXX`` inside an entry (a manifest's rewrite cut short).
Eviction renames first, so an entry disappears at once and its deletion may take its time.

Durability. :func:`publish` fsyncs nothing, so a copy is ready as soon as ``cp`` would be;
its manifest is marked *unsynced* with the kernel's boot id. :func:`sync` then fsyncs the
data, the directories and the rename, and only then rewrites the manifest without the mark.
A crash of swapd alone (even SIGKILL) loses nothing: the kernel still holds the data and
writes it back. Only a power loss or a kernel crash can tear a copy, and either means a new
boot, so :func:`load` deletes an entry still unsynced from another boot and syncs one from
this boot. A manifest without the mark was written after the fsyncs, so its entry is whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from swapd._copy import Cancelled, fsync_dir, scan
from swapd.boot import kernel_boot_id

MANIFEST = "entry.json"
DATA = "data"
PARTIAL = ".partial-"
EVICTED = ".evicted-"
_LOCK = ".lock"
_KEY = re.compile(r"[0-9a-f]{32}")
# What swapd names its unfinished copies and its deletions in progress, exactly.
_LEFTOVER = re.compile(r"\.(partial|evicted)-[0-9a-f]{32}-[0-9a-f]{6}")
# A manifest's rewrite (:func:`_rewrite`) cut short by a kill, inside its entry.
_REWRITE_LEFTOVER = re.compile(re.escape(MANIFEST) + r"\.[0-9a-f]{6}")
_VERSION = 1
# An unsynced manifest has a version of its own, so that a swapd from before the mark
# existed (it reads version 1 only) deletes such an entry at its start instead of trusting it.
_VERSION_UNSYNCED = 2
# Manifests are rewritten (digest, synced) by threads: one read-modify-write at a time.
_REWRITE = threading.Lock()


@dataclass(frozen=True)
class Manifest:
    """What a complete entry is a copy of, as written in its ``entry.json``."""

    source: str
    is_dir: bool
    size: int
    fingerprint: str
    sha256: str | None
    # The boot during which the entry was published and not yet synced; None once synced.
    unsynced_boot: str | None = None

    @property
    def key(self) -> str:
        """The entry's name: the source's absolute path and fingerprint, hashed."""
        return key_of(self.source, self.fingerprint)

    @property
    def name(self) -> str:
        """The copy's file or directory name: the source's own."""
        return Path(self.source).name

    def to_json(self) -> str:
        """The manifest's file contents."""
        kind = "dir" if self.is_dir else "file"
        version = _VERSION if self.unsynced_boot is None else _VERSION_UNSYNCED
        fields: dict[str, object] = {"version": version, "source": self.source, "kind": kind}
        fields |= {"size": self.size, "fingerprint": self.fingerprint, "sha256": self.sha256}
        if self.unsynced_boot is not None:
            fields["unsynced_boot"] = self.unsynced_boot
        return json.dumps(fields, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; ``ValueError`` (or ``KeyError``/``TypeError``) if it is not one."""
        raw = json.loads(text)
        known = raw["version"] in {_VERSION, _VERSION_UNSYNCED}
        if not known or raw["kind"] not in {"file", "dir"}:
            raise ValueError("unknown manifest version or kind")
        unsynced = raw["unsynced_boot"] if raw["version"] == _VERSION_UNSYNCED else None
        sha = raw["sha256"]
        return cls(
            source=str(raw["source"]),
            is_dir=raw["kind"] == "dir",
            size=int(raw["size"]),
            fingerprint=str(raw["fingerprint"]),
            sha256=None if sha is None else str(sha),
            unsynced_boot=None if unsynced is None else str(unsynced),
        )


def boot_id() -> str:
    """The kernel's id of this boot; a fresh random one where the kernel gives none.

    A fresh one means an unsynced entry never counts as this boot's after a restart.
    """
    return kernel_boot_id() or secrets.token_hex(16)


def key_of(source: str, fingerprint: str) -> str:
    """An entry's key: a changed source (another fingerprint) gets a new key, so a new copy."""
    return hashlib.sha256(f"{source}\0{fingerprint}".encode()).hexdigest()[:32]


def data_path(cache_dir: Path, key: str, name: str) -> Path:
    """Where an entry's copy lives once it is complete."""
    return cache_dir / key / DATA / name


def lock(cache_dir: Path) -> int:
    """Create the cache directory and hold its lock; ``BlockingIOError`` if another holds it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Never through a link: a lock planted as one would have swapd truncate its target.
    fd = os.open(cache_dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def holder(cache_dir: Path) -> str:
    """The pid written in the lock file, for a message ("?" if unreadable)."""
    try:
        return (cache_dir / _LOCK).read_text().strip() or "?"
    except OSError:
        return "?"


@dataclass
class Loaded:
    """What :func:`load` found: entries by key with their last use (ns), and what it did."""

    entries: dict[str, tuple[Manifest, int]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # names deleted, each with the reason
    synced: list[str] = field(default_factory=list)  # keys of this boot's unsynced entries


def load(cache_dir: Path, boot: str) -> Loaded:
    """Delete leftovers, invalid entries and unsynced ones from another boot; sync the rest.

    An entry still unsynced from this ``boot`` survived a crash of swapd only, so its data
    is whole in the page cache: it is synced now and kept.
    """
    found = Loaded()
    for path in sorted(cache_dir.iterdir()):
        name = path.name
        # Only what swapd makes is touched: cache_dir may hold other programs' files.
        if _LEFTOVER.fullmatch(name):
            remove(path)
            found.removed.append(f"{name} (interrupted copy or deletion)")
        elif _KEY.fullmatch(name) and _made_by_swapd(path):
            problem = _check(path, boot)
            if isinstance(problem, str):
                remove(path)
                found.removed.append(f"{name} ({problem})")
                continue
            manifest, last_used = problem
            with contextlib.suppress(OSError):
                path.chmod(0o700)  # an entry from before copies were made private
            found.removed += _rewrite_leftovers(path)
            if manifest.unsynced_boot is not None:
                try:
                    sync(cache_dir, name, threading.Event())
                except OSError as exc:
                    remove(path)
                    found.removed.append(f"{name} (fsync failed: {exc})")
                    continue
                found.synced.append(name)
                manifest = replace(manifest, unsynced_boot=None)
            found.entries[name] = (manifest, last_used)
    return found


def _rewrite_leftovers(entry: Path) -> list[str]:
    """Delete the temporary manifests of rewrites a kill cut short; what went, and why."""
    removed = []
    for path in entry.iterdir():
        if _REWRITE_LEFTOVER.fullmatch(path.name):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(f"{entry.name}/{path.name} (interrupted manifest rewrite)")
    return removed


def _made_by_swapd(path: Path) -> bool:
    """Whether a folder named like an entry is one (another program's is left alone)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / DATA).is_dir() or (path / MANIFEST).is_file()


def _check(path: Path, boot: str) -> tuple[Manifest, int] | str:
    """An entry's manifest and last use, or why it cannot be trusted."""
    try:
        manifest = Manifest.from_json((path / MANIFEST).read_text())
        last_used = (path / MANIFEST).stat().st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest: {exc}"
    if manifest.key != path.name:
        return "manifest does not match the entry's name"
    if manifest.unsynced_boot not in {None, boot}:
        return "not yet synced when the machine restarted: possibly torn"
    try:
        copy = scan(path / DATA / manifest.name)
    except OSError as exc:
        return f"copy unreadable: {exc}"
    if (copy.is_dir, copy.size) != (manifest.is_dir, manifest.size):
        return f"copy holds {copy.size} bytes, manifest says {manifest.size}"
    return manifest, last_used


def start_partial(cache_dir: Path, key: str) -> Path:
    """A new, empty directory to build an entry in (with its ``data`` folder)."""
    path = cache_dir / f"{PARTIAL}{key}-{secrets.token_hex(3)}"
    # Private to swapd's user, whose backends read it: a copy is never more readable than
    # its source, whose folders may keep it from others whatever the file's own mode.
    path.mkdir(mode=0o700)
    (path / DATA).mkdir()
    return path


def publish(partial: Path, manifest: Manifest, cache_dir: Path) -> None:
    """Write the manifest and rename the finished ``partial`` to its key; nothing is fsynced.

    ``manifest`` should carry ``unsynced_boot`` until :func:`sync` has run. A stale directory
    under the same key (one the index dropped) is moved aside first: a rename never replaces
    a non-empty directory.
    """
    target = partial / MANIFEST
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, manifest.to_json().encode())
    finally:
        os.close(fd)
    final = cache_dir / manifest.key
    try:
        partial.rename(final)
    except OSError as exc:
        if exc.errno not in {errno.ENOTEMPTY, errno.EEXIST}:
            raise
        stale = detach(cache_dir, manifest.key)
        partial.rename(final)
        if stale is not None:
            remove(stale)


def sync(cache_dir: Path, key: str, cancel: threading.Event) -> bool:
    """Make a published entry durable, then mark it synced; False if it has gone.

    Everything after the first open goes through the entry's directory descriptor, so an
    eviction that renames the entry meanwhile cannot make this mark another copy synced.
    ``cancel`` stops it between files (raising Cancelled); an fsync error raises OSError.
    """
    try:
        entry_fd = os.open(cache_dir / key, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False
    try:
        for _, _, files, dir_fd in os.fwalk(DATA, dir_fd=entry_fd):
            for name in files:
                if cancel.is_set():
                    raise Cancelled
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.fsync(dir_fd)
        os.fsync(entry_fd)  # its "data" name
        fsync_dir(cache_dir)  # the rename that published it
        _rewrite(entry_fd, lambda m: replace(m, unsynced_boot=None))
        os.fsync(entry_fd)
    finally:
        os.close(entry_fd)
    return True


def record_digest(cache_dir: Path, key: str, sha256: str) -> None:
    """Add a digest learned later to an entry's manifest, atomically, keeping its last use.

    Does nothing if the entry has gone meanwhile.
    """
    with contextlib.suppress(FileNotFoundError):
        entry_fd = os.open(cache_dir / key, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _rewrite(entry_fd, lambda m: replace(m, sha256=sha256))
        finally:
            os.close(entry_fd)


def _rewrite(entry_fd: int, change: Callable[[Manifest], Manifest]) -> None:
    """Replace an entry's manifest by ``change(manifest)``, atomically, keeping its mtime."""
    with _REWRITE:
        fd = os.open(MANIFEST, os.O_RDONLY, dir_fd=entry_fd)
        with os.fdopen(fd, encoding="utf-8") as file:
            used = os.fstat(fd).st_mtime_ns
            manifest = change(Manifest.from_json(file.read()))
        tmp = f"{MANIFEST}.{secrets.token_hex(3)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=entry_fd)
        try:
            try:
                _write_all(fd, manifest.to_json().encode())
                os.fsync(fd)  # whole before its name replaces the old manifest
                os.utime(fd, ns=(used, used))
            finally:
                os.close(fd)
            os.replace(tmp, MANIFEST, src_dir_fd=entry_fd, dst_dir_fd=entry_fd)
        except BaseException:
            # A full disk, say: the half-written manifest goes, the old one stays.
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=entry_fd)
            raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def touch(cache_dir: Path, key: str, when_ns: int) -> None:
    """Record an entry's last use as its manifest's mtime (kept across restarts)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(cache_dir / key / MANIFEST, ns=(when_ns, when_ns))


def detach(cache_dir: Path, key: str) -> Path | None:
    """Take an entry out of the cache at once (a rename); where it now is, for :func:`remove`."""
    trash = cache_dir / f"{EVICTED}{key}-{secrets.token_hex(3)}"
    try:
        (cache_dir / key).rename(trash)
    except FileNotFoundError:
        return None
    return trash


def remove(path: Path) -> None:
    """Delete a detached entry or a leftover; what cannot be deleted now goes at the next load."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
