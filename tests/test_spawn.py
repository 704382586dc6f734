"""Starting a backend without forking swapd: both paths keep the same guarantees."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import uvloop
from daemon import wait_for

from swapd import spawn
from swapd.process import Child
from swapd.ringlog import RingLog

T = TypeVar("T")

PATHS = ["vfork", "loop-fork"]
Runner = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    """Each test on asyncio's loop and on uvloop, which swapd runs on."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on the fast path (setpriv + pidfd) and on the loop's forking path."""
    if request.param == "vfork":
        prefix = spawn._find_death_prefix()
        if not prefix:
            pytest.fail("setpriv --pdeathsig or pidfd_open is missing: the fast path is untested")
        monkeypatch.setattr(spawn, "_death_prefix", prefix)
    else:
        monkeypatch.setattr(spawn, "_death_prefix", ())
    return str(request.param)


async def _run(argv: list[str]) -> tuple[int, str]:
    proc = await spawn.spawn(argv, dict(os.environ))
    out = await proc.stdout.read()
    proc.close_output()
    return await proc.wait(), out.decode()


@pytest.mark.usefixtures("path")
def test_exit_status_and_output_come_back(run: Runner[tuple[int, str]]) -> None:
    """stdout and stderr arrive merged on one pipe; the exit status comes from the reap."""
    code, out = run(_run(["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert code == 3
    assert out.split() == ["out", "err"]


@pytest.mark.usefixtures("path")
def test_a_signal_death_reads_as_a_negative_status(run: Runner[tuple[int, str]]) -> None:
    """As asyncio reports it: -N for a death by signal N."""
    code, _ = run(_run(["sh", "-c", "kill -9 $$"]))
    assert code == -signal.SIGKILL


@pytest.mark.usefixtures("path")
def test_the_child_leads_its_own_session(run: Runner[tuple[int, str]]) -> None:
    """Its pid is its session and process group: a stop signals the whole group."""
    code, out = run(_run(["sh", "-c", "cat /proc/$$/stat"]))
    pid = int(out.split()[0])
    pgid, sid = (int(x) for x in out.split(")")[1].split()[2:4])  # after comm: state ppid pgrp sid
    assert code == 0
    assert pid == sid == pgid


@pytest.mark.usefixtures("path")
def test_only_stdio_descriptors_pass(tmp_path: Path, run: Runner[tuple[int, str]]) -> None:
    """A descriptor swapd holds, even an inheritable one, never reaches a backend."""
    held = os.open(tmp_path / "held", os.O_CREAT | os.O_WRONLY)
    os.set_inheritable(held, True)  # noqa: FBT003 - os takes it positionally
    try:
        code, out = run(_run(["sh", "-c", "ls /proc/$$/fd"]))
    finally:
        os.close(held)
    assert code == 0
    assert sorted(int(fd) for fd in out.split()) == [0, 1, 2]


PARENT = textwrap.dedent(
    """
    import asyncio, os, sys
    from swapd import spawn
    if sys.argv[1] == "loop-fork":
        spawn._death_prefix = ()
    async def main():
        proc = await spawn.spawn(["sleep", "120"], dict(os.environ))
        print(f"child {proc.pid}", flush=True)
        await asyncio.sleep(120)
    asyncio.run(main())
    """
)


def test_the_child_dies_with_its_parent(path: str) -> None:
    """The parent-death signal: SIGKILL the parent (no reaper here) and the child goes too."""
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, path], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        lines = iter(parent.stdout.readline, "")
        child = next(int(line.split()[1]) for line in lines if line.startswith("child "))
        try:
            assert psutil.Process(child).ppid() == parent.pid
            # setpriv sets the signal and then execs: until the backend runs, a parent's
            # death is the reaper's to cover (tests/test_lifecycle.py), not this signal's.
            wait_for(lambda: psutil.Process(child).name() == "sleep", timeout=10)
            parent.kill()
            parent.wait()
            wait_for(lambda: not _alive(child), timeout=10)
        finally:
            if _alive(child):
                os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_program_that_cannot_run_is_reported(
    path: str, tmp_path: Path, run: Runner[tuple[int, str]]
) -> None:
    """Not executable, or not there: both paths raise what exec says, before any start."""
    del path  # both spawn paths
    script = tmp_path / "backend"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(PermissionError):
        run(_run([str(script)]))
    with pytest.raises(PermissionError):
        run(_run([str(tmp_path)]))  # a directory
    with pytest.raises(FileNotFoundError):
        run(_run([str(tmp_path / "missing")]))
    with pytest.raises(FileNotFoundError):
        run(_run(["swapd-no-such-program"]))


def test_a_program_is_looked_up_in_the_backends_path(tmp_path: Path) -> None:
    """The check searches the PATH the backend gets, as exec does, and skips what it cannot run."""
    blocked, runnable = tmp_path / "blocked", tmp_path / "runnable"
    for folder, mode in ((blocked, 0o644), (runnable, 0o755)):
        folder.mkdir()
        (folder / "backend").write_text("#!/bin/sh\n")
        (folder / "backend").chmod(mode)
    spawn._check_executable("backend", f"{blocked}:{runnable}")  # the second one runs
    with pytest.raises(PermissionError):
        spawn._check_executable("backend", str(blocked))
    with pytest.raises(FileNotFoundError):
        spawn._check_executable("backend", str(tmp_path))


def _open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.usefixtures("path")
def test_a_finished_backend_leaves_no_descriptor_open(run: Runner[int]) -> None:
    """Its output pipe and pidfd are closed once it has exited and its output is read.

    uvloop keeps a pipe open past its end of file until it is closed: ten backends
    left eleven descriptors behind before the pump closed it.
    """

    async def one() -> None:
        child = Child("m", ["sh", "-c", "echo hello"], dict(os.environ), ring=RingLog())
        await child.spawn()
        assert await child.wait_exit() == 0
        assert child.ring.tail() == ["hello"]

    async def ten() -> int:
        await one()  # the loop's own first-use descriptors (uvloop opens one) are not ours
        await asyncio.sleep(0)
        before = _open_fds()
        for _ in range(10):
            await one()
        await asyncio.sleep(0)  # let closed transports finish closing
        return _open_fds() - before

    assert run(ten()) == 0


def test_a_cancelled_spawn_leaves_no_process_or_descriptor(
    run: Runner[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its output pipe is connected: the cancellation goes through.

    The process is killed and reaped and no descriptor is left: uvloop closes the pipe
    itself when the connect fails, and closing it again raised EBADF instead.
    """
    prefix = spawn._find_death_prefix()
    if not prefix:
        pytest.fail("setpriv --pdeathsig or pidfd_open is missing: the fast path is untested")
    monkeypatch.setattr(spawn, "_death_prefix", prefix)

    async def cancelled() -> int:
        warm = await spawn.spawn(["true"], dict(os.environ))  # the loop's first-use fds
        await warm.wait()
        warm.close_output()
        await asyncio.sleep(0)
        before = _open_fds()
        for _ in range(5):
            task = asyncio.create_task(spawn.spawn(["sleep", "60"], dict(os.environ)))
            await asyncio.sleep(0)  # it runs up to the connect, then waits
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0)
        return _open_fds() - before

    assert run(cancelled()) == 0
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # nothing left to reap: every child was reaped


