"""systemd's notify protocol, read from a real unix datagram socket the test binds."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartDaemon
from daemon import fake_preset, hook_env, wait_for

from swapd import notify
from swapd.notify import Notifier, status_line, watchdog
from swapd.slot import ModelView


class Listener:
    """A datagram socket standing in for systemd's; collects every message it gets."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)  # noqa: FBT003 - the socket API is positional
        self.got: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        """Read what has arrived; every message so far."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.got
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.got.append(fields)

    def first(self, key: str, after: int = 0) -> int:
        """The index of the first message from ``after`` on that carries ``key``."""

        def found() -> int:
            return next((i + 1 for i, m in enumerate(self.drain()) if i >= after and key in m), 0)

        index: int = wait_for(found)
        return index - 1

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    """A listener on an abstract address, as systemd may pass one (``@...``)."""
    sock = Listener(f"@swapd-test-{uuid.uuid4().hex}")
    yield sock
    sock.close()


def test_a_message_is_one_datagram_to_a_socket_path() -> None:
    """READY=1 and its STATUS= go out together, in one datagram, to a filesystem socket."""
    folder = tempfile.mkdtemp(dir="/tmp")  # socket paths must stay short
    path = str(Path(folder) / "notify")
    got = Listener(path)
    try:
        notifier = Notifier(path)
        notifier.ready("resident: a; waiting: 0")
        notifier.close()
        assert got.drain() == [{"READY": "1", "STATUS": "resident: a; waiting: 0"}]
    finally:
        got.close()
        Path(path).unlink()
        Path(folder).rmdir()


def test_an_abstract_address_reaches_its_socket(listener: Listener) -> None:
    """``@name`` is the abstract namespace: a leading NUL, no file."""
    notifier = Notifier(listener.address)
    assert notifier.send("STOPPING=1")
    notifier.reloading()
    notifier.close()
    got = listener.drain()
    assert got[0] == {"STOPPING": "1"}
    assert got[1]["RELOADING"] == "1"
    assert int(got[1]["MONOTONIC_USEC"]) > 0


def test_without_a_socket_nothing_is_sent_and_nothing_fails() -> None:
    """Outside systemd every call is a no-op."""
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.send("READY=1")
    assert notifier.watchdog_interval is None


def test_a_watchdog_meant_for_another_process_is_ignored() -> None:
    """WATCHDOG_PID names the process that must ping; swapd pings at half WATCHDOG_USEC."""
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier.from_env(env).watchdog_interval == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_a_blocked_event_loop_misses_its_watchdog_pings(listener: Listener) -> None:
    """Pings come from a task on the loop: while the loop is blocked, none go out."""

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        notifier = Notifier(listener.address, watchdog_usec=100_000)  # a ping each 0.05 s
        task = asyncio.create_task(watchdog(notifier))
        await loop.sock_recv(listener.sock, 4096)  # pinging
        listener.drain()
        time.sleep(0.5)  # noqa: ASYNC251 - the point: the loop is blocked for ten intervals
        during = len(listener.drain())
        resumed = await loop.sock_recv(listener.sock, 4096)  # and pinging again
        task.cancel()
        notifier.close()
        return during, len(resumed)

    during, resumed = asyncio.run(scenario())
    assert during == 0
    assert resumed > 0


def test_the_status_line_names_resident_models_and_the_queue() -> None:
    """Models on the device are named (with their state unless ready); waiters are summed."""

    def view(name: str, state: str, tier: str, waiting: int = 0) -> ModelView:
        fields = dict.fromkeys(ModelView.__dataclass_fields__)
        fields.update(name=name, state=state, tier=tier, waiting=waiting)
        return ModelView(**fields)  # type: ignore[arg-type]

    views = [
        view("a", "ready", "device"),
        view("b", "starting", "device", waiting=3),
        view("c", "stopped", "disk"),
        view("d", "asleep", "ram", waiting=1),
    ]
    assert status_line(views) == "resident: a, b (starting); waiting: 4"
    assert status_line([]) == "resident: none; waiting: 0"


def test_the_daemon_tells_systemd_each_step(start_daemon: StartDaemon, listener: Listener) -> None:
    """Extend while preloading, READY with STATUS, watchdog, RELOADING/READY, STOPPING."""
    d = start_daemon(
        {"a": fake_preset("A", "--start-delay", "1", preload=True), "b": fake_preset("B")},
        env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "1000000"},
    )
    ready = listener.first("READY")
    got = listener.drain()
    assert listener.first("EXTEND_TIMEOUT_USEC") < ready
    assert int(got[listener.first("EXTEND_TIMEOUT_USEC")]["EXTEND_TIMEOUT_USEC"]) > 0
    assert got[ready]["STATUS"] == "resident: a; waiting: 0"  # READY only once a is preloaded
    listener.first("WATCHDOG", after=ready)
    backend = d.model("a")["pid"]
    assert b"NOTIFY_SOCKET" not in Path(f"/proc/{backend}/environ").read_bytes()
    assert d.chat("b")[0] == 200
    wait_for(lambda: any(m.get("STATUS") == "resident: a, b; waiting: 0" for m in listener.drain()))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    reloading = listener.first("RELOADING", after=ready + 1)
    assert int(listener.drain()[reloading]["MONOTONIC_USEC"]) > 0
    assert listener.first("READY", after=reloading) > reloading
    assert d.stop() == 0
    stopping = listener.first("STOPPING", after=reloading)
    assert stopping > reloading
    # The drain and the stops tell systemd they go on, so TimeoutStopSec does not cut them.
    assert listener.first("EXTEND_TIMEOUT_USEC", after=stopping) > stopping


BREAK_READING = """
import os
import swapd.cli

