"""SIGTERM of swapd while a vLLM it is putting to sleep is frozen (SIGSTOP)."""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import StartDaemon
from daemon import fake_preset, wait_for, wait_for_gone
from test_tiers import vllm_preset


def test_sigterm_while_a_frozen_vllm_is_being_put_to_sleep_does_not_wait_for_it(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """The shutdown stops the frozen backend (grace, then SIGKILL) instead of waiting out /sleep.

    c's load evicts v, which goes to the ram tier by /sleep; v is frozen (SIGSTOP) before it
    answers. swapd's shutdown waited for that /sleep for its whole call timeout (120 s, past
    systemd's TimeoutStopSec), before it even began to stop the backends.
    """
    d = start_daemon(
        {
            "v": vllm_preset(
                vllm_binary,
                tmp_path / "m",
                memory="600MiB",
                stop_timeout="1s",
                env={"FAKE_VLLM_SLEEP_DELAY": "3600"},
            ),
            "c": fake_preset("C", memory="600MiB"),
        },
        {"budget": "1GiB", "shutdown_timeout": "1s"},
    )
    assert d.chat("v")[0] == 200
    pid = d.model("v")["pid"]
    with ThreadPoolExecutor(1) as pool:
        pool.submit(d.chat, "c")
        wait_for(lambda: d.model("v")["state"] == "sleeping")
        os.kill(pid, signal.SIGSTOP)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        try:
            # shutdown_timeout (1 s) + stop_timeout (1 s) and a wide margin; not 120 s.
            d.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            raise AssertionError("swapd still waits on the frozen backend's /sleep") from None
        finally:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
    assert wait_for_gone(d) == []
    assert [e["model"] for e in d.events("backend.exit")].count("v") == 1