def test_a_setpriv_check_that_times_out_is_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host too busy to finish the check forks this start, and the next start checks again."""
    outcomes: list[subprocess.CompletedProcess[bytes] | None] = [None]

    def fake_run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[bytes]:
        outcome = outcomes.pop(0) if outcomes else subprocess.CompletedProcess(argv, 0)
        if outcome is None:
            raise subprocess.TimeoutExpired(argv, 10)
        return outcome

    monkeypatch.setattr(spawn, "_death_prefix", None)
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert asyncio.run(spawn.death_prefix()) == ()  # timed out: the forking path, this once
    assert spawn._death_prefix is None
    prefix = asyncio.run(spawn.death_prefix())
    assert prefix[1:] == ("--pdeathsig", "KILL", "--")
    assert spawn._death_prefix == prefix


def test_a_pipe_transport_never_closes_a_number_it_no_longer_owns(
    run: Runner[tuple[bool, bool]],
) -> None:
    """Its descriptor is closed once: a number another thread opened since is left alone.

    uvloop closes a pipe transport's descriptor itself (libuv), then the file object it
    was given: whatever another thread had opened under that number by then was closed
    under it (a /proc file an admission reading had just opened, in a chaos run). So
    under uvloop the object the transport gets owns nothing (its close leaves the
    descriptor to libuv), and the original is closed at once; under asyncio the
    transport closes the one object that owns it.
    """

    async def closes() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        original = os.fdopen(read_end, "rb")
        given = spawn.closed_once(original, loop)
        number = given.fileno()
        given.close()  # as uvloop does once libuv has closed the number
        try:
            os.fstat(number)
        except OSError:
            still_open = False
        else:
            still_open = True
            os.close(number)
        os.close(write_end)
        return still_open, original.closed

    still_open, original_closed = run(closes())
    assert original_closed  # closed at once under uvloop; the transport's own under asyncio
    on_uvloop = run is not asyncio.run
    assert still_open is on_uvloop
