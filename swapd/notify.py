"""systemd's notify protocol (sd_notify(3)) without a library: one datagram per message.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` in
the abstract namespace) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC``. swapd
sends ``READY=1`` once it listens and its preloads are done,
``EXTEND_TIMEOUT_USEC`` while long preloads run, ``STATUS=`` lines naming the
resident models and the queue, ``RELOADING=1`` and ``READY=1`` around a reload,
``STOPPING=1`` when shutdown begins, and ``WATCHDOG=1`` at half the watchdog
interval from a task on the event loop, so a blocked loop misses its pings and
systemd restarts the service. Without ``$NOTIFY_SOCKET`` every call is a no-op.
Backends never inherit these variables (see ``swapd.backends._launch``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from swapd.logs import get_logger
from swapd.slot import ModelView

_log = get_logger("swapd.notify")
# How far each EXTEND_TIMEOUT_USEC pushes the start-up deadline, and how often it is sent.
EXTEND_BY = 30.0
EXTEND_EVERY = 10.0
# How often the STATUS line is recomputed besides state changes (queue depth moves per request).
STATUS_EVERY = 2.0
_NAMES_SHOWN = 8
# A full queue (systemd busy) drops a ping or a STATUS line: the next one soon follows. Any
# other message (READY, RELOADING, STOPPING, an extension) waits its turn and is sent again,
# in order, this often; libsystemd's sd_notify would block the caller instead.
_PASSING = ("WATCHDOG=", "STATUS=")
RETRY_EVERY = 0.05


class Notifier:
    """Sends sd_notify messages to ``address``; does nothing when there is none."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None  # opened at the first message
        self._failed = False
        self._backlog: list[bytes] = []  # messages that met a full queue, oldest first
        self._retry: asyncio.TimerHandle | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for, with the watchdog interval if it is meant for us."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or (pid.isdigit() and int(pid) == os.getpid())
        watchdog = int(usec) if usec.isdigit() and int(usec) > 0 and ours else None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None."""
        if self.watchdog_usec is None or not self.enabled:
            return None
        return self.watchdog_usec / 2e6

    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False (logged once) when it did not go now.

        A message that met a full queue and is not a ping or a STATUS line is sent again
        later, after any sent earlier that wait too.
        """
        if self.address is None:
            return False
        data = "\n".join(lines).encode()
        lasting = not all(line.startswith(_PASSING) for line in lines)
        if self._backlog:
            if lasting:
                self._backlog.append(data)  # behind the ones waiting: systemd reads them in order
            return False
        try:
            self._sendto(data)
        except BlockingIOError as exc:
            if lasting and self._later():
                self._backlog.append(data)
            else:
                self._warn(exc)
            return False
        except OSError as exc:
            self._warn(exc)
            return False
        return True

    def _sendto(self, data: bytes) -> None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)  # noqa: FBT003 - the socket API is positional
        assert self.address is not None  # noqa: S101 - send checked it
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        self._sock.sendto(data, target)

    def _later(self) -> bool:
        """Send the backlog again soon; False outside an event loop (nothing would)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._retry is None:
            self._retry = loop.call_later(RETRY_EVERY, self._flush)
        return True

    def _flush(self, *, again: bool = True) -> None:
        self._retry = None
        while self._backlog:
            try:
                self._sendto(self._backlog[0])
            except BlockingIOError:
                if again:
                    self._later()
                else:
                    self._backlog.clear()
                return
            except OSError as exc:
                self._warn(exc)
                self._backlog.clear()
                return
            self._backlog.pop(0)

    def _warn(self, exc: OSError) -> None:
        if not self._failed:  # one warning, not one per watchdog ping
            _log.warning("notify.fail", socket=self.address, error=str(exc))
            self._failed = True

    def ready(self, status: str) -> None:
        """Start-up (or a reload) is done."""
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """A reload begins; newer systemd reads the timestamp to order it with READY."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Shutdown begins."""
        self.send("STOPPING=1", "STATUS=stopping: draining requests, then backends")

    def extend(self, seconds: float) -> None:
        """Push the start-up deadline ``seconds`` from now (``TimeoutStartSec``)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def status(self, text: str) -> None:
        """The line ``systemctl status`` shows."""
        self.send(f"STATUS={text}")

    def close(self) -> None:
        """Close the socket, once what waits has had a last try."""
        if self._retry is not None:
            self._retry.cancel()
        self._flush(again=False)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(views: Iterable[ModelView]) -> str:
    """The resident models (those on the device, with any state but ready) and the queue."""
    resident = []
    waiting = 0
    for view in views:
        waiting += view.waiting
        if view.tier == "device":
            resident.append(view.name if view.state == "ready" else f"{view.name} ({view.state})")
    shown = ", ".join(resident[:_NAMES_SHOWN]) or "none"
    if len(resident) > _NAMES_SHOWN:
        shown += f" and {len(resident) - _NAMES_SHOWN} more"
    return f"resident: {shown}; waiting: {waiting}"


async def watchdog(notifier: Notifier) -> None:
    """Ping at half the interval for as long as the event loop runs this task."""
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)


async def extend_while(
    notifier: Notifier, work: asyncio.Future[None], *, at_most: float | None = None
) -> None:
    """Keep pushing systemd's deadline until ``work`` is done, or for ``at_most`` seconds.

    A bound leaves systemd's own timeout in force after it: a stop that a process stuck
    in the kernel could hang forever must still end.
    """
    loop = asyncio.get_running_loop()
    until = None if at_most is None else loop.time() + at_most
    while not work.done() and (until is None or loop.time() < until):
        notifier.extend(EXTEND_BY)
        left = EXTEND_EVERY if until is None else min(EXTEND_EVERY, until - loop.time())
        await asyncio.wait({work}, timeout=max(0.0, left))


async def status_updates(
    notifier: Notifier,
    views: Callable[[], Iterable[ModelView]],
    changed: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Send the STATUS line whenever it changes: on state changes and every few seconds.

    ``changed()`` returns an awaitable that completes at the next state change.
    """
    last = ""
    while True:
        line = status_line(views())
        if line != last:
            notifier.status(line)
            last = line
        waiter = asyncio.ensure_future(changed())
        try:
            await asyncio.wait({waiter}, timeout=STATUS_EVERY)
        finally:
            waiter.cancel()
