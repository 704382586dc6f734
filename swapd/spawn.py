"""Start a backend process without forking swapd.

A loop's subprocess support forks swapd (uvloop always; asyncio when given a
``preexec_fn``), copying the page tables of a 60 MB process: 4-5 ms with the
event loop stopped, on every start and so on every swap. ``subprocess.Popen``
without a ``preexec_fn`` uses vfork and takes 0.25 ms. What the ``preexec_fn``
did is done otherwise:

* the parent-death signal: ``setpriv --pdeathsig KILL`` (util-linux) sets it
  and execs the backend, which keeps it across that exec (a swapd killed in the
  first milliseconds, before setpriv has set it, leaves the backend to the
  reaper, which swapd tells of the group as soon as it is spawned);
* only stdin, stdout and stderr pass: ``close_fds`` closes every other
  descriptor in the child;
* the exit: a pidfd in the event loop says when to reap, with no child watcher.

Where ``setpriv`` or ``pidfd_open`` is missing, the loop's own forking path is
used, with a ``preexec_fn`` that does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol

from swapd.logs import get_logger

_PR_SET_PDEATHSIG = 1
_LAST_STDIO_FD = 2
_OUTPUT_LIMIT = 1 << 16
_log = get_logger("swapd.spawn")


class Spawned(Protocol):
    """A started process: its pid, its output, its exit."""

    @property
    def pid(self) -> int:
        """The process id (also its process group id: it leads its own session)."""

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped; negative for a signal."""

    @property
    def stdout(self) -> asyncio.StreamReader:
        """Its stdout and stderr, merged."""

    async def wait(self) -> int:
        """Wait until it has exited and been reaped; return the exit status."""

    def close_output(self) -> None:
        """Stop reading its output and close swapd's end of the pipe."""


def _prepare_child() -> None:  # pragma: no cover - forked child
    """Die with swapd, pass only stdin, stdout and stderr (the forking path).

    Some event loops (uvloop) leave copies of swapd's own descriptors open in the
    child; a daemonizing helper would then hold swapd's output socket forever.
    Marking them close-on-exec, rather than closing them, keeps the loop's own
    exec-error pipe working.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for entry in Path("/proc/self/fd").iterdir():
        fd = int(entry.name)
        if fd > _LAST_STDIO_FD:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)  # noqa: FBT003 - os takes it positionally


_death_prefix: tuple[str, ...] | None = None


def _find_death_prefix() -> tuple[str, ...] | None:
    """``setpriv --pdeathsig KILL --`` if this host's setpriv has it and pidfds work; else ().

    None when the check itself did not finish (a host too busy to run setpriv within
    its timeout): nothing is known, and the next start checks again.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or not hasattr(os, "pidfd_open"):
        return ()
    prefix = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        os.close(os.pidfd_open(os.getpid()))
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return None
    except (OSError, subprocess.SubprocessError):
        return ()
    return prefix if done.returncode == 0 else ()


async def death_prefix() -> tuple[str, ...]:
    """The exec prefix that sets the parent-death signal; () where the fast path is missing."""
    global _death_prefix  # noqa: PLW0603 - found once per process, on the first spawn
    if _death_prefix is None:
        found = await asyncio.to_thread(_find_death_prefix)
        if found is None:
            _log.warning("spawn.mode", mode="fork", detail="setpriv check timed out: checked again")
            return ()
        _death_prefix = found
        if found:
            _log.info("spawn.mode", mode="vfork", death_signal="setpriv")
        else:
            _log.warning(
                "spawn.mode",
                mode="fork",
                detail="setpriv --pdeathsig or pidfd_open is missing: each start forks swapd",
            )
    return _death_prefix


