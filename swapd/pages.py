"""Warm file pages: keep a stopped model's weights in the page cache, locked, for a fast restart.

The RAM tier of a llama-server model is its GGUF held by swapd: mapped read-only and shared,
read in, and locked with ``mlock``. llama-server maps the same file, so its next start finds
every page in RAM instead of reading the disk. Closing the hold unlocks and unmaps; the pages
stay cached but the kernel may reclaim them (the ``disk`` tier). A vLLM model is a directory
of files, so :class:`WarmSet` holds every regular file under a directory (or one file).

Locking can fail: without ``CAP_IPC_LOCK`` a process may lock only ``RLIMIT_MEMLOCK`` bytes.
Then the hold keeps its mapping, with every page read in but unlocked, and says why in
``lock_error``; the pages still count, through :meth:`WarmFile.resident_bytes`.

:func:`drop_cache` does the opposite, for tests and benchmarks that need a cold start. The
kernel keeps pages that are locked, mapped by a process, or on tmpfs, whatever it is told.

Residency comes from ``mincore``. For a file that the caller neither owns nor may write,
the kernel reports only the pages mapped in the caller, so such counts may read low.

Everything here blocks (reading gigabytes, page-table walks): callers on the event loop run
it with ``asyncio.to_thread``. Do not close a hold while another thread counts its pages.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import stat
import weakref
from pathlib import Path
from typing import NamedTuple, Self

from swapd.gguf_split import split_parts

_PAGE = mmap.PAGESIZE
# Populates the page tables, reading what is missing (Linux 5.14); older kernels answer EINVAL.
_MADV_POPULATE_READ = 22
# mincore takes one byte per page: walk large files a GiB of pages at a time.
_MINCORE_PAGES = (1 << 30) // _PAGE
# Bit 0 of each mincore byte says "resident"; the others are reserved.
_RESIDENT_BIT = bytes(value & 1 for value in range(256))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
for _call in (_libc.munmap, _libc.mlock, _libc.munlock):
    _call.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_libc.statfs.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
_MAP_FAILED = ctypes.c_void_p(-1).value
# Filesystems whose files live in RAM (statfs's f_type, its first field): nothing to hold.
_IN_MEMORY_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}


# (device, inode, size, mtime in ns) of a file as opened; None where not known.
Identity = tuple[int, int, int, int] | None
# (device, inode): one file whatever its name (a symbolic or hard link to it).
FileId = tuple[int, int]


def _identity(info: os.stat_result) -> Identity:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class Dropped(NamedTuple):
    """Bytes of a path in the page cache before and after :func:`drop_cache`."""

    before: int
    after: int


class WarmFile:
    """One file mapped, read in and (when the limit allows) locked. Create it with :meth:`open`."""

    def __init__(self, path: Path, size: int, address: int, identity: Identity = None) -> None:
        self.path = path
        self.size = size
        # The file as it was opened (device, inode, size, mtime): see :meth:`changed`.
        self.identity = identity
        self.locked = False
        self.lock_error: str | None = None
        self._address = address
        # Unmaps on close, or when the hold is collected without one, exactly once.
        self._release = weakref.finalize(self, _unmap, address, size)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> WarmFile:
        """Map ``path``, read every page in and lock it; blocks until the pages are in RAM.

        A failed lock does not raise: see ``locked`` and ``lock_error``. A missing file raises
        ``FileNotFoundError`` and a directory ``IsADirectoryError`` (use :class:`WarmSet`).
        """
        path = Path(path)
        fd, size = _open_regular(path)
        try:
            warm = cls(path, size, _map(fd, size), _identity(os.fstat(fd)))
            try:
                warm._warm(fd)
            except BaseException:
                warm.close()
                raise
        finally:
            os.close(fd)
        return warm

    def _warm(self, fd: int) -> None:
        if not self.size:
            self.locked = True  # nothing to lock
            return
        # Start readahead over the whole file; mlock then waits for it page by page.
        _libc.madvise(self._address, self.size, mmap.MADV_WILLNEED)
        if _libc.mlock(self._address, self.size) == 0:
            self.locked = True
            return
        code = ctypes.get_errno()
        # A failed mlock can leave the mapping marked locked (a file shorter than it):
        # the kernel would count it against RLIMIT_MEMLOCK with nothing held.
        _libc.munlock(self._address, self.size)
        self.lock_error = _lock_error(code, self.size, os.fstat(fd).st_size)
        if _libc.madvise(self._address, self.size, _MADV_POPULATE_READ) != 0:
            _read_through(fd, self.size)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return not self._release.alive

    def changed(self) -> str | None:
        """Why the file at ``path`` is no longer the one held (deleted, replaced, rewritten).

        A next start would map the file at the path, not these pages: holding them is of
        no use, and a deleted file's space is not freed while they are held.
        """
        try:
            now = _identity(self.path.stat())
        except OSError as exc:
            return f"{self.path}: {exc.strerror or exc}"
        if self.identity is None or now == self.identity:
            return None
        return f"{self.path} was replaced or rewritten since its pages were taken"

    def resident_bytes(self) -> int:
        """Bytes of the file in RAM now."""
        if self.closed:
            raise ValueError(f"{self.path}: resident_bytes() on a closed WarmFile")
        return _resident(self._address, self.size)

    def close(self) -> None:
        """Unlock and unmap: the pages stay cached, but the kernel may reclaim them. Idempotent."""
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "locked" if self.locked else "unlocked"
        return f"<WarmFile {self.path} {self.size} bytes {state}>"


class WarmSet:
    """A :class:`WarmFile` for each regular file under a directory, or for one file.

    Symbolic links to files are followed (a model directory often links to shared blobs) and
    a file reached twice is held once; links to directories are not followed.
    """

    def __init__(self, path: Path, files: tuple[WarmFile, ...]) -> None:
        self.path = path
        self.files = files

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> WarmSet:
        """Hold every file under ``path`` as :meth:`WarmFile.open` does; blocks likewise."""
        path = Path(path)
        files: list[WarmFile] = []
        try:
            files.extend(WarmFile.open(file) for file in _files_under(path))
        except BaseException:
            for file in files:
                file.close()
            raise
        return cls(path, tuple(files))

    @property
    def size(self) -> int:
        """Bytes of all the files."""
        return sum(file.size for file in self.files)

    @property
    def locked(self) -> bool:
        """Whether every file is locked."""
        return all(file.locked for file in self.files)

    @property
    def locked_bytes(self) -> int:
        """Bytes of the files that are locked: the limit may run out part-way through a set."""
        return sum(file.size for file in self.files if file.locked)

    @property
    def lock_error(self) -> str | None:
        """Why some files are not locked, or None when all are."""
        failed = [file for file in self.files if file.lock_error]
        if not failed:
            return None
        first = f"{failed[0].path}: {failed[0].lock_error}"
        return f"{len(failed)} of {len(self.files)} files not locked; {first}"

    def resident_bytes(self) -> int:
        """Bytes of all the files in RAM now."""
        return sum(file.resident_bytes() for file in self.files)

    @property
    def file_id(self) -> FileId | None:
        """The first file's (device, inode) as opened: what :func:`file_id` of its path said."""
        identity = self.files[0].identity if self.files else None
        return None if identity is None else identity[:2]

    def changed(self) -> str | None:
        """Why a held file is no longer the one at its path, or None (one stat each)."""
        return next((why for file in self.files if (why := file.changed()) is not None), None)

    def close(self) -> None:
        """Close every file. Idempotent."""
        for file in self.files:
            file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def resident_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of every file under a directory, in the page cache now."""
    total = 0
    for file in _files_under(Path(path)):
        fd, size = _open_regular(file)
        try:
            total += _resident_fd(fd, size)
        finally:
            os.close(fd)
    return total


def file_id(path: str | os.PathLike[str]) -> FileId | None:
    """(device, inode) of the file at ``path``, links followed; None where it cannot be read."""
    try:
        info = Path(path).stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def memory_fs(path: str | os.PathLike[str]) -> str | None:
    """``tmpfs`` or ``ramfs`` when the file at ``path`` lives in RAM already; else None.

    Its pages are never read from a disk, and the kernel does not count them as available:
    held in the ram tier they would be counted twice against host RAM, for no faster start.
    """
    buf = ctypes.create_string_buffer(256)  # struct statfs: 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return _IN_MEMORY_FS.get(ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF)


def drop_cache(path: str | os.PathLike[str]) -> Dropped:
    """Ask the kernel to drop a file's (or a directory's) cached pages, for a cold start.

    Pages that are locked or mapped by any process (a :class:`WarmFile`, a running backend)
    stay, and so does anything on tmpfs; compare ``after`` with zero to know.
    """
    before = after = 0
    for file in _files_under(Path(path)):
        fd, size = _open_regular(file)
        try:
            before += _resident_fd(fd, size)
            # Dirty pages are written back, never dropped: write them first. A clean file
            # has nothing to write, so this is free for model weights.
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            after += _resident_fd(fd, size)
        finally:
            os.close(fd)
    return Dropped(before, after)


def _files_under(path: Path) -> list[Path]:
    if not path.is_dir():
        return split_parts(path)  # opening it reports a missing path
    seen: set[tuple[int, int]] = set()
    files: list[Path] = []
    for root, dirs, names in os.walk(path, onerror=_raise):
        dirs.sort()
        for name in sorted(names):
            file = Path(root, name)
            try:
                info = file.stat()
            except FileNotFoundError:
                continue  # a dangling link has no pages to warm
            if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                files.append(file)
    return files


def _raise(error: OSError) -> None:
    raise error


def _open_regular(path: Path) -> tuple[int, int]:
    # O_NONBLOCK: opening a FIFO by mistake must not hang; regular files ignore it.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        return fd, info.st_size
    os.close(fd)
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "a directory: hold it with WarmSet", str(path))
    raise OSError(errno.EINVAL, "not a regular file", str(path))


def _map(fd: int, size: int) -> int:
    # libc's mmap, not mmap.mmap: a read-only mmap.mmap exposes no address for mlock, and a
    # private writable one would make mlock copy every page instead of locking the cache.
    if not size:
        return 0
    address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, _MAP_FAILED):
        raise _os_error("mmap")
    return int(address)


def _unmap(address: int, size: int) -> None:
    if size:
        _libc.munlock(address, size)
        _libc.munmap(address, size)


def _resident_fd(fd: int, size: int) -> int:
    address = _map(fd, size)
    try:
        return _resident(address, size)
    finally:
        _unmap(address, size)


def _resident(address: int, size: int) -> int:
    pages = -(-size // _PAGE)
    resident = 0
    last = b"\0"
    for first in range(0, pages, _MINCORE_PAGES):
        count = min(_MINCORE_PAGES, pages - first)
        vector = ctypes.create_string_buffer(count)
        if _libc.mincore(address + first * _PAGE, count * _PAGE, vector) != 0:
            raise _os_error("mincore")
        bits = vector.raw.translate(_RESIDENT_BIT)
        resident += bits.count(1)
        last = bits[-1:]
    # The last page is only partly the file's.
    return resident * _PAGE - (pages * _PAGE - size if last == b"\1" else 0)


def _read_through(fd: int, size: int) -> None:
    # The fallback read where MADV_POPULATE_READ is missing: read, not touch the mapping,
    # so a file truncated meanwhile ends the loop instead of raising SIGBUS.
    buffer = bytearray(1 << 20)
    offset = 0
    while offset < size and (got := os.preadv(fd, [buffer], offset)):
        offset += got


def _lock_error(code: int, size: int, now: int) -> str:
    """Why ``size`` bytes could not be locked; the limit named only where it is the cause."""
    message = f"mlock failed: {os.strerror(code)}"
    if now < size:
        return f"{message} (the file shrank to {_size(now)} while it was mapped)"
    limit, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if code not in (errno.ENOMEM, errno.EPERM) or limit == resource.RLIM_INFINITY:
        return message
    held = _status_field("VmLck:") * 1024
    if held + size <= limit or _status_field("CapEff:", 16) & _CAP_IPC_LOCK:
        return message  # within the limit, or not bound by it: not what refused it
    already = f", {_size(held)} already locked" if held else ""
    return (
        f"{message} (RLIMIT_MEMLOCK is {_size(limit)}{already}, this file needs {_size(size)};"
        " raise LimitMEMLOCK= in the unit)"
    )


_CAP_IPC_LOCK = 1 << 14  # locks as much as it likes, whatever RLIMIT_MEMLOCK says


def _status_field(name: str, base: int = 10) -> int:
    """A number from /proc/self/status (VmLck: in kB; CapEff: a hex mask); 0 if unreadable."""
    try:
        with Path("/proc/self/status").open() as status:
            for line in status:
                if line.startswith(name):
                    return int(line.split()[1], base)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value.is_integer() else f"{value:.1f} {unit}"
    return f"{nbytes} bytes"


def _os_error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call} failed: {os.strerror(code)}")
