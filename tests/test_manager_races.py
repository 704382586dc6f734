"""Races between admin routes, reloads and loads in progress.

Each test holds a load open (a slow start) while another actor cuts it, and checks
that every waiter is answered and that no change the daemon accepted is lost.
"""

from __future__ import annotations

import http.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from conftest import StartDaemon
from daemon import Daemon, fake_preset, queue_behind, wait_for
from test_tiers import vllm_preset

SLOW_START = ("--start-delay", "8")


def _open_connections(d: Daemon) -> int:
    """Client connections swapd holds open now (this status request's own included)."""
    found: int = d.get("/swapd/status")[1]["connections"]["open"]
    return found


def _unload(d: Daemon, name: str, *, force: bool) -> tuple[int, Any]:
    """POST /swapd/models/NAME/unload; a dropped connection is (0, its error)."""
    path = f"/swapd/models/{name}/unload" + ("?force=true" if force else "")
    try:
        return d.request("POST", path, timeout=60)
    except (http.client.HTTPException, ConnectionError) as exc:
        return 0, repr(exc)


def test_a_restart_asked_for_during_a_start_survives_a_forced_unload(
    start_daemon: StartDaemon,
) -> None:
    """A reload changes a model that is starting; a forced unload then cuts the start.

    The restart waits for the start to settle before it swaps the preset in. The cut
    start ends cancelled, and that cancellation must not end the restart: the unload
    keeps the model down, but its next start must run the new launch (A2), as after an
    unload during any other restart.
    """
    d = start_daemon({"a": fake_preset("A", *SLOW_START)})
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(d.chat, "a")
        wait_for(lambda: d.model("a")["state"] == "starting")
        d.presets = {"a": fake_preset("A2")}
        d.write()
        status, plan = d.request("POST", "/swapd/reload")
        assert (status, plan["restarted"]) == (200, ["a"]), plan
        status, body = _unload(d, "a", force=True)
        assert (status, body["state"]) == (200, "stopped"), body
        assert waiting.result()[0] == 503
    status, body = d.chat("a")
    assert status == 200, body
    content = body["choices"][0]["message"]["content"]
    assert content.startswith("A2:"), f"the reload's change was lost: answered {content!r}"


def test_an_unload_waiting_for_a_start_is_answered_when_a_forced_unload_cuts_it(
    start_daemon: StartDaemon,
) -> None:
    """An unload waits for a start to finish; a forced unload cuts the start meanwhile.

    Both admin calls must be answered (200, stopped): the first must not lose its
    connection because the load it waited for ended cancelled.
    """
    d = start_daemon({"a": fake_preset("A", *SLOW_START)})
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(d.chat, "a")
        wait_for(lambda: d.model("a")["state"] == "starting")
        gentle = pool.submit(_unload, d, "a", force=False)
        # The chat, the gentle unload, and this status request.
        wait_for(lambda: _open_connections(d) >= 3)
        status, body = _unload(d, "a", force=True)
        assert (status, body["state"]) == (200, "stopped"), body
        assert waiting.result()[0] == 503
        status, body = gentle.result()
    assert status == 200, f"the waiting unload was not answered: {body}"
    assert body["state"] == "stopped", body


def test_a_sleeper_that_dies_while_its_wake_is_queued_is_started_afresh_once_admitted(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """The sleeping vLLM dies while its wake waits behind a busy model; then room frees.

    swapd has seen the death (the model left the ram tier) before the wake is admitted,
    so nothing is left to wake: the waiting request must start the model afresh (200),
    as a request after a death while asleep does, not fail "could not wake: process
    gone" and put the model in backoff for a crash of a process that was let go.
    """
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m"), "c": fake_preset("C")},
        {"max_running": 1, "queue_timeout": "60s", "max_wait": "60s"},
    )
    assert d.chat("v")[0] == 200
    assert d.chat("c")[0] == 200  # v sleeps to make room
    assert d.model("v")["state"] == "asleep"
    pid = d.model("v")["pid"]
    with ThreadPoolExecutor(2) as pool:
        busy, wake = queue_behind(d, pool, "c", "v", 4)
        psutil.Process(pid).kill()  # the sleeping process dies while its wake is queued
        wait_for(lambda: d.model("v")["pid"] is None)  # seen: its wake has nothing to wake
        assert busy.result()[0] == 200
        status, body = wake.result()
    assert status == 200, body
    assert d.model("v")["failures"] == 0
