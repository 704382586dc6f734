"""One instance per state_dir, a clear exit on a taken port, and a real drain on SIGTERM."""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for


def _serve(d: Daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swapd", "serve", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=d.root,
    )


def test_a_second_instance_on_the_same_state_dir_refuses_and_touches_nothing(
    start_daemon: StartDaemon,
) -> None:
    """The second swapd exits 2 with "already running (pid N)"; the first's backends live."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    backend = d.model("a")["pid"]
    records = sorted(p.name for p in (d.root / "state" / "children").iterdir())
    assert d.proc is not None
    done = _serve(d)
    assert done.returncode == 2
    assert f"already running (pid {d.proc.pid})" in done.stderr
    assert "Traceback" not in done.stderr
    assert psutil.pid_exists(backend)
    assert sorted(p.name for p in (d.root / "state" / "children").iterdir()) == records
    assert d.chat("a")[0] == 200


def test_a_state_dir_swapd_cannot_use_exits_2_with_a_message(start_daemon: StartDaemon) -> None:
    """A state_dir swapd cannot make: one line naming it, exit 2, no traceback.

    Here a file is in the way; under a unit's ProtectSystem=strict, a read-only path.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.stop() == 0
    (d.root / "taken").write_text("a file, not a folder\n")
    d.settings = {**d.settings, "state_dir": "taken"}
    d.write()
    done = _serve(d)
    assert done.returncode == 2
    assert f"cannot use state_dir {d.root / 'taken'}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_in_use_exits_2_with_a_message(start_daemon: StartDaemon) -> None:
    """When the listen port is taken, serve says so in one line and exits 2."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.stop() == 0
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        taken.bind(("127.0.0.1", d.port))
        taken.listen()
        done = _serve(d)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{d.port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_drains_requests_in_flight_and_answers_waiters_503(
    start_daemon: StartDaemon,
) -> None:
    """In flight: finished. Waiting on a load: 503 unavailable. Then every backend stops."""
    d = start_daemon(
        {"a": fake_preset("A"), "slow": fake_preset("S", "--start-delay", "30")},
        {"shutdown_timeout": "20s", "max_running": 2},
    )
    assert d.chat("a")[0] == 200
    assert d.proc is not None
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(d.chat, "a", "x", fake_delay=2)
        waiting = pool.submit(d.chat, "slow")
        wait_for(lambda: d.model("a")["in_flight"] == 1 and d.model("slow")["waiting"] == 1)
        d.proc.send_signal(signal.SIGTERM)
        status, body = waiting.result()
        assert (status, body["error"]["code"]) == (503, "unavailable")
        assert running.result()[0] == 200
    assert d.proc.wait(timeout=60) == 0
    assert d.leftovers() == [] or wait_for(lambda: not d.leftovers(), timeout=10)


def test_a_request_still_running_when_the_drain_ends_is_cut_then(
    start_daemon: StartDaemon,
) -> None:
    """Past shutdown_timeout swapd cuts the request itself and logs it 503, not 499.

    aiohttp's drain only failed body reads at shutdown_timeout and waited as long again,
    so a request waiting on its backend ran for twice the time (logged as a client gone).
    The cut is clean: no traceback follows it in the log.
    """
    d = start_daemon({"a": fake_preset("A")}, {"shutdown_timeout": "2s"})
    assert d.chat("a")[0] == 200
    assert d.proc is not None

    def cut_short() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):  # the connection goes
            d.chat("a", "x", fake_delay=60)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(cut_short)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        d.proc.send_signal(signal.SIGTERM)
        running.result()
    assert d.proc.wait(timeout=60) == 0
    done = [e for e in d.events("request.done") if e["ms"] > 1000]
    assert [e["status"] for e in done] == [503]
    # Nor a traceback from aiohttp, whose drain ended at the cut's moment (InvalidStateError).
    assert d.events("Unhandled exception") == []


def test_sigusr1_and_sigusr2_do_not_end_the_daemon(start_daemon: StartDaemon) -> None:
    """Signals whose default would kill swapd are logged and ignored (SIGHUP reloads)."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    assert d.proc is not None
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        d.proc.send_signal(sig)
    wait_for(lambda: len(d.events("swapd.signal.ignored")) == 2)
    assert d.proc.poll() is None
    assert d.chat("a")[0] == 200


def test_a_sighup_before_swapd_listens_does_not_end_it(start_daemon: StartDaemon) -> None:
    """`systemctl reload` in the first second (before the loop takes SIGHUP): still up.

    SIGHUP's default action ended swapd until its loop installed the reload handler.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.stop() == 0
    with subprocess.Popen(
        [sys.executable, "-m", "swapd", "serve", "--config", str(d.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=d.root,
    ) as early:
        try:
            # Once swapd's main has run its first line (SIGHUP ignored), well before it
            # listens: the mask of ignored signals says when.
            wait_for(lambda: _ignores_sighup(early.pid), interval=0.005)
            early.send_signal(signal.SIGHUP)
            wait_for(lambda: early.poll() is not None or _answers(d))
            assert early.poll() is None
        finally:
            early.terminate()
            early.wait(timeout=60)


def _ignores_sighup(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(ignored, 16) & (1 << (signal.SIGHUP - 1)))


def _answers(d: Daemon) -> bool:
    try:
        return d.get("/health")[0] == 200
    except OSError:
        return False


def test_a_sighup_during_shutdown_is_skipped(start_daemon: StartDaemon) -> None:
    """`systemctl reload` while swapd drains: logged and skipped; the shutdown goes on, exit 0."""
    d = start_daemon({"a": fake_preset("A", "--ignore-sigterm", stop_timeout="3s")})
    assert d.chat("a")[0] == 200
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: d.events("swapd.shutdown"))  # its backend takes 3 s to stop from here
    d.proc.send_signal(signal.SIGHUP)
    assert d.proc.wait(timeout=60) == 0
    assert [e["reason"] for e in d.events("config.reload.skipped")] == ["shutting down"]
    assert d.events("config.reload") == []
