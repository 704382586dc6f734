"""Supervision: backoff and breaker, liveness, per-model limits, bounded waits, clear states."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, hook_env, wait_for
from fakes import probe_file

GIB = 1024**3


def _chat_with_headers(d: Daemon, model: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}], **extra})
    req = urllib.request.Request(  # noqa: S310 - loopback
        d.url + "/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.load(exc)


def test_a_failed_start_backs_off_and_answers_503_without_spawning(
    start_daemon: StartDaemon,
) -> None:
    """After a failed start, requests get 503 backoff with Retry-After and the error."""
    d = start_daemon({"bad": fake_preset("X", "--exit-at-start", "7")})
    assert d.chat("bad")[0] == 502
    status, headers, body = _chat_with_headers(d, "bad")
    assert status == 503
    assert body["error"]["code"] == "backoff"
    assert "exited with 7" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    model = d.model("bad")
    assert model["state"] == "backoff"
    assert model["retry_at"] is not None
    assert "exited with 7" in model["error"]
    assert len(d.events("backend.spawn")) == 1


def test_a_crash_soon_after_ready_backs_off_instead_of_restarting_in_a_loop(
    start_daemon: StartDaemon,
) -> None:
    """A backend that dies on its first request counts as a failed start: 503 backoff next."""
    d = start_daemon({"flaky": fake_preset("X", "--crash-after", "0")})
    assert d.chat("flaky")[0] == 502  # ready, then dead on the request
    # The first backoff is 1 s: look often, so the next request goes out well inside it.
    wait_for(lambda: d.model("flaky")["state"] == "backoff", timeout=15, interval=0.01)
    status, headers, body = _chat_with_headers(d, "flaky")
    assert (status, body["error"]["code"]) == (503, "backoff")
    assert int(headers["Retry-After"]) >= 1
    assert len(d.events("backend.spawn")) == 1  # nothing restarted during the backoff
    assert [e["failures"] for e in d.events("model.backoff")] == [1]
    # After the backoff the next request starts it again, and a second early crash doubles it.
    wait_for(lambda: d.chat("flaky")[0] == 502, timeout=20, interval=0.2)
    wait_for(lambda: len(d.events("model.backoff")) == 2, timeout=15)
    assert [e["delay_s"] for e in d.events("model.backoff")] == [1.0, 2.0]


def test_five_failed_starts_in_a_row_open_the_breaker_until_an_explicit_load(
    start_daemon: StartDaemon,
) -> None:
    """Backoffs double (1, 2, 4, 8 s); the fifth failure leaves the model failed for good.

    Requests then get 503 backend_failed and start nothing; an explicit load retries.
    """
    d = start_daemon({"bad": fake_preset("X", "--exit-at-start", "7")})

    def failed_start() -> bool:
        # During a backoff the answer is 503 and nothing starts; after it, a 502.
        return d.chat("bad")[0] == 502

    for _ in range(5):
        wait_for(failed_start, timeout=20, interval=0.2)
    assert [e["delay_s"] for e in d.events("model.backoff")] == [1.0, 2.0, 4.0, 8.0]
    assert d.model("bad")["state"] == "failed"
    status, body = d.chat("bad")
    assert (status, body["error"]["code"]) == (503, "backend_failed")
    assert len(d.events("backend.spawn")) == 5
    status, _ = d.request("POST", "/swapd/models/bad/load")
    assert status == 502  # an explicit load tries again
    assert len(d.events("backend.spawn")) == 6


def test_a_frozen_backend_is_killed_by_the_liveness_probe_and_restarted(
    start_daemon: StartDaemon,
) -> None:
    """A backend stopped with SIGSTOP misses its probes; its group is killed, then restarted.

    The request in flight at the time gets 502 backend_gone.
    """
    d = start_daemon({"a": fake_preset("A", health_interval="1s", health_failures=2)})
    assert d.chat("a")[0] == 200
    pid = d.model("a")["pid"]
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(d.chat, "a", "x", fake_delay=60)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        os.kill(pid, signal.SIGSTOP)
        status, body = stuck.result()
    assert status == 502
    assert body["error"]["code"] == "backend_gone"
    [event] = d.events("backend.unresponsive")
    assert (event["model"], event["misses"]) == ("a", 2)
    assert "health probes" in d.model("a")["error"]
    # Frozen seconds after ready: a failed start, so it restarts after a 1 s backoff.
    wait_for(lambda: d.events("model.backoff"), timeout=20)  # counted once the group is gone
    assert [e["failures"] for e in d.events("model.backoff")] == [1]
    wait_for(lambda: d.chat("a")[0] == 200, timeout=20, interval=0.2)
    assert d.model("a")["pid"] != pid


def test_concurrency_and_max_queue_answer_429_past_both(start_daemon: StartDaemon) -> None:
    """One runs, one waits, the third is refused with 429 and Retry-After."""
    d = start_daemon({"a": fake_preset("A", concurrency=1, max_queue=1)})
    assert d.chat("a")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(d.chat, "a", "1", fake_delay=6)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        second = pool.submit(d.chat, "a", "2")
        wait_for(lambda: d.model("a")["waiting"] == 1)
        status, headers, body = _chat_with_headers(d, "a")
        assert status == 429
        assert body["error"]["code"] == "queue_full"
        assert "Retry-After" in headers
        assert first.result()[0] == 200
        assert second.result()[0] == 200


def test_max_queue_zero_serves_what_concurrency_allows(start_daemon: StartDaemon) -> None:
    """``max_queue: 0`` is no queue beyond ``concurrency``: an idle model is served (was 429)."""
    d = start_daemon({"a": fake_preset("A", concurrency=1, max_queue=0, preload=True)})
    wait_for(lambda: d.model("a")["state"] == "ready")
    status, body = d.chat("a")
    assert status == 200, body
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(d.chat, "a", "1", fake_delay=6)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        assert d.chat("a", "2")[0] == 429  # the one place is taken, and nothing may wait
        assert first.result()[0] == 200


def test_max_queue_zero_without_concurrency_serves_a_ready_model(
    start_daemon: StartDaemon,
) -> None:
    """With no ``concurrency`` a ready model queues nothing: ``max_queue: 0`` refuses nothing."""
    d = start_daemon({"a": fake_preset("A", max_queue=0, preload=True)})
    wait_for(lambda: d.model("a")["state"] == "ready")
    status, body = d.chat("a")
    assert status == 200, body


def test_requests_within_concurrency_are_no_queue_while_the_model_loads(
    start_daemon: StartDaemon,
) -> None:
    """concurrency 2 + max_queue 1 takes three requests during a load too (the second was 429)."""
    d = start_daemon({"a": fake_preset("A", "--start-delay", "3", concurrency=2, max_queue=1)})
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(d.chat, "a", "1")
        wait_for(lambda: d.model("a")["waiting"] == 1)
        second = pool.submit(d.chat, "a", "2")
        wait_for(lambda: d.model("a")["waiting"] == 2)
        third = pool.submit(d.chat, "a", "3")
        wait_for(lambda: d.model("a")["waiting"] == 3)
        assert d.chat("a", "4")[0] == 429
        assert [f.result()[0] for f in (first, second, third)] == [200, 200, 200]


def test_a_request_waiting_past_max_wait_drains_the_busy_model_and_swaps(
    start_daemon: StartDaemon,
) -> None:
    """Clients that keep a busy no longer starve b: past max_wait, a is drained and swapped."""
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B")},
        {"max_running": 1, "max_wait": "1s", "queue_timeout": "60s"},
    )
    assert d.chat("a")[0] == 200
    stop = False

    def keep_busy() -> int:
        served = 0
        while not stop:
            if d.chat("a", "x", fake_delay=0.2)[0] == 200:
                served += 1
        return served

    with ThreadPoolExecutor(3) as pool:
        # One long request keeps a busy past max_wait whatever the busy loops' timing:
        # without it both loops can be between requests when b arrives, and b swaps
        # in at once with nothing to drain.
        long = pool.submit(d.chat, "a", "long", fake_delay=6)
        wait_for(lambda: d.model("a")["in_flight"] >= 1)
        busy = [pool.submit(keep_busy) for _ in range(2)]
        status, _ = d.chat("b")
        stop = True
        served = [f.result() for f in busy]
        assert long.result()[0] == 200
    assert status == 200
    assert all(n > 0 for n in served)
    [drain] = d.events("model.drain")[:1]
    assert (drain["models"], drain["reason"], drain["waiting"]) == (["a"], "max_wait", "b")
    # Drained while the long request (6 s, max_wait 1 s) was still in flight, not once
    # a's requests happened to pause: the wait wakes at max_wait by itself.
    long_done = wait_for(lambda: [e for e in d.events("request.done") if e["ms"] >= 5500])[0]
    assert drain["timestamp"] < long_done["timestamp"]


def test_a_model_drained_for_a_swap_that_took_another_serves_again(
    start_daemon: StartDaemon,
) -> None:
    """max_wait drains a for b; c falls idle first and is the one b takes: a serves again.

    With max_running 2 and both a and c busy, b waits on a (worth less than c, which was
    asked for more). Past max_wait a is drained; then c's request ends, c is idle, and b
    evicts it instead. Before, a's way back from the drain (draining -> ready) was a move
    the state table did not list: b's load failed with a 500 and a stayed draining.
    """
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B"), "c": fake_preset("C")},
        {"max_running": 2, "max_wait": "1s", "queue_timeout": "60s"},
    )
    for _ in range(3):
        assert d.chat("c")[0] == 200
    assert d.chat("a")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(d.chat, "a", "long", fake_delay=6)
        short = pool.submit(d.chat, "c", "short", fake_delay=2.5)
        wait_for(lambda: d.model("a")["in_flight"] == d.model("c")["in_flight"] == 1)
        status, _ = d.chat("b")
        assert (long.result()[0], short.result()[0]) == (200, 200)
    assert status == 200
    assert [e["models"] for e in d.events("model.drain")] == [["a"]]
    assert [e["victims"] for e in d.events("model.evict")] == [["c"]]
    wait_for(lambda: d.model("a")["state"] == "ready")
    assert d.chat("a")[0] == 200


def test_requests_queued_for_several_models_are_served_model_by_model(
    start_daemon: StartDaemon,
) -> None:
    """ABAB queued behind a busy model become AABB: one load of each, not one per request."""
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B"), "c": fake_preset("C")},
        {"max_running": 1, "max_wait": "1s", "queue_timeout": "60s"},
    )
    assert d.chat("c")[0] == 200
    with ThreadPoolExecutor(5) as pool:
        busy = pool.submit(d.chat, "c", "long", fake_delay=8)  # room for four sends
        wait_for(lambda: d.model("c")["in_flight"] == 1)
        queued = []
        for arrived, model in enumerate(("a", "b", "a", "b"), start=1):
            queued.append(pool.submit(d.chat, model, "x", fake_delay=0.3))
            # In this order: each waits before the next is sent.
            wait_for(lambda n=arrived: d.model("a")["waiting"] + d.model("b")["waiting"] == n)
        assert busy.result()[0] == 200
        assert [f.result()[0] for f in queued] == [200] * 4
    spawned = [e["model"] for e in d.events("backend.spawn")]
    assert sorted(spawned) == ["a", "b", "c"], spawned


def test_a_command_preset_without_memory_counts_default_memory(
    start_daemon: StartDaemon,
) -> None:
    """With nothing to estimate from, admission uses default_memory until it has measured."""
    d = start_daemon({"a": fake_preset("A")}, {"default_memory": "300MiB"})
    assert d.chat("a")[0] == 200
    memory = d.model("a")["memory"]
    assert (memory["need"], memory["need_source"]) == (300 * 1024**2, "default")


def test_a_refusal_for_default_memory_says_where_the_number_came_from(
    start_daemon: StartDaemon,
) -> None:
    """A preset that names no size is refused for 1 GiB: the 503 says it is default_memory."""
    d = start_daemon({"a": fake_preset("A")}, {"budget": "600MiB"})
    status, body = d.chat("a")
    assert (status, body["error"]["code"]) == (503, "insufficient_memory")
    message = body["error"]["message"]
    assert "needs 1.0 GiB" in message
    assert "default_memory" in message
    assert "memory:" in message  # how to say what it really needs
    assert "default_memory" in d.model("a")["error"]


def test_a_bad_footprint_entry_is_dropped_with_a_warning(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A footprints.json entry of the wrong type is ignored, never a 500."""
    d = Daemon(tmp_path / "swapd0", {"a": fake_preset("A")})
    (d.root / "state").mkdir(parents=True)
    (d.root / "state" / "footprints.json").write_text(json.dumps({"a": "garbage", "b": 3}))
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    assert sorted(e["model"] for e in d.events("footprints.drop")) == ["a", "b"]


