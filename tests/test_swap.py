"""The swap path end to end: a real swapd, fake upstreams run as real subprocesses."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
from conftest import StartDaemon
from daemon import fake_preset, fake_stats, wait_for


def test_swap_a_to_b_to_a_answers_from_the_right_backend(start_daemon: StartDaemon) -> None:
    """With max_running 1, each request is answered by its own model's backend, swapping."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")}, {"max_running": 1})
    answers = []
    for model in ("a", "b", "a"):
        status, body = d.chat(model, "hello")
        assert status == 200, body
        answers.append(body["choices"][0]["message"]["content"])
        others = [m for m in ("a", "b") if m != model]
        assert d.model(model)["state"] == "ready"
        assert all(d.model(o)["state"] == "stopped" for o in others)
    assert answers == ["A: hello", "B: hello", "A: hello"]
    assert [e["victims"] for e in d.events("model.evict")] == [["a"], ["b"]]


def test_concurrent_requests_during_a_load_share_one_load(start_daemon: StartDaemon) -> None:
    """Twenty requests arriving while a model loads all wait for the same single start."""
    d = start_daemon({"slow": fake_preset("S", "--start-delay", "1.5")})
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: d.chat("slow", f"q{i}"), range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert sorted(b["choices"][0]["message"]["content"] for _, b in results) == sorted(
        f"S: q{i}" for i in range(20)
    )
    assert len(d.events("backend.spawn")) == 1
    stats = fake_stats(d.model("slow")["port"])
    assert stats["completions"] == 20


