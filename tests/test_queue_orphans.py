"""A load nobody waits for any more ends; a queue bound never shuts a model out."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest
from daemon import Daemon, fake_preset, wait_for

if TYPE_CHECKING:
    from conftest import StartDaemon


def one_at_a_time(start_daemon: StartDaemon) -> Daemon:
    """Models a and b, one running at a time, busy ones drained after 1 s; a served once."""
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B")},
        {"max_running": 1, "max_wait": "1s", "queue_timeout": "60s"},
    )
    assert d.chat("a")[0] == 200
    return d


def test_a_queued_load_whose_client_hung_up_drains_and_evicts_nothing(
    start_daemon: StartDaemon,
) -> None:
    """b's only client gives up while b waits on busy a: a keeps serving, b never starts.

    The load went on without anyone: at max_wait it drained a, and once a's request
    ended it evicted a for a b nobody wanted (a's next request paid a second swap).
    """
    d = one_at_a_time(start_daemon)
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(d.chat, "a", "long", fake_delay=4)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        body = {"model": "b", "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(TimeoutError):  # the client gives up while b is queued
            d.request("POST", "/v1/chat/completions", body, timeout=0.5)
        wait_for(lambda: d.events("model.load.abandon"))
        assert d.model("b")["state"] == "stopped"
        time.sleep(1.5)  # past max_wait: nothing drains a
        assert d.model("a")["state"] == "ready"
        assert long.result()[0] == 200
    assert d.events("model.drain") == []
    assert [e["model"] for e in d.events("backend.spawn")] == ["a"]


def test_an_explicit_load_waiting_for_room_is_not_abandoned(start_daemon: StartDaemon) -> None:
    """``swapd load`` counts as someone waiting: it drains the busy model at max_wait."""
    d = one_at_a_time(start_daemon)
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(d.chat, "a", "long", fake_delay=3)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        status, view = d.request("POST", "/swapd/models/b/load", timeout=60)
        assert (status, view["state"]) == (200, "ready")
        assert long.result()[0] == 200
    assert d.events("model.load.abandon") == []


def test_max_queue_0_without_concurrency_still_loads_a_stopped_model(
    start_daemon: StartDaemon,
) -> None:
    """The request that starts the load is no queue: 0 refused it, and the model never ran."""
    d = start_daemon({"a": fake_preset("A", max_queue=0)})
    status, body = d.chat("a")
    assert status == 200, body
