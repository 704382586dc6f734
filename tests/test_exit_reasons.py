"""A backend that dies is described in words: which signal, and what it usually means."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import StartDaemon
from daemon import fake_preset, wait_for

from swapd.errors import BackendStartError, describe_exit


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (1, "exited with 1"),
        (0, "exited with 0"),
        (-signal.SIGILL, "killed by SIGILL (illegal instruction: this binary needs CPU features"),
        (-signal.SIGSEGV, "killed by SIGSEGV (segmentation fault"),
        (-signal.SIGKILL, "killed by SIGKILL (often the kernel's OOM killer: check `dmesg`)"),
        (-signal.SIGBUS, "killed by SIGBUS (bus error"),
        (-signal.SIGTERM, "killed by SIGTERM"),
        (128 + signal.SIGILL, "exited with 132, which a shell gives when its child is killed by"),
        (200, "exited with 200"),
    ],
)
def test_exit_status_in_words(code: int, words: str) -> None:
    """Signals are named, with a hint for the ones that point at the machine or the model."""
    assert describe_exit(code).startswith(words)


def test_start_error_keeps_the_exit_code_beside_the_words() -> None:
    """The message says 'killed by SIGILL'; the code stays available as a field."""
    error = BackendStartError("m", -signal.SIGILL, ["line"])
    assert error.exit_code == -signal.SIGILL
    assert "backend for 'm' killed by SIGILL (illegal instruction" in error.message


def test_a_backend_that_prints_megabytes_before_it_dies_gets_a_short_error(
    start_daemon: StartDaemon,
) -> None:
    """Its last output reaches the client and status cut to their ends, not whole.

    A 20 MiB line put 20 MB into every error answer, status and log event.
    """
    flood = "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo the real reason; exit 1"
    d = start_daemon({"bad": {"backend": "command", "cmd": ["sh", "-c", flood, "${PORT}"]}})
    status, body = d.chat("bad")
    assert status == 502
    message = body["error"]["message"]
    assert message.endswith("the real reason")
    assert len(message) < 3000
    assert "bytes cut]" in message
    assert len(d.model("bad")["error"]) < 3000
    _, logs = d.get("/swapd/models/bad/logs?lines=5")
    assert max(len(line) for line in logs["lines"]) < 9000


def test_backend_killed_by_sigill_is_reported_in_words(start_daemon: StartDaemon) -> None:
    """A backend dying of SIGILL at start: the 502, the log event and status all say so."""
    d = start_daemon(
        {"ill": {"backend": "command", "cmd": ["sh", "-c", "kill -ILL $$", "${PORT}"]}}
    )
    status, body = d.chat("ill")
    assert status == 502
    assert "killed by SIGILL (illegal instruction" in body["error"]["message"]
    model = d.model("ill")
    assert (model["state"] in {"backoff", "failed"}, model["failures"]) == (True, 1)
    assert model["exit_code"] == -signal.SIGILL
    assert "killed by SIGILL" in model["error"]
    [event] = d.events("model.load.fail")
    assert event["code"] == -signal.SIGILL
    assert "killed by SIGILL" in event["error"]


def test_backend_killed_while_ready_names_the_signal(start_daemon: StartDaemon) -> None:
    """A ready backend killed by SIGKILL is logged as a crash that points at the OOM killer."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    pid = d.model("a")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: d.events("backend.crash"))
    [crash] = d.events("backend.crash")
    assert crash["code"] == -signal.SIGKILL
    assert "OOM killer" in crash["reason"]
    assert "killed by SIGKILL" in d.model("a")["error"]


def test_missing_binary_says_not_found_and_where_swapd_looked(start_daemon: StartDaemon) -> None:
    """A preset whose binary is missing fails at once with 'not found', not 'not ready in time'."""
    d = start_daemon(
        {"nobin": {"backend": "command", "cmd": ["/nowhere/llama-server", "--port", "${PORT}"]}}
    )
    status, body = d.chat("nobin")
    assert status == 502
    message = body["error"]["message"]
    assert "could not start: command '/nowhere/llama-server' not found" in message
    assert "did not become ready in time" not in message


def test_a_missing_binary_leaves_the_model_on_no_device(start_daemon: StartDaemon) -> None:
    """No process ever ran: status shows no device, as for any other failed start.

    It kept the device it was admitted to ("cpu" in status), unlike a start that died.
    """
    d = start_daemon({"nobin": {"backend": "command", "cmd": ["/nowhere/x", "${PORT}"]}})
    assert d.chat("nobin")[0] == 502
    model = d.model("nobin")
    assert model["state"] in ("failed", "backoff")
    assert (model["pid"], model["device"]) == (None, None)


def test_missing_llama_server_binary_names_the_preset_and_path(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """A llama-server preset with a wrong ``binary:`` names the binary and PATH in the 502."""
    d = start_daemon(
        {"t": {"backend": "llama-server", "model": str(tiny_gguf), "binary": "no-llama-here"}}
    )
    status, body = d.chat("t")
    assert status == 502
    message = body["error"]["message"]
    assert "could not start: binary 'no-llama-here' not found" in message
    assert "searched PATH=" in message


# A backend that dies right after printing a megabyte of empty lines and one that says why:
# it enlarges its stdout pipe to 1 MiB (F_SETPIPE_SZ), fills it, and exits. Nothing else
# runs, and the pipe's write end is closed at its exit.
_FLOOD_THEN_EXIT = (
    "import fcntl, os\n"
    "fcntl.fcntl(1, 1031, 1 << 20)\n"  # F_SETPIPE_SZ
    "os.write(1, b'\\n' * ((1 << 20) - 64))\n"
    "os.write(1, b'fatal: cannot load the model\\n')\n"
    "os._exit(1)\n"
)


def test_output_still_in_the_pipe_at_exit_is_read_not_taken_for_an_escape(
    start_daemon: StartDaemon,
) -> None:
    """A full pipe still to read after the exit is output, not a helper holding the pipe.

    The drain gave the reads one second: a pipe of short lines took longer, so the backend
    was marked escaped (``backend.escaped``, ``escaped: true``) and its last line, the one
    that says why it died, was lost.
    """
    cmd = [sys.executable, "-c", _FLOOD_THEN_EXIT, "${PORT}"]
    d = start_daemon({"a": {"backend": "command", "cmd": cmd}})
    status, body = d.chat("a")
    assert (status, body["error"]["code"]) == (502, "backend_start_failed")
    assert "exited with 1" in body["error"]["message"]
    assert "fatal: cannot load the model" in body["error"]["message"]
    assert d.events("backend.escaped") == []
    assert d.model("a")["escaped"] is False