read = swapd.cli._load_config


def maybe_broken(*args, **kwargs):  # what no check foresaw, while a flag file exists
    if os.path.exists(os.environ["SWAPD_TEST_BREAK"]):
        raise RuntimeError("the disk said no")
    return read(*args, **kwargs)


swapd.cli._load_config = maybe_broken
"""


def test_a_reload_that_fails_unexpectedly_is_refused_and_systemd_hears_ready(
    start_daemon: StartDaemon, listener: Listener, tmp_path: Path
) -> None:
    """Not only config errors: any failure to read is a refusal, and READY=1 follows.

    An error nothing caught used to leave systemd in ``reloading`` (no READY=1 after
    RELOADING=1) and answer the reload route with a 500. The failure is injected with a
    ``sitecustomize`` that swapd's interpreter loads.
    """
    flag = tmp_path / "break"
    env = {
        "NOTIFY_SOCKET": listener.address,
        "SWAPD_TEST_BREAK": str(flag),
        **hook_env(tmp_path / "hook", BREAK_READING),
    }
    d = start_daemon({"a": fake_preset("A")}, env=env)
    ready = listener.first("READY")
    flag.touch()
    status, body = d.request("POST", "/swapd/reload")
    assert (status, body["error"]["code"]) == (400, "config_invalid")
    assert body["errors"] == ["the config could not be read: RuntimeError: the disk said no"]
    reloading = listener.first("RELOADING", after=ready + 1)
    after = listener.first("READY", after=reloading)
    assert "reload refused" in listener.drain()[after]["STATUS"]
    [event] = d.events("config.reload.fail")
    assert event["errors"] == body["errors"]
    assert d.chat("a")[0] == 200  # the running config stays


def test_a_reload_during_the_preloads_does_not_end_the_start_early(
    start_daemon: StartDaemon, listener: Listener
) -> None:
    """SIGHUP while a preload runs: no RELOADING=1 nor READY=1 until the preloads are done.

    A reload's READY=1 ended systemd's start at once, before the preloaded model was up.
    """
    d = start_daemon(
        {"a": fake_preset("A", "--start-delay", "3", preload=True)},
        env={"NOTIFY_SOCKET": listener.address},
    )
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)  # swapd listens (start_daemon saw /health), a loads
    wait_for(lambda: d.events("config.reload"))
    ready = listener.first("READY")
    got = listener.drain()
    assert got[ready]["STATUS"] == "resident: a; waiting: 0"
    assert not [m for m in got[:ready] if "RELOADING" in m]


def test_a_bounded_extension_stops_when_its_time_is_up() -> None:
    """A stop's EXTEND_TIMEOUT_USEC goes on only as long as the stop should take.

    Unbounded, a backend stuck in the kernel would keep systemd waiting for ever.
    """
    sent: list[float] = []

    class Counting(notify.Notifier):
        def extend(self, seconds: float) -> None:
            sent.append(seconds)

    async def run() -> None:
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await notify.extend_while(Counting(None), never, at_most=0.2)
        assert not never.done()

    asyncio.run(run())
    assert sent == [notify.EXTEND_BY]


def _fill(listener: Listener) -> int:
    """Fill the listener's queue as a busy systemd's would be; the datagrams it took."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)  # noqa: FBT003 - the socket API is positional
    target = "\0" + listener.address[1:]
    sent = 0
    try:
        while True:
            sender.sendto(b"X=1", target)
            sent += 1
    except BlockingIOError:
        return sent
    finally:
        sender.close()


def test_a_full_queue_delays_ready_and_reloading_in_order_and_drops_pings(
    listener: Listener,
) -> None:
    """With systemd's queue full, READY and RELOADING are sent again once it drains, in order.

    A watchdog ping or a STATUS line met the same way is dropped: the next one follows.
    """

    async def scenario() -> tuple[bool, list[dict[str, str]]]:
        notifier = Notifier(listener.address)
        filler = _fill(listener)
        notifier.reloading()
        went = notifier.send("WATCHDOG=1")
        notifier.status("busy")
        notifier.ready("resident: a; waiting: 0")
        await asyncio.sleep(notify.RETRY_EVERY * 3)  # still full: nothing goes, nothing lost
        got = listener.drain()[filler:]
        assert got == []
        await asyncio.sleep(notify.RETRY_EVERY * 3)
        got = listener.drain()[filler:]
        notifier.close()
        return went, got

    went, got = asyncio.run(scenario())
    assert not went
    assert [next(iter(m)) for m in got] == ["RELOADING", "READY"]
    assert got[1]["STATUS"] == "resident: a; waiting: 0"