def test_a_model_refused_for_memory_stays_stopped_with_the_reason(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """No room is not a failure of the model: it stays stopped, the reason as its error."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 2 * GIB, "outside": 0}})
    d = start_daemon(
        {"big": fake_preset("B", "--probe-file", str(probe), memory=4 * GIB)},
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    status, headers, body = _chat_with_headers(d, "big")
    assert (status, body["error"]["code"]) == (503, "insufficient_memory")
    assert headers["Retry-After"] == "5"  # a balancer in front cools this host down
    model = d.model("big")
    assert model["state"] == "stopped"
    assert "needs 4.0 GiB" in model["error"]


def test_a_second_unload_while_draining_waits_for_the_request_too(
    start_daemon: StartDaemon,
) -> None:
    """An unload of a model already draining does not cut what is in flight.

    It used to stop the model at once, as force does: a repeated unload (or one during a
    reload's restart) cut every open stream.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    with ThreadPoolExecutor(3) as pool:
        slow = pool.submit(d.chat, "a", "x", fake_delay=2)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        first = pool.submit(d.request, "POST", "/swapd/models/a/unload", None, 30)
        wait_for(lambda: d.model("a")["state"] == "draining")
        second = pool.submit(d.request, "POST", "/swapd/models/a/unload", None, 30)
        assert slow.result()[0] == 200
        assert first.result()[1]["state"] == second.result()[1]["state"] == "stopped"


def test_force_unload_stops_a_model_mid_start_and_answers_its_waiters(
    start_daemon: StartDaemon,
) -> None:
    """unload?force=true does not wait for a start: it is cancelled and its group stopped.

    It used to wait for the whole start (here a minute) before stopping anything. The
    request that waited for the load gets 503 ``unavailable`` saying why.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", "60", start_timeout="120s")})
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(d.chat, "a")
        # A start shows its pid once spawned: the state comes first.
        pid = wait_for(lambda: (m := d.model("a"))["state"] == "starting" and m["pid"])
        status, body = d.request("POST", "/swapd/models/a/unload?force=true", timeout=30)
        assert (status, body["state"]) == (200, "stopped")
        status, answer = waiting.result()
    assert status == 503
    assert answer["error"]["code"] == "unavailable"
    assert "unloaded" in answer["error"]["message"]
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    assert d.model("a")["state"] == "stopped"


def test_force_unload_answers_the_waiters_before_the_cut_start_has_stopped(
    start_daemon: StartDaemon,
) -> None:
    """The waiters of a start a forced unload cut get 503 at once, not after its stop.

    Its group ignores SIGTERM, so the stop takes its stop_timeout (20 s): the waiting
    request was answered only after it.
    """
    preset = fake_preset(
        "A", "--start-delay", "60", "--ignore-sigterm", start_timeout="120s", stop_timeout="20s"
    )
    d = start_daemon({"a": preset})
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(d.chat, "a")
        wait_for(lambda: (m := d.model("a"))["state"] == "starting" and m["pid"])
        # Listening, its SIGTERM handler is in place.
        wait_for(lambda: any("listening" in ln for ln in d.get("/swapd/models/a/logs")[1]["lines"]))
        unload = pool.submit(d.request, "POST", "/swapd/models/a/unload?force=true", None, 60)
        status, answer = waiting.result(timeout=10)
        assert (status, answer["error"]["code"]) == (503, "unavailable"), answer
        assert not unload.done()  # the cut start's stop goes on, within its stop_timeout
        assert unload.result()[0] == 200
    assert d.model("a")["state"] == "stopped"


SLOW_SIZING = """
import time
import swapd.manager

sized = swapd.manager._file_facts


def slowly(*args):  # the first start sizes its model off the loop: here, for 5 s
    time.sleep(5)
    return sized(*args)


swapd.manager._file_facts = slowly
"""


def test_force_unload_before_the_spawn_leaves_the_model_stopped(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Cancelled while STARTING but before the spawn (sizing the model, building the launch).

    It used to stay ``starting`` with no process, answering every later request with a
    500 and keeping its device slot. The window is widened here by a delay that
    swapd's own interpreter loads (``sitecustomize``); the code path is unchanged.
    """
    model = tmp_path / "weights.bin"
    model.write_bytes(b"\0" * 1024)
    slow = fake_preset("A", model=str(model))
    d = start_daemon(
        {"a": slow, "b": fake_preset("B")},
        {"max_running": 1},
        env=hook_env(tmp_path / "hook", SLOW_SIZING),
    )
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(d.request, "POST", "/swapd/models/a/load")
        wait_for(lambda: d.model("a")["state"] == "starting")
        assert d.model("a")["pid"] is None  # not spawned yet
        status, body = d.request("POST", "/swapd/models/a/unload?force=true", timeout=30)
        assert (status, body["state"]) == (200, "stopped")
        assert waiting.result()[0] == 503
    assert (d.model("a")["state"], d.model("a")["tier"]) == ("stopped", "disk")
    assert d.chat("b")[0] == 200  # its max_running slot is free
    assert d.chat("a")[0] == 200


def test_a_forced_unload_racing_a_load_never_leaves_the_model_queued(
    start_daemon: StartDaemon,
) -> None:
    """A load, and a forced unload right behind it on another connection, ten times over.

    When the unload cancelled the load before its task's first step, no cleanup ran and
    the model stayed ``queued`` for good, every later request a 500 (most rounds hit it).
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", "0.3")})
    head = b" HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    load, unload = (
        b"POST /swapd/models/a/load" + head,
        b"POST /swapd/models/a/unload?force=true" + head,
    )
    for _ in range(10):
        with (
            socket.create_connection(("127.0.0.1", d.port)) as first,
            socket.create_connection(("127.0.0.1", d.port)) as second,
        ):
            time.sleep(0.05)  # both accepted and idle: the two requests then race
            first.sendall(load)
            second.sendall(unload)
            first.settimeout(30)
            second.settimeout(30)
            assert first.recv(4096).split(b" ")[1] in {b"200", b"503"}  # loaded, or cut
            assert second.recv(4096).split(b" ")[1] == b"200"
        wait_for(lambda: d.model("a")["state"] in {"stopped", "ready"}, timeout=10)
        assert d.request("POST", "/swapd/models/a/unload?force=true")[0] == 200
    assert d.chat("a")[0] == 200


def test_a_force_value_that_is_not_a_boolean_is_a_400_and_unloads_nothing(
    start_daemon: StartDaemon,
) -> None:
    """``?force=ture`` must not quietly become a graceful unload that waits on every request."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    for value in ("ture", "2", ""):
        status, body = d.request("POST", f"/swapd/models/a/unload?force={value}")
        assert (status, body["error"]["type"]) == (400, "invalid_request_error"), body
        assert "force must be true or false" in body["error"]["message"]
    assert d.model("a")["state"] == "ready"
    status, body = d.request("POST", "/swapd/models/a/unload?force=false")
    assert (status, body["state"]) == (200, "stopped")


def test_force_unload_cuts_requests_in_flight(start_daemon: StartDaemon) -> None:
    """unload?force=true stops at once; the request in flight gets 502 backend_gone."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(d.chat, "a", "x", fake_delay=60)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        status, body = d.request("POST", "/swapd/models/a/unload?force=true", timeout=30)
        assert (status, body["state"]) == (200, "stopped")
        status, body = stuck.result()
    assert status == 502
    assert body["error"]["code"] == "backend_gone"


# Loaded by swapd's interpreter (``sitecustomize``): reaping a dead backend's group takes
# 3 s more the first time, the window in which an unload can land.
SLOW_REAP = """
import asyncio

import swapd.process

stop = swapd.process.Child.stop
slowed = set()


async def slowly(self, timeout):
    if self.exit_code is not None and id(self) not in slowed:
        slowed.add(id(self))
        await asyncio.sleep(3)
    return await stop(self, timeout)


swapd.process.Child.stop = slowly
"""


@pytest.mark.parametrize("force", [False, True])
def test_an_unload_while_a_crashed_backend_is_reaped_leaves_it_stopped(
    start_daemon: StartDaemon, tmp_path: Path, *, force: bool
) -> None:
    """The unload waits for the dead group to be reaped, then the model is stopped.

    It answered ``failed`` at once, and the reaping went on to count a failure: the model
    backed off (503) after the user had unloaded it.
    """
    d = start_daemon(
        {"a": fake_preset("A", "--crash-after", "1")}, env=hook_env(tmp_path / "hook", SLOW_REAP)
    )
    assert d.chat("a")[0] == 200
    assert d.chat("a")[0] == 502  # the backend dies on its second request
    wait_for(lambda: d.model("a")["state"] == "failed")
    query = "?force=true" if force else ""
    status, body = d.request("POST", f"/swapd/models/a/unload{query}")
    assert (status, body["state"], body["pid"]) == (200, "stopped", None)
    assert d.model("a")["state"] == "stopped"
    assert d.chat("a")[0] == 200  # started afresh, not refused for a backoff


def test_a_load_whose_client_hung_up_still_expires(start_daemon: StartDaemon) -> None:
    """The only requester of a slow start hangs up: the model still stops after its TTL.

    Only a lease's end armed the TTL, and this load had none: ready, idle, for good.
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", "2", ttl="1s")})
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(TimeoutError):  # the client gives up while the backend starts
        d.request("POST", "/v1/chat/completions", body, timeout=0.5)
    wait_for(lambda: d.model("a")["state"] == "ready")
    wait_for(lambda: d.model("a")["state"] == "stopped")
    assert [e["model"] for e in d.events("model.ttl.expire")] == ["a"]
