"""One backend child process: spawn it, notice readiness, stop it, reap it.

Each child leads its own session and process group and dies with swapd
(parent-death signal), so a stop can signal the whole group and nothing
outlives the daemon. Teardown cannot be cancelled half-way: a cancelled stop
still kills and reaps the group before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from swapd import cgroups, marks, oom, spawn
from swapd.errors import BackendStartError
from swapd.logs import get_logger
from swapd.outputlines import OutputLines
from swapd.ringlog import RingLog
from swapd.spawn import Spawned
from swapd.upstream import UpstreamError, UpstreamPool

# Readiness polls: the first 5 ms after spawn, each wait 1.5x the last, up to 50 ms. A
# backend's new output polls at once, so one that logs its readiness is seen at once; the
# timer is for silent ones. A poll every 5 ms throughout took 5% of a core from the
# backend it waited for (14 ms of a 165 ms start on a shared core).
READY_POLL_FIRST = 0.005
READY_POLL_MAX = 0.05
READY_POLL_GROWTH = 1.5
READY_POLL_GAP = 0.001  # the least time between two polls, however much it prints
# How long to keep reading a backend's output after its leader exits with no progress,
# and at most while the reads make progress (a full pipe of lines still to be read).
OUTPUT_GRACE = 1.0
OUTPUT_DRAIN_MAX = 30.0
# How long a SIGKILLed leader may take to exit. Past it the process is stuck in the
# kernel (uninterruptible sleep: a hung driver or network file system), where no signal
# reaches it; the stop goes on without it rather than hold the model's slot for good.
KILL_WAIT = 10.0
# Output lines handled between two turns of the event loop (each is a log event, ~10 us).
_LINES_PER_TURN = 1024
_log = get_logger("swapd.process")


def _stat_fields(process: Path) -> list[str]:
    """``/proc/PID/stat`` after the command name: state, ppid, pgrp ...; [] when gone.

    The line is "pid (comm) state ppid pgrp ...", and comm may hold spaces, so it is
    split after the last ")".
    """
    try:
        stat = (process / "stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def _live_member(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is alive, not a zombie (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry)  # [] for one gone meanwhile
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _stuck_in_group(pid: int, pgid: int) -> bool:
    """Whether ``pid`` is still in group ``pgid`` or stuck in the kernel: not an escape."""
    try:
        in_group = os.getpgid(pid) == pgid
    except OSError:
        return False  # gone: it was killed, so it had left the group
    return in_group or _process_state(pid) == "D"


def _raised(task: asyncio.Task[int]) -> bool:
    """Whether ``task`` ended with an error (not cancelled: a cancelled stop was finished)."""
    return task.done() and not task.cancelled() and task.exception() is not None


def _process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (``D``: uninterruptible sleep), or ``?``."""
    fields = _stat_fields(Path(f"/proc/{pid}"))
    return fields[0] if fields else "?"