def test_in_flight_request_is_never_cut_by_a_swap(start_daemon: StartDaemon) -> None:
    """A swap waits for the running model's in-flight request to finish before stopping it."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")}, {"max_running": 1})
    assert d.chat("a", "warm")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        long_a = pool.submit(d.chat, "a", "long", fake_delay=2.0)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        then_b = pool.submit(d.chat, "b", "next")
        status_a, body_a = long_a.result()
        status_b, body_b = then_b.result()
    assert (status_a, body_a["choices"][0]["message"]["content"]) == (200, "A: long")
    assert (status_b, body_b["choices"][0]["message"]["content"]) == (200, "B: next")
    stop_a = next(e for e in d.events("model.stop") if e["model"] == "a")
    done_a = wait_for(lambda: [e for e in d.events("request.done") if e["ms"] > 1500])[0]
    assert stop_a["timestamp"] >= done_a["timestamp"]


def test_streamed_chunks_arrive_as_they_are_produced(start_daemon: StartDaemon) -> None:
    """SSE passes through unbuffered: the first chunk arrives before the last is produced."""
    extra = ("--chunks", "4", "--chunk-interval", "0.4")
    d = start_daemon({"s": fake_preset("S", *extra)})
    assert d.chat("s")[0] == 200  # load first, so timing covers streaming only
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    body = {"model": "s", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("X-Accel-Buffering") == "no"
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    arrivals, produced = [], []
    while line := resp.readline():
        if line.startswith(b"data: {"):
            arrivals.append(time.time())
            produced.append(json.loads(line[6:])["produced_at"])
    conn.close()
    assert len(produced) == 4
    assert arrivals[0] < produced[-1]
    assert all(a >= p for a, p in zip(arrivals, produced, strict=True))


def test_client_disconnect_cancels_the_upstream_request(start_daemon: StartDaemon) -> None:
    """A client that hangs up mid-stream makes swapd close the upstream request."""
    d = start_daemon({"s": fake_preset("S", "--chunks", "100", "--chunk-interval", "0.1")})
    assert d.chat("s")[0] == 200
    port = d.model("s")["port"]
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    body = {"model": "s", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    resp.readline()
    conn.close()
    wait_for(lambda: fake_stats(port)["cancelled"] == 1, timeout=10)
    wait_for(lambda: d.model("s")["in_flight"] == 0, timeout=10)


def test_idle_ttl_stops_a_model_and_monitoring_never_resets_it(start_daemon: StartDaemon) -> None:
    """After ttl idle the model stops; health, lists and status never reset or start it."""
    d = start_daemon({"t": fake_preset("T", ttl="1s"), "idle": fake_preset("I")})
    assert d.chat("t")[0] == 200

    def polled_until_stopped() -> bool:
        for path in ("/health", "/v1/models", "/swapd/status"):
            assert d.get(path)[0] == 200
        return bool(d.model("t")["state"] == "stopped")

    wait_for(polled_until_stopped, timeout=10, interval=0.1)
    assert [e["model"] for e in d.events("model.ttl.expire")] == ["t"]
    assert d.model("idle")["state"] == "stopped"
    assert not d.events("backend.spawn")[1:]


def test_failed_start_answers_every_waiter_with_exit_code_and_output(
    start_daemon: StartDaemon,
) -> None:
    """A backend dying while starting fails every waiter with its exit code and output."""
    d = start_daemon({"bad": fake_preset("X", "--exit-at-start", "7")})
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: d.chat("bad"), range(3)))
    for status, body in results:
        assert status == 502
        assert body["error"]["code"] == "backend_start_failed"
        assert "exited with 7" in body["error"]["message"]
        assert "configured to exit with 7" in body["error"]["message"]
    assert d.model("bad")["state"] in {
        "backoff",
        "failed",
    }  # backing off, or failed once its 1 s is up
    assert d.model("bad")["failures"] == 1
    assert len(d.events("backend.spawn")) == 1  # the burst made one spawn


def test_start_timeout_fails_and_kills_the_backend(start_daemon: StartDaemon) -> None:
    """A backend not ready within start_timeout is killed and the request gets a 502 saying so."""
    d = start_daemon({"slow": fake_preset("S", "--start-delay", "60", start_timeout="1s")})
    status, body = d.chat("slow")
    assert status == 502
    assert "did not become ready in time" in body["error"]["message"]
    assert d.leftovers() == [] or wait_for(lambda: not d.leftovers(), timeout=10)


def test_stop_escalates_to_sigkill_for_a_backend_that_ignores_sigterm(
    start_daemon: StartDaemon,
) -> None:
    """Unload of a backend ignoring SIGTERM SIGKILLs its group after stop_timeout."""
    d = start_daemon({"stub": fake_preset("S", "--ignore-sigterm", stop_timeout="1s")})
    assert d.chat("stub")[0] == 200
    pid = d.model("stub")["pid"]
    status, body = d.request("POST", "/swapd/models/stub/unload")
    assert (status, body["state"]) == (200, "stopped")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert [e["model"] for e in d.events("backend.kill")] == ["stub"]


def test_a_forked_helper_is_stopped_with_its_backend(start_daemon: StartDaemon) -> None:
    """Stopping a backend also ends the processes it forked into its group."""
    d = start_daemon({"f": fake_preset("F", "--fork-child")})
    assert d.chat("f")[0] == 200
    child = fake_stats(d.model("f")["port"])["child_pid"]
    assert isinstance(child, int)
    assert psutil.pid_exists(child)
    assert d.request("POST", "/swapd/models/f/unload")[0] == 200
    wait_for(lambda: not psutil.pid_exists(child), timeout=5)


def test_crash_of_one_backend_leaves_the_others_and_the_daemon_serving(
    start_daemon: StartDaemon,
) -> None:
    """A backend dying mid-request gives a 502; others keep serving; next use restarts it.

    Dead within a minute of ready, it first backs off (a failed start); then it restarts.
    """
    d = start_daemon(
        {"crashy": fake_preset("C", "--crash-after", "1"), "steady": fake_preset("S")},
        {"max_running": 2},
    )
    assert d.chat("crashy")[0] == 200
    assert d.chat("steady")[0] == 200
    status, body = d.chat("crashy")
    assert status == 502
    assert body["error"]["code"] == "backend_gone"
    wait_for(lambda: d.model("crashy")["state"] in ("failed", "backoff"))
    status, body = d.chat("steady", "still")
    assert (status, body["choices"][0]["message"]["content"]) == (200, "S: still")
    assert d.model("steady")["state"] == "ready"
    answers: list[Any] = []

    def served() -> bool:
        answers[:] = d.chat("crashy", "again")
        return bool(answers[0] == 200)

    wait_for(served, timeout=20, interval=0.2)  # 503 backoff until its second is over
    assert answers[1]["choices"][0]["message"]["content"] == "C: again"
