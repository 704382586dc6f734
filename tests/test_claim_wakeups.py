"""Loads that wait on the room another load claimed: woken when the claim goes unused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import StartDaemon
from daemon import fake_preset, hook_env, wait_for
from test_staging_daemon import MIB, _model, staged_preset

# The staged model's copy waits until the test lets it go (a slow disk, made exact).
HELD_COPY = """
import time
from pathlib import Path
import swapd._copy as c
_real = c.copy
def copy(source, *args, **kwargs):
    while not Path({go!r}).exists():
        time.sleep(0.05)
    return _real(source, *args, **kwargs)
c.copy = copy
"""


def test_a_load_waiting_on_a_claim_goes_once_the_claimer_plans_to_wait_for_its_copy(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """s (staged) evicts x for its room (max_running 1), then waits for its copy.

    x is slow to stop; b, asked for meanwhile, waits on x, then on the room s claimed.
    Once x is down, s plans again and lets its claim go: nothing is reserved while its
    weights are still being copied. b must be woken then and start in the room s left,
    not sleep on until ``max_wait`` (here 10 minutes) while the room is free.
    """
    go = tmp_path / "go"
    model = _model(tmp_path / "slow" / "s.gguf", 2 * MIB)
    d = start_daemon(
        {
            "x": fake_preset("X", "--ignore-sigterm", stop_timeout="3s"),
            "s": staged_preset(model),
            "b": fake_preset("B"),
        },
        {
            "cache_dir": str(tmp_path / "cache"),
            "max_running": 1,
            "max_wait": "600s",
            "queue_timeout": "600s",
        },
        env=hook_env(tmp_path / "hook", HELD_COPY.format(go=str(go))),
    )
    assert d.chat("x")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        for_s = pool.submit(d.chat, "s")
        wait_for(lambda: d.model("x")["state"] == "stopping")  # evicted for s's room
        for_b = pool.submit(d.chat, "b")
        wait_for(lambda: d.model("b")["state"] == "queued")
        wait_for(lambda: d.model("x")["state"] == "stopped")
        try:
            wait_for(lambda: d.model("b")["state"] == "ready")
        finally:
            go.touch()
        assert d.model("s")["state"] == "queued", "s's copy was held until now"
        assert for_b.result()[0] == 200
        assert for_s.result()[0] == 200