class _PidfdProcess:
    """A process started with vfork; its exit arrives as a readable pidfd."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        pidfd: int,
        stdout: asyncio.StreamReader,
        transport: asyncio.ReadTransport,
    ) -> None:
        self._popen = popen
        self._stdout = stdout
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = pidfd
        loop.add_reader(pidfd, self._on_exit)  # readable once it has exited

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    @property
    def stdout(self) -> asyncio.StreamReader:
        return self._stdout

    def _on_exit(self) -> None:
        code = self._popen.poll()  # waitpid(WNOHANG): it has exited, so this reaps it
        if code is None:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def close_output(self) -> None:
        self._transport.close()


class _LoopProcess:
    """A process started by the event loop's own (forking) subprocess support."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def stdout(self) -> asyncio.StreamReader:
        assert self._proc.stdout is not None  # noqa: S101 - always spawned with a pipe
        return self._proc.stdout

    async def wait(self) -> int:
        return await self._proc.wait()

    def close_output(self) -> None:
        # Its stdout pipe only: closing the whole transport would kill a live process.
        transport = self._proc._transport  # type: ignore[attr-defined]  # noqa: SLF001 - no public way to close the pipes
        pipe = transport.get_pipe_transport(1)
        if pipe is not None:
            pipe.close()


async def spawn(argv: Sequence[str], env: Mapping[str, str]) -> Spawned:
    """Start ``argv`` in its own session, output piped, dying with swapd.

    Raises :class:`OSError` when the program cannot be executed, on either path.
    """
    prefix = await death_prefix()
    if prefix:
        # setpriv would report it as an exit (126, 127) in its own words: say it as the
        # forking path does. One stat per start; a file changed in between is still
        # caught by setpriv.
        _check_executable(os.fspath(argv[0]), env.get("PATH", os.defpath))
    if not prefix:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_prepare_child,
        )
        return _LoopProcess(proc)
    # vfork + exec: 0.25 ms on the loop, against 4-5 ms for the loop's fork.
    popen = subprocess.Popen(  # noqa: ASYNC220 - blocks only for the vfork
        [*prefix, *argv],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    pidfd: int | None = None
    transport: asyncio.ReadTransport | None = None
    assert popen.stdout is not None  # noqa: S101 - spawned with a pipe
    pipe: IO[bytes] = popen.stdout
    try:
        pidfd = os.pidfd_open(popen.pid)
        loop = asyncio.get_running_loop()
        pipe = closed_once(popen.stdout, loop)
        reader = asyncio.StreamReader(limit=_OUTPUT_LIMIT, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe
        )
        return _PidfdProcess(popen, pidfd, reader, transport)
    except BaseException:
        # Never leave a started process behind untracked, cancelled or not, nor its fds.
        if pidfd is not None:
            os.close(pidfd)
        if transport is not None:
            transport.close()
        else:
            # Its only owner under asyncio; under uvloop a copy owning nothing (libuv closes
            # the descriptor it opened, also when the connect fails), so never closed twice.
            pipe.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        raise


def closed_once(stdout: IO[bytes], loop: asyncio.AbstractEventLoop) -> IO[bytes]:
    """The pipe as ``connect_read_pipe`` is to get it: its descriptor closed once, by it.

    uvloop's pipe transport closes the descriptor itself (libuv), then closes the file
    object it was given, which closes the same number again: whatever another thread
    opened meanwhile under that number (a /proc file an admission reading opens, a
    socket) is closed under it (uvloop issue 763). Under uvloop the transport gets a
    copy of the descriptor in a file object that does not own it, and the original is
    closed here, now, while nothing else holds its number.
    """
    if not type(loop).__module__.startswith("uvloop"):
        return stdout  # asyncio's transport closes the file object alone
    copy = os.dup(stdout.fileno())
    stdout.close()
    return open(copy, "rb", buffering=0, closefd=False)


def _check_executable(program: str, search: str) -> None:
    """Raise the :class:`OSError` that exec would for ``program``, looked up in ``search``."""
    if shutil.which(program, path=search) is not None:
        return
    if os.sep in program:
        candidates = [Path(program)]
    else:
        candidates = [Path(folder or ".") / program for folder in search.split(os.pathsep)]
    # There but not executable (or a directory): exec refuses it with EACCES.
    code = errno.EACCES if any(c.exists() for c in candidates) else errno.ENOENT
    raise OSError(code, os.strerror(code), program)
