"""Operations: start-up failures, the CLI on a down or stuck swapd, a reload at stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import StartDaemon
from daemon import fake_preset, free_port, hook_env, wait_for, write_layout
from test_notify import Listener


def swapd(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the swapd command (stdout a pipe) and capture what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "swapd", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k not in ("SWAPD_URL", "SWAPD_CONFIG")},
    )


# --------------------------------------------------------------------------- 1. cache_dir


@pytest.mark.parametrize("budget", [None, "1GiB"], ids=["no-cache_budget", "cache_budget"])
def test_a_cache_dir_swapd_cannot_make_exits_2_with_a_message(
    tmp_path: Path, budget: str | None
) -> None:
    """README: a cache_dir swapd cannot write "exits 2 saying so" -- with or without a budget.

    Without ``cache_budget`` (the default) the Manager's own mkdir/disk_usage ran unguarded:
    a traceback and exit 1 (EROFS under ProtectSystem=strict behaves the same way).
    """
    (tmp_path / "blocker").write_text("a file, so no directory can be made under it\n")
    settings = {"cache_dir": str(tmp_path / "blocker" / "cache")}
    if budget is not None:
        settings["cache_budget"] = budget
    config = write_layout(tmp_path, free_port(), {"a": fake_preset("A")}, settings)
    done = swapd("serve", "--config", str(config), cwd=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2
    assert "cannot open the staging cache" in done.stderr


# --------------------------------------------------------------------------- 2. plan locally


def test_plan_with_no_swapd_and_a_broken_preset_says_so_without_a_traceback(
    tmp_path: Path,
) -> None:
    """``swapd plan --config`` plans locally when swapd is down; a config error is one message.

    The local fallback's load_config raised ConfigErrors, which the CLI did not catch.
    """
    config = write_layout(tmp_path, free_port(), {"a": {**fake_preset("A"), "bogus_key": 3}}, {})
    done = swapd("plan", "--config", str(config))
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
    assert "bogus_key: unknown key" in done.stderr


# --------------------------------------------------------------------------- 3. a stuck swapd


def test_status_gives_up_on_a_swapd_that_accepts_but_never_answers() -> None:
    """A swapd whose loop is blocked (or stopped) still completes TCP handshakes.

    ``swapd status`` waited for its answer for ever (only the connect had a timeout).
    """
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(8)  # the kernel accepts; nothing ever reads or answers
        url = f"http://127.0.0.1:{stuck.getsockname()[1]}"
        try:
            done = swapd("status", "--url", url, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("swapd status was still waiting after 90 s")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "did not answer" in done.stderr


# --------------------------------------------------------------------------- 4. reload vs stop

GATE = """
import os, time
import swapd.cli

read = swapd.cli._load_config


def gated(*args, **kwargs):  # a reload's read waits for the gate file, once armed
    gate = os.environ["SWAPD_TEST_GATE"]
    if os.path.exists(gate + ".armed"):
        open(gate + ".entered", "w").close()
        while not os.path.exists(gate):
            time.sleep(0.05)
    return read(*args, **kwargs)


swapd.cli._load_config = gated
"""


@pytest.fixture
def notify_socket() -> Iterator[Listener]:
    """A stand-in for systemd's notify socket, on an abstract address."""
    sock = Listener(f"@swapd-audit-{uuid.uuid4().hex}")
    yield sock
    sock.close()


def test_a_reload_that_meets_shutdown_is_not_applied(
    start_daemon: StartDaemon, notify_socket: Listener, tmp_path: Path
) -> None:
    """POST /swapd/reload in flight when SIGTERM comes: not applied, no READY=1 after STOPPING=1.

    A SIGHUP at that point is skipped (config.reload.skipped); the HTTP reload went on,
    answered 200 promising an added and a restarted model that shutdown never starts, and
    sent READY=1 with a "resident: ..." STATUS after STOPPING=1.
    """
    gate = tmp_path / "gate"
    env = {
        "NOTIFY_SOCKET": notify_socket.address,
        "SWAPD_TEST_GATE": str(gate),
        **hook_env(tmp_path / "hook", GATE),
    }
    d = start_daemon({"a": fake_preset("A")}, env=env)
    assert d.chat("a")[0] == 200
    d.presets = {"a": fake_preset("A", "--chunks", "6"), "c": fake_preset("C", preload=True)}
    d.write()
    Path(f"{gate}.armed").touch()
    with ThreadPoolExecutor(1) as pool:
        reload = pool.submit(d.request, "POST", "/swapd/reload")
        wait_for(lambda: Path(f"{gate}.entered").exists())
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: d.events("swapd.drain"))  # listener closed, STOPPING=1 sent
        gate.touch()
        status, body = reload.result(timeout=60)
    assert d.proc.wait(timeout=60) == 0
    assert status == 503, body
    assert d.events("config.reload") == []
    got = notify_socket.drain()
    stopping = next(i for i, m in enumerate(got) if "STOPPING" in m)
    assert not [m for m in got[stopping:] if "READY" in m]
