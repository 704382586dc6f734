"""The staging cache on disk: one directory per complete entry, published by one rename.

    cache_dir/
    ├── .lock                       flock held by the swapd that owns the cache
    ├── 3f9a…e1/                    a complete entry, named by its key
    │   ├── entry.json              what it is a copy of (source, size, fingerprint, sha256);
    │   │                           its mtime is the entry's last use
    │   └── data/qwen.gguf          the copy, under the source's own name
    ├── .partial-77c0…-a1b2c3/      a copy in progress (or cut short by a crash)
    └── .evicted-3f9a…e1-d4e5f6/    an entry being deleted

An entry is built under a ``.partial-`` name: data, then ``entry.json``, everything fsynced,
then one ``rename`` to its key. So a directory named by a key is complete, whatever point a
crash hit, and whatever carries a dot-prefixed name is a leftover that :func:`load` deletes.
Eviction renames first, so an entry disappears at once and its deletion may take its time.
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
from dataclasses import dataclass, replace
from pathlib import Path

from swapd._copy import fsync_dir, scan

MANIFEST = "entry.json"
DATA = "data"
PARTIAL = ".partial-"
EVICTED = ".evicted-"
_LOCK = ".lock"
_KEY = re.compile(r"[0-9a-f]{32}")
_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """What a complete entry is a copy of, as written in its ``entry.json``."""

    source: str
    is_dir: bool
    size: int
    fingerprint: str
    sha256: str | None

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
        fields = {"version": _VERSION, "source": self.source, "kind": kind}
        fields |= {"size": self.size, "fingerprint": self.fingerprint, "sha256": self.sha256}
        return json.dumps(fields, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; ``ValueError`` (or ``KeyError``/``TypeError``) if it is not one."""
        raw = json.loads(text)
        if raw["version"] != _VERSION or raw["kind"] not in {"file", "dir"}:
            raise ValueError("unknown manifest version or kind")
        sha = raw["sha256"]
        return cls(
            source=str(raw["source"]),
            is_dir=raw["kind"] == "dir",
            size=int(raw["size"]),
            fingerprint=str(raw["fingerprint"]),
            sha256=None if sha is None else str(sha),
        )


def key_of(source: str, fingerprint: str) -> str:
    """An entry's key: a changed source (another fingerprint) gets a new key, so a new copy."""
    return hashlib.sha256(f"{source}\0{fingerprint}".encode()).hexdigest()[:32]


def data_path(cache_dir: Path, key: str, name: str) -> Path:
    """Where an entry's copy lives once it is complete."""
    return cache_dir / key / DATA / name


def lock(cache_dir: Path) -> int:
    """Create the cache directory and hold its lock; ``BlockingIOError`` if another holds it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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


def load(cache_dir: Path) -> tuple[dict[str, tuple[Manifest, int]], list[str]]:
    """Delete leftovers and invalid entries; the complete ones with their last use (ns).

    Returns the entries by key and the names deleted, with the reason for each.
    """
    entries: dict[str, tuple[Manifest, int]] = {}
    removed: list[str] = []
    for path in sorted(cache_dir.iterdir()):
        name = path.name
        if name.startswith((PARTIAL, EVICTED)):
            remove(path)
            removed.append(f"{name} (interrupted copy or deletion)")
        elif _KEY.fullmatch(name):
            problem = _check(path)
            if isinstance(problem, str):
                remove(path)
                removed.append(f"{name} ({problem})")
            else:
                entries[name] = problem
    return entries, removed


def _check(path: Path) -> tuple[Manifest, int] | str:
    """An entry's manifest and last use, or why it cannot be trusted."""
    try:
        manifest = Manifest.from_json((path / MANIFEST).read_text())
        last_used = (path / MANIFEST).stat().st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest: {exc}"
    if manifest.key != path.name:
        return "manifest does not match the entry's name"
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
    (path / DATA).mkdir(parents=True)
    return path


def publish(partial: Path, manifest: Manifest, cache_dir: Path) -> None:
    """Write the manifest and rename the finished ``partial`` to its key, durably.

    The data must already be fsynced. A stale directory under the same key (one the index
    dropped) is moved aside first: a rename never replaces a non-empty directory.
    """
    target = partial / MANIFEST
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, manifest.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(partial / DATA)
    fsync_dir(partial)
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
    fsync_dir(cache_dir)


def record_digest(cache_dir: Path, key: str, sha256: str) -> None:
    """Add a digest learned later to an entry's manifest, atomically, keeping its last use.

    Does nothing if the entry has gone meanwhile.
    """
    entry = cache_dir / key
    with contextlib.suppress(FileNotFoundError):
        used = (entry / MANIFEST).stat().st_mtime_ns
        manifest = replace(Manifest.from_json((entry / MANIFEST).read_text()), sha256=sha256)
        tmp = entry / f"{MANIFEST}.{secrets.token_hex(3)}"
        tmp.write_text(manifest.to_json())
        os.utime(tmp, ns=(used, used))
        tmp.replace(entry / MANIFEST)


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
