"""Copying a model file or a model directory fast, in the calling thread.

The kernel copies (``copy_file_range``, the call ``cp`` makes) and the bytes never enter
Python. Where that call is not supported (``EXDEV`` across file systems on older kernels,
``ENOSYS``, ``EOPNOTSUPP``), ``sendfile`` and then plain reads and writes take over from where
it stopped. A SHA-256, when asked for, is computed by a second thread over what was just
written (mapped from the page cache, not read again) while the kernel copies the next chunk,
so with a core free a copy with a checksum takes about as long as the slower of the two, not
their sum.

A copy is not fsynced here, and no write-back is started while it runs: like ``cp``, it
returns with its data in the page cache. Starting write-back chunk by chunk
(``sync_file_range``) made a copy 1.4x slower on a disk shared with the source, because the
writes then compete with the reads. :mod:`swapd._cache_dir` makes the copy durable later,
off the request path.

Nothing here knows about the cache: :mod:`swapd.staging` decides where copies go.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from swapd.gguf_split import split_parts

# One kernel call per chunk: large enough that the calls cost nothing, small enough that
# progress and cancellation are noticed several times a second.
CHUNK = 64 * 1024 * 1024
# The hasher may trail the copy by this much, so what it hashes is still in the page cache.
_HASH_LAG = 8 * CHUNK
# A checked copy's first chunk: the hasher starts once it is written, so a small one lets
# the hash, the slower of the two on most CPUs, start about 30 ms sooner per copy.
_FIRST_HASHED = 4 * 1024 * 1024
_BUFFER = 8 * 1024 * 1024
# What a file system answers when it cannot do a copy method at all (rather than failing).
_UNSUPPORTED = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})

Report = Callable[[int], None]


class Cancelled(Exception):
    """The copy was asked to stop; what it wrote is left for the caller to remove."""


@dataclass(frozen=True)
class Source:
    """What a source held when it was scanned: its kind, bytes, files and fingerprint.

    For a directory, ``files`` lists every regular file below it (symbolic links followed)
    relative to it and ``dirs`` every directory, parents first, both without hidden names
    (``.git``, ``.cache``), which no backend loads; ``size`` is their sum. For a
    file, ``files`` is ``(("", size),)``. ``fingerprint`` changes when the source does: a
    file's size, mtime and inode (a file replaced by a rename may keep the other two), or for
    a directory a digest of every file's path, size, mtime and inode.
    """

    path: Path
    is_dir: bool
    size: int
    fingerprint: str
    files: tuple[tuple[str, int], ...]
    dirs: tuple[str, ...] = ()
    # A split GGUF's other shards (names beside ``path``, sizes): copied along with it.
    siblings: tuple[tuple[str, int], ...] = ()


def scan(path: Path) -> Source:
    """Stat a file, or walk a directory; ``OSError`` if unreadable or of another kind."""
    st = path.stat()
    if stat.S_ISREG(st.st_mode):
        stamp = f"file {st.st_size} {st.st_mtime_ns} {st.st_ino}"
        siblings = []
        for part in split_parts(path)[1:]:
            info = part.stat()
            siblings.append((part.name, info.st_size))
            stamp += f" {part.name} {info.st_size} {info.st_mtime_ns} {info.st_ino}"
        return Source(
            path,
            is_dir=False,
            size=st.st_size + sum(n for _, n in siblings),
            fingerprint=stamp,
            files=(("", st.st_size),),
            siblings=tuple(siblings),
        )
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EINVAL, "neither a regular file nor a directory", str(path))
    files: list[tuple[str, int]] = []
    dirs: list[str] = []
    listing = hashlib.sha256()
    # Each folder with the folders above it: a link back up would loop forever, while a
    # folder reached twice side by side (a link to a sibling) is copied under both names.
    pending: list[tuple[str, frozenset[tuple[int, int]]]] = [
        ("", frozenset({(st.st_dev, st.st_ino)}))
    ]
    while pending:
        rel, above = pending.pop()
        for item in sorted(os.scandir(path / rel), key=lambda e: e.name):
            if item.name.startswith("."):
                continue  # a git-lfs clone's second copy (.git), a download's .cache: not weights
            child = f"{rel}/{item.name}" if rel else item.name
            st = item.stat()  # follows symbolic links: the copy holds the bytes, not links
            if stat.S_ISREG(st.st_mode):
                files.append((child, st.st_size))
                listing.update(f"{child}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
            elif stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in above:
                dirs.append(child)
                pending.append((child, above | {(st.st_dev, st.st_ino)}))
                listing.update(f"{child}/\n".encode())
            elif not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EINVAL, "neither a regular file nor a directory", item.path)
    size = sum(n for _, n in files)
    stamp = f"dir {size} {listing.hexdigest()[:32]}"
    return Source(
        path, is_dir=True, size=size, fingerprint=stamp, files=tuple(files), dirs=tuple(dirs)
    )


def copy(
    source: Source, dest: Path, *, sha256: bool, report: Report, cancel: threading.Event
) -> tuple[int, str | None]:
    """Copy ``source`` to ``dest`` (which must not exist); nothing is fsynced.

    Returns the bytes copied and, with ``sha256`` and a file source, the digest of what was
    written. ``report(bytes_done)`` is called after every chunk, from this thread.
    """
    if not source.is_dir:
        first = source.files[0][1]
        done, digest = _copy_file(
            source.path, dest, first, sha256=sha256, report=report, cancel=cancel
        )
        shards = [
            (source.path.with_name(n), dest.with_name(n), size) for n, size in source.siblings
        ]
        return _copy_files(shards, done, report, cancel), digest
    dest.mkdir()
    for rel in source.dirs:
        (dest / rel).mkdir()
    files = [(source.path / rel, dest / rel, size) for rel, size in source.files]
    return _copy_files(files, 0, report, cancel), None


def _copy_files(
    files: Sequence[tuple[Path, Path, int]], done: int, report: Report, cancel: threading.Event
) -> int:
    """Copy each (from, to, size) in turn, with no checksum; ``done`` counts on from there."""
    for source, dest, size in files:
        copied, _ = _copy_file(
            source, dest, size, sha256=False, report=_after(done, report), cancel=cancel
        )
        done += copied
    return done


def hash_file(
    path: Path, cancel: threading.Event | None = None, report: Report | None = None
) -> str:
    """The SHA-256 of a file, read in large blocks; ``report(bytes_done)`` after each."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_BUFFER))
    done = 0
    if report is not None:
        report(0)
    with path.open("rb", buffering=0) as file:
        while n := file.readinto(buffer):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            digest.update(buffer[:n])
            done += n
            if report is not None:
                report(done)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the names in a directory durable (a rename is not until its directory is synced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _after(base: int, report: Report) -> Report:
    """A report for one file of a tree, counting the files before it."""
    return lambda done: report(base + done)


def _copy_file(  # noqa: PLR0913 - each is a separate fact of one copy
    src: Path, dst: Path, size: int, *, sha256: bool, report: Report, cancel: threading.Event
) -> tuple[int, str | None]:
    src_fd = os.open(src, os.O_RDONLY)
    try:
        # No wider than the source (a private model stays private, also one reached by a
        # link out of its folder), never wider than 0644, and readable by its owner, whose
        # backends read it. Read back by the hasher, so opened for reading too.
        mode = (os.fstat(src_fd).st_mode & 0o644) | 0o600
        dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # as cp does
            hasher = _Hasher(dst_fd) if sha256 else None
            try:
                done = copy_fd(src_fd, dst_fd, size, report=report, cancel=cancel, hasher=hasher)
            except BaseException:
                if hasher is not None:
                    hasher.abort()
                raise
            digest = hasher.finish() if hasher is not None else None
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return done, digest


def copy_fd(  # noqa: PLR0913 - each is a separate fact of one copy
    src_fd: int,
    dst_fd: int,
    size: int,
    *,
    report: Report,
    cancel: threading.Event,
    hasher: _Hasher | None = None,
    methods: Sequence[str] = ("copy_file_range", "sendfile", "read"),
) -> int:
    """Copy up to ``size`` bytes from the files' current offsets; the bytes copied.

    Fewer than ``size`` means the source ended early. ``methods`` are tried in order; a
    method the file system does not support hands over to the next at the same offset.
    """
    done = 0
    buffer = memoryview(bytearray(_BUFFER if "read" in methods else 0))
    remaining = list(methods)
    # Doubling from a small first chunk when hashing, so the hasher has work early.
    step = _FIRST_HASHED if hasher is not None else CHUNK
    while done < size and remaining:
        if cancel.is_set():
            raise Cancelled
        method = remaining[0]
        try:
            n = _chunk(method, src_fd, dst_fd, min(step, size - done), buffer)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED or method == "read":
                raise
            n = -1
        # Some file systems answer 0 at the very start instead of an error; any other 0,
        # or one from plain reads, is the end of the source.
        if n < 0 or (n == 0 and done == 0 and method != "read"):
            remaining.pop(0)
            continue
        if n == 0:
            break
        done += n
        step = min(2 * step, CHUNK)
        if hasher is not None:
            hasher.advance(done)
        report(done)
    return done


def _chunk(method: str, src_fd: int, dst_fd: int, want: int, buffer: memoryview) -> int:
    if method == "copy_file_range":
        return os.copy_file_range(src_fd, dst_fd, want)
    if method == "sendfile":
        return os.sendfile(dst_fd, src_fd, None, want)
    return _read_write(src_fd, dst_fd, buffer, want)


def _read_write(src_fd: int, dst_fd: int, buffer: memoryview, want: int) -> int:
    total = 0
    while total < want:
        n = os.readv(src_fd, [buffer[: min(len(buffer), want - total)]])
        if n == 0:
            break
        written = 0
        while written < n:
            written += os.write(dst_fd, buffer[written:n])
        total += n
    return total


class _Hasher:
    """A thread that hashes what the copy has written so far, mapping it from the file.

    ``advance`` lets the copy run at most ``_HASH_LAG`` bytes ahead, so that what is hashed
    is still in the page cache and the source is read from its slow storage once.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._digest = hashlib.sha256()
        self._written = 0
        self._hashed = 0
        self._finished = False
        self._aborted = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="swapd-hash", daemon=True)
        self._thread.start()

    def advance(self, written: int) -> None:
        """The copy has written ``written`` bytes; wait while the hasher is too far behind."""
        with self._cond:
            self._written = written
            self._cond.notify_all()
            while written - self._hashed > _HASH_LAG and self._error is None:
                self._cond.wait()

    def finish(self) -> str:
        """Hash the rest of what was written; the hex digest."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Stop at once: the copy failed, so its digest is not wanted."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        try:
            self._hash_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the copying thread by finish()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _hash_all(self) -> None:
        while True:
            with self._cond:
                while self._hashed == self._written and not self._finished:
                    if self._aborted:
                        return
                    self._cond.wait()
                if self._aborted or self._hashed == self._written:
                    return
                offset, end = self._hashed, self._written
            # Outside the lock, so the copy goes on: hashing releases the GIL. The pages are
            # mapped rather than read, which saves copying every byte once more.
            n = min(end - offset, CHUNK)
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            with (
                mmap.mmap(self._fd, offset + n - start, prot=mmap.PROT_READ, offset=start) as pages,
                memoryview(pages) as view,
            ):
                self._digest.update(view[offset - start :])
            with self._cond:
                self._hashed = offset + n
                self._cond.notify_all()
