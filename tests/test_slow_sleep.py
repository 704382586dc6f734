"""A slow /sleep of an evicted vLLM must not hold up loads that need nothing from it.

c's load evicts v (a vLLM), which goes to the ram tier by /sleep; the fake's /sleep is
held open until the test opens a gate. Meanwhile b, which fits beside everything without
any eviction, is asked for, and a, already ready, is asked for.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import StartDaemon
from daemon import Daemon, fake_preset, hook_env, wait_for
from test_tiers import vllm_preset

# Loaded into the fake vLLM only: /sleep marks that it has begun, then waits for the gate.
GATED_SLEEP = """
import sys
if sys.argv and sys.argv[0].endswith("fake_vllm.py"):
    sys.path.insert(0, {tests!r})
    import asyncio, pathlib
    from fakes import upstream

    _sleep = upstream.Fake.sleep

    async def sleep(self, request):
        pathlib.Path({entered!r}).touch()
        while not pathlib.Path({gate!r}).exists():
            await asyncio.sleep(0.02)
        return await _sleep(self, request)

    upstream.Fake.sleep = sleep
"""


def _start(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> tuple[Daemon, Path, Path]:
    tests = str(Path(__file__).resolve().parent)
    entered, gate = tmp_path / "sleep-entered", tmp_path / "sleep-gate"
    hook = GATED_SLEEP.format(tests=tests, entered=str(entered), gate=str(gate))
    d = start_daemon(
        {
            "v": vllm_preset(vllm_binary, tmp_path / "m", memory="600MiB"),
            "a": fake_preset("A", memory="100MiB"),
            "b": fake_preset("B", memory="100MiB"),
            "c": fake_preset("C", memory="600MiB"),
        },
        # v (600) + a (100) leave 324 MiB of the budget: c (600) must evict v; b (100) fits.
        {"budget": "1GiB", "queue_timeout": "120s", "max_wait": "120s"},
        env=hook_env(tmp_path / "hook", hook),
    )
    assert d.chat("v")[0] == 200
    assert d.chat("a")[0] == 200
    return d, entered, gate


def test_a_ready_model_is_served_while_an_evicted_vllm_sleeps(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """A request for a, ready, is answered while v's /sleep (for c's load) is pending."""
    d, entered, gate = _start(start_daemon, vllm_binary, tmp_path)
    with ThreadPoolExecutor(2) as pool:
        try:
            for_c = pool.submit(d.chat, "c")
            wait_for(entered.exists)  # v's /sleep has reached the backend and hangs there
            ready = pool.submit(d.chat, "a")
            wait_for(ready.done, timeout=30)
            assert ready.result()[0] == 200
            assert not gate.exists()
            assert d.model("v")["state"] == "sleeping"
        finally:
            gate.touch()
        assert for_c.result()[0] == 200
    assert d.model("v")["state"] == "asleep"


def test_a_load_that_needs_no_eviction_does_not_wait_for_another_models_sleep(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """b fits without evicting anything; it starts while v's /sleep is still pending.

    Before, b's admission waited for the device lock that c's load held for the whole
    /sleep (up to vLLM's 120 s call timeout, past queue_timeout), though b needed nothing
    that v's sleep frees.
    """
    d, entered, gate = _start(start_daemon, vllm_binary, tmp_path)
    with ThreadPoolExecutor(2) as pool:
        try:
            for_c = pool.submit(d.chat, "c")
            wait_for(entered.exists)  # v's /sleep has reached the backend and hangs there
            assert d.model("v")["state"] == "sleeping"
            for_b = pool.submit(d.chat, "b")
            try:
                wait_for(for_b.done, timeout=30)
            except AssertionError:
                raise AssertionError(
                    f"b not served while v's /sleep is pending; b is {d.model('b')['state']}"
                ) from None
            assert for_b.result()[0] == 200
            assert not gate.exists()
            assert d.model("v")["state"] == "sleeping"  # the sleep is still pending
        finally:
            gate.touch()
        assert for_c.result()[0] == 200
    assert (d.model("v")["state"], d.model("c")["state"]) == ("asleep", "ready")
    assert [e["victims"] for e in d.events("model.evict")] == [["v"]]


# Loaded into the daemon only: its cap on one sleep-API call, made shorter than the
# fake's slow /sleep (FAKE_VLLM_SLEEP_DELAY).
SHORT_CALL_CAP = """
import sys
if sys.argv[:2] == ["-m", "serve"]:
    import swapd.backends.vllm
    swapd.backends.vllm._CALL_TIMEOUT = 1.0
"""


def test_a_sleep_that_outlasts_its_cap_fails_with_a_reason(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """A /sleep with no answer within the cap ends the process; the error says why.

    Before, the reason was empty ("could not sleep: POST /sleep?level=1: "): the text
    of asyncio's TimeoutError is, and an exception is always true, so its name never
    stood in.
    """
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s")},
        env={"FAKE_VLLM_SLEEP_DELAY": "30", **hook_env(tmp_path / "hook", SHORT_CALL_CAP)},
    )
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] in ("failed", "stopped", "backoff"), timeout=40)
    error = d.model("v")["error"]
    assert "could not sleep: POST /sleep?level=1: no answer within 1s" in str(error), error