class Child:
    """A spawned backend and everything needed to stop it cleanly."""

    def __init__(  # noqa: PLR0913 - each is one fact about the child, all but two keyword-only
        self,
        model: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        ring: RingLog,
        on_group: Callable[[str, int], None] = lambda _event, _pgid: None,
        stop_signal: signal.Signals = signal.SIGTERM,
        cgroup: Path | None = None,
    ) -> None:
        self.model = model
        self.argv = tuple(argv)
        self.env = dict(env)
        self.ring = ring
        self._on_group = on_group
        self.stop_signal = stop_signal
        self.cgroup = cgroup  # its own cgroup, where swapd may make one
        self.escaped = False  # a helper outside the group outlived the leader
        self.unkillable = False  # SIGKILL did not end the leader within KILL_WAIT
        self._reaped: asyncio.Task[None] | None = None  # waits for such a leader's exit
        self.backend_id = marks.new_backend_id()  # in its environment: finds escaped helpers
        self._sweep: asyncio.Task[None] | None = None
        self._joined: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[None] | None = None
        self._proc: Spawned | None = None
        self._pump: asyncio.Task[None] | None = None
        self._read_bytes = 0  # of output so far: the drain at exit waits while it grows
        self._output = asyncio.Event()  # set by each batch of output lines
        self._stopping: asyncio.Task[int] | None = None
        self.spawned_at = 0.0

    @property
    def pid(self) -> int | None:
        """The child's pid (also its process group id), once spawned."""
        return None if self._proc is None else self._proc.pid

    @property
    def exit_code(self) -> int | None:
        """The exit status once reaped; negative for a signal."""
        return None if self._proc is None else self._proc.returncode

    async def spawn(self) -> None:
        """Start the process in its own session; raise :class:`BackendStartError` if exec fails."""
        self.spawned_at = time.monotonic()
        try:
            self._proc = await spawn.spawn(self.argv, {**self.env, marks.ENV_VAR: self.backend_id})
        except OSError as exc:
            reason = f"cannot be executed: {self.argv[0]}: {exc.strerror}"
            self.ring.append(f"swapd: {reason}")
            raise BackendStartError(self.model, None, self.ring.tail(), reason=reason) from exc
        self._on_group("+", self._proc.pid)
        oom.expose(self.model, self._proc.pid)
        if self.cgroup is not None:
            # Joined from here, not in the child before exec: a migration can take 5-20 ms
            # (a kernel lock's RCU grace period), which then overlaps the backend's start
            # instead of adding to it. What the backend forks in those first milliseconds
            # stays outside the cgroup; the group kill and the environment mark still
            # end it.
            self._joined = asyncio.create_task(
                self._join_cgroup(self.cgroup, self._proc.pid), name=f"cgroup:{self.model}"
            )
        self._pump = asyncio.create_task(self._read_output(), name=f"output:{self.model}")
        _log.info(
            "backend.spawn", model=self.model, pid=self._proc.pid, argv=[str(a) for a in self.argv]
        )

    async def _read_output(self) -> None:
        assert self._proc is not None  # noqa: S101 - spawn sets it before starting the pump
        lines = OutputLines()
        try:
            while chunk := await self._proc.stdout.read(65536):
                self._read_bytes += len(chunk)
                done = lines.feed(chunk)
                for count, line in enumerate(done, 1):
                    self._emit(line)
                    if count % _LINES_PER_TURN == 0:
                        await asyncio.sleep(0)  # 64 KiB of newlines is 65,536 lines: let others run
                if done:
                    self._output.set()
        finally:
            # At the end of its output, or when the pump is cancelled: uvloop keeps a pipe
            # open past its end of file until it is closed.
            self._proc.close_output()
        if (last := lines.finish()) is not None:
            self._emit(last)

    def _emit(self, line: str) -> None:
        self.ring.append(line)
        if line:  # an empty line says nothing: kept for `swapd logs`, not logged
            _log.info("backend.output", model=self.model, line=line)

    async def wait_exit(self, *, output_within: float | None = None) -> int:
        """Wait until the leader has exited and its output is drained, or given up on.

        ``output_within``: wait at most that long for the output after the exit; the drain
        goes on behind (a helper that left the group may write to it for long).
        """
        assert self._proc is not None  # noqa: S101 - callers spawn first
        code = await self._proc.wait()
        if self._drain is None:  # one drain, however many wait for the exit
            self._drain = asyncio.create_task(self._drain_output(), name=f"drain:{self.model}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(output_within):  # None: no bound
                await asyncio.shield(self._drain)
        return code

    async def _drain_output(self) -> None:
        pump = self._pump
        if pump is None or pump.done() or await self._read_to_end(pump):
            return
        # The leader is gone but something still holds its output pipe: a helper that
        # left the process group (setsid). Stop reading and close our end.
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        assert self._proc is not None  # noqa: S101 - drained only after a spawn
        self._proc.close_output()
        if await self._group_alive():
            return  # a worker still in the group holds it; the stop ends it
        self.escaped = True
        _log.warning(
            "backend.escaped",
            model=self.model,
            pid=self._proc.pid,
            detail="a process that left the backend's group still holds its output",
        )

    async def _read_to_end(self, pump: asyncio.Task[None]) -> bool:
        """Whether the output reaches its end: OUTPUT_GRACE at a time while reads go on.

        Reads that go on are output written before the exit (a pipe holds a megabyte of
        lines), not a helper holding the pipe; OUTPUT_DRAIN_MAX bounds them all the same.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OUTPUT_DRAIN_MAX
        while True:
            before = self._read_bytes
            try:
                async with asyncio.timeout(OUTPUT_GRACE):  # not wait_for: see manager
                    await asyncio.shield(pump)
            except TimeoutError:
                if self._read_bytes == before or loop.time() > deadline:
                    return False
            else:
                return True

    async def wait_ready(  # noqa: PLR0913 - where, what, how long, through what, the key
        self,
        host: str,
        port: int,
        path: str | None,
        timeout: float,
        pool: UpstreamPool,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Poll ``path`` until it answers 200, racing early exit and the deadline.

        ``path`` None: until the port accepts a connection (a backend with no health route).

        ``headers`` go with every poll (a backend's own key, for a guarded health path).
        """
        poll = asyncio.create_task(self._poll(host, port, path, pool, headers, self._output))
        exited = asyncio.create_task(self.wait_exit())
        try:
            done, _ = await asyncio.wait(
                {poll, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            poll.cancel()
            if not exited.done():
                exited.cancel()
        if poll in done and exited not in done:
            return
        if exited in done:
            raise BackendStartError(self.model, exited.result(), self.ring.tail())
        self.ring.append(f"swapd: not ready after {timeout:g}s (start_timeout)")
        raise BackendStartError(self.model, None, self.ring.tail())

    @staticmethod
    async def _poll(  # noqa: PLR0913, PLR0917 - where, what, through what, the key, the nudge
        host: str,
        port: int,
        path: str | None,
        pool: UpstreamPool,
        headers: Sequence[tuple[bytes, bytes]],
        output: asyncio.Event,
    ) -> None:
        # Backends say they are ready in their log ("listening on", "startup complete"):
        # new output polls at once, but never sooner than READY_POLL_GAP after the last
        # poll (a backend printing a line every 0.1 ms was polled 5,000 times a second).
        loop = asyncio.get_running_loop()
        wait = READY_POLL_FIRST
        while True:
            polled = loop.time()
            output.clear()
            try:
                async with asyncio.timeout(5):  # the body too: it may never end
                    if path is None:
                        await pool.accepts(host, port)
                        return
                    status, _ = await pool.control(host, port, "GET", path, headers)
                if status == 200:
                    return
            except (UpstreamError, TimeoutError):
                pass
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await output.wait()
            await asyncio.sleep(max(0.0, polled + READY_POLL_GAP - loop.time()))
            wait = min(READY_POLL_MAX, wait * READY_POLL_GROWTH)

    async def _join_cgroup(self, cgroup: Path, pid: int) -> None:
        try:
            await asyncio.to_thread(cgroups.join, cgroup, pid)
        except OSError as exc:  # the cgroup is gone or refused us: the backend runs without
            _log.warning("cgroup.join.fail", model=self.model, error=str(exc))

    async def _end_marked(self) -> None:
        """Kill the processes that left the group but still carry this backend's mark."""
        try:
            skip = (self._proc.pid,) if self.unkillable and self._proc is not None else ()
            escaped = await asyncio.to_thread(marks.kill_marked, self.backend_id, skip=skip)
        except OSError as exc:  # /proc unreadable: nothing to find them by
            _log.warning("backend.sweep.failed", model=self.model, error=str(exc))
            return
        self._report_escaped(escaped)

    def _report_escaped(self, pids: Sequence[int]) -> None:
        """Log the pids killed outside the group (not members stuck with an unkillable leader)."""
        if self.unkillable and self._proc is not None:
            leader = self._proc.pid
            pids = [pid for pid in pids if pid != leader and not _stuck_in_group(pid, leader)]
        if pids:
            self.escaped = True
            _log.warning("backend.escaped.killed", model=self.model, pids=pids)

    def _signal_group(self, sig: signal.Signals) -> bool:
        if self._proc is None:
            return False
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def kill_group(self) -> None:
        """SIGKILL the whole group now (a frozen backend ignores everything else)."""
        self._signal_group(signal.SIGKILL)

    async def _group_alive(self) -> bool:
        """Whether a member of the group lives (zombies waiting to be reaped do not count).

        An empty group is known at once; otherwise /proc is scanned off the loop (it takes
        milliseconds on a host of thousands of processes, and a stop looks every 20 ms).
        """
        if self._proc is None:
            return False
        try:
            os.killpg(self._proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return await asyncio.to_thread(_live_member, self._proc.pid)

    async def stop(self, timeout: float) -> int:
        """Signal the group (SIGTERM by default), SIGKILL it after ``timeout``, reap it."""
        if self._proc is None:
            return 0
        if self._stopping is None or _raised(self._stopping):
            # Again after a teardown that raised: answering its error again would leave
            # what it had not reached yet (the cgroup's sweep, the reaper told) undone.
            self._stopping = asyncio.create_task(self._terminate(timeout))
        try:
            return await asyncio.shield(self._stopping)
        except asyncio.CancelledError:
            # Finish the teardown before letting the cancellation through.
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._stopping)
            raise

    async def _exit_after_kill(self) -> int:
        """The leader's exit code once SIGKILL has ended it; -SIGKILL if it has not in time.

        The wait goes on in the background: the process is reaped whenever it exits.
        """
        assert self._proc is not None  # noqa: S101 - a stop checks it
        try:
            async with asyncio.timeout(KILL_WAIT):
                return await asyncio.shield(self.wait_exit())
        except TimeoutError:
            if self._proc.returncode is not None:
                return self._proc.returncode  # it is gone; a helper outside the group writes on
            self.unkillable = True
            self._reaped = asyncio.create_task(self._reap_stuck(), name=f"reap:{self.model}")
            pid = self._proc.pid
            _log.error(
                "backend.unkillable",
                model=self.model,
                pid=pid,
                state=await asyncio.to_thread(_process_state, pid),
                after_s=KILL_WAIT,
                detail="SIGKILL has not ended it: it is likely stuck in the kernel (state D, "
                "a hung driver or file system). swapd stops waiting; what it still holds "
                "counts as used outside swapd until it exits",
            )
            return -signal.SIGKILL

    async def _reap_stuck(self) -> None:
        """Once an unkillable leader exits at last: log it, and remove its cgroup."""
        assert self._proc is not None  # noqa: S101 - only after a kill
        code = await self.wait_exit()
        _log.info("backend.unkillable.exit", model=self.model, pid=self._proc.pid, code=code)
        if self.cgroup is not None and self.cgroup.exists():  # the stop could not remove it
            await asyncio.to_thread(cgroups.kill, self.cgroup)

    async def _terminate(self, timeout: float) -> int:
        assert self._proc is not None  # noqa: S101 - stop checks it
        started = time.monotonic()
        # Even when the leader is dead already (a crash), its workers may live on.
        self._signal_group(self.stop_signal)
        try:
            async with asyncio.timeout(timeout):
                code = await asyncio.shield(self.wait_exit())
        except TimeoutError:
            if (exited := self._proc.returncode) is not None:
                # The leader exited in time; only its output still flows, from a helper that
                # left the group and holds the pipe: ended below (cgroup, mark).
                code = exited
            else:
                _log.warning("backend.kill", model=self.model, pid=self._proc.pid, after_s=timeout)
                self._signal_group(signal.SIGKILL)
                code = await self._exit_after_kill()
        # The leader is gone; stragglers in its group (forked helpers) get the rest of the
        # grace period, then SIGKILL.
        deadline = started + timeout
        while time.monotonic() < deadline and await self._group_alive():  # noqa: ASYNC110 - no event exists for another process's exit
            await asyncio.sleep(0.02)
        self._signal_group(signal.SIGKILL)
        if self.cgroup is not None:
            if self._joined is not None:
                await asyncio.shield(self._joined)  # never kill and remove a cgroup mid-join
            # Whatever is left there left the group (setsid): end it too.
            self._report_escaped(await asyncio.to_thread(cgroups.kill, self.cgroup))
        if self._sweep is None:
            # Then by the mark in their environment: helpers outside any cgroup, or forked
            # before the backend joined its own. Off the stop's path (a scan of every
            # process takes milliseconds, and a swap waits on the stop).
            self._sweep = asyncio.create_task(self._end_marked(), name=f"sweep:{self.model}")
        self._on_group("-", self._proc.pid)
        _log.info(
            "backend.exit",
            model=self.model,
            pid=self._proc.pid,
            code=code,
            stop_s=round(time.monotonic() - started, 3),
        )
        return code
