"""``GET /metrics``: the names and labels dashboards rely on, read without side effects."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, fake_stats, wait_for
from fakes import probe_file
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ADMIN_KEY = "admin-key-0123456789abcdef"
INFERENCE_KEY = "inference-key-0123456789abcdef"
GIB = 1024**3


def scrape(d: Daemon, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of one scrape, by name and sorted labels."""
    request = urllib.request.Request(d.url + "/metrics", headers=headers or {})  # noqa: S310
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_text(d: Daemon) -> str:
    """One scrape's text, as Prometheus reads it."""
    status, text = d.get("/metrics")
    assert status == 200
    assert isinstance(text, str)
    return text


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when the series is absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def test_requests_loads_and_states_are_counted_under_the_issue_names(
    start_daemon: StartDaemon,
) -> None:
    """Requests by model and code, their times, loads by tier, state, in flight, memory."""
    d = start_daemon({"a": fake_preset("A", aliases=["alpha"]), "b": fake_preset("B")})
    assert d.chat("alpha")[0] == 200
    assert d.chat("a")[0] == 200
    assert d.chat("nope")[0] == 404
    m = scrape(d)
    assert value(m, "swapd_requests_total", model="a", code="200") == 2
    assert value(m, "swapd_requests_total", model="", code="404") == 1  # never what was typed
    assert value(m, "swapd_request_seconds_count", model="a") == 2
    assert value(m, "swapd_time_to_first_byte_seconds_count", model="a") == 2
    assert value(m, "swapd_loads_total", model="a", from_tier="disk") == 1
    assert value(m, "swapd_load_seconds_count", model="a", from_tier="disk") == 1
    assert value(m, "swapd_model_state", model="a", state="ready", tier="device") == 1
    assert value(m, "swapd_model_state", model="b", state="stopped", tier="disk") == 1
    assert value(m, "swapd_in_flight", model="a") == 0
    assert value(m, "swapd_queue_waiting", model="b") == 0
    memory = {
        kind: value(m, "swapd_device_memory_bytes", device="cpu", kind=kind)
        for kind in ("total", "free", "swapd", "outside")
    }
    assert all(v is not None for v in memory.values()), memory
    assert sum(memory[k] or 0 for k in ("free", "swapd", "outside")) == memory["total"]
    assert (memory["swapd"] or 0) > 0  # a's fake backend
    assert not [k for k in m if k[0].endswith("_created")]


def test_evictions_are_counted_with_their_reason(start_daemon: StartDaemon) -> None:
    """A model pushed off by another's load counts as evicted for ``evict``."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")}, {"max_running": 1})
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    assert value(scrape(d), "swapd_evictions_total", model="a", reason="evict") == 1


def test_max_running_lowered_by_a_reload_counts_as_its_own_reason(
    start_daemon: StartDaemon,
) -> None:
    """A model taken off by a lower ``max_running`` counts under ``max_running``.

    The series' HELP line names that reason with the others (it listed four of five).
    """
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")}, {"max_running": 2})
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    d.settings = {"max_running": 1}
    d.write()
    assert d.request("POST", "/swapd/reload")[0] == 200
    wait_for(lambda: scrape_text(d).count('reason="max_running"} 1.0') == 1)
    [help_line] = [
        line
        for line in scrape_text(d).splitlines()
        if line.startswith("# HELP swapd_evictions_total ")
    ]
    for reason in ("evict", "ttl", "ram_ttl", "ram_budget", "max_running"):
        assert reason in help_line, help_line


def test_a_model_removed_by_a_reload_leaves_no_series(start_daemon: StartDaemon) -> None:
    """Labels name configured models only: a removed model's loads and evictions go too.

    Its request series went, its load and eviction series stayed for good.
    """
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")}, {"max_running": 1})
    assert d.chat("b")[0] == 200
    assert d.chat("a")[0] == 200  # b evicted
    assert value(scrape(d), "swapd_evictions_total", model="b", reason="evict") == 1
    (d.root / "presets" / "b.yaml").unlink()
    assert d.request("POST", "/swapd/reload")[1]["removed"] == ["b"]
    wait_for(lambda: not [k for k in scrape(d) if ("model", "b") in k[1]])
    m = scrape(d)
    assert value(m, "swapd_loads_total", model="a", from_tier="disk") == 1
    assert value(m, "swapd_evictions_total", model="b", reason="evict") is None


def test_a_scrape_never_starts_a_model_nor_resets_its_ttl(start_daemon: StartDaemon) -> None:
    """Scrapes read views: a stopped model stays stopped, a ready one's TTL runs on."""
    d = start_daemon({"a": fake_preset("A", ttl="1h"), "b": fake_preset("B")})
    assert d.chat("a")[0] == 200
    last_used = d.model("a")["last_used"]
    left = d.model("a")["ttl_left"]
    time.sleep(0.2)
    for _ in range(3):
        scrape(d)
    assert d.model("b")["state"] == "stopped"
    assert d.model("a")["last_used"] == pytest.approx(last_used, abs=0.05)  # wall from monotonic
    assert d.model("a")["ttl_left"] < left


def test_a_client_that_hangs_up_counts_as_499_not_as_a_server_error(
    start_daemon: StartDaemon,
) -> None:
    """Closing the connection mid-answer is 499 in metrics and in request.done."""
    d = start_daemon({"a": fake_preset("A", "--chunks", "200", "--chunk-interval", "0.05")})
    assert d.chat("a")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    resp = conn.getresponse()
    resp.readline()
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: fake_stats(d.model("a")["port"])["cancelled"] == 1)
    wait_for(lambda: value(scrape(d), "swapd_requests_total", model="a", code="499") == 1)
    assert value(scrape(d), "swapd_requests_total", model="a", code="500") is None
    wait_for(lambda: [e for e in d.events("request.done") if e["status"] == 499])
    assert not d.events("request.error")


def test_metrics_need_an_admin_key_once_keys_are_set(start_daemon: StartDaemon) -> None:
    """With keys, /metrics follows the control routes' rule (metrics_public lifts it)."""
    d = start_daemon({"a": fake_preset("A")}, {"admin_keys": [ADMIN_KEY]})
    assert d.get("/metrics")[0] == 401
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert value(scrape(d, admin), "swapd_in_flight", model="a") == 0
    assert d.model("a", {"x-api-key": ADMIN_KEY})["state"] == "stopped"


def test_a_long_configured_name_is_counted_under_its_name(start_daemon: StartDaemon) -> None:
    """Names are clipped to 120 characters in log lines only: the metric finds the model.

    The clipped text was looked up among the configured names, so a longer one counted as
    an unknown model (``model=""``).
    """
    name = "org/" + "m" * 130
    d = start_daemon({"long": {**fake_preset("L"), "name": name}})
    assert d.chat(name)[0] == 200
    m = scrape(d)
    assert value(m, "swapd_requests_total", model="", code="200") is None
    assert value(m, "swapd_requests_total", model=name, code="200") == 1


def test_a_refused_passthrough_route_is_counted_under_its_model(start_daemon: StartDaemon) -> None:
    """``/upstream/a/sleep`` is refused (403) for model a: its count names a, not ``""``."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.request("POST", "/upstream/a/sleep", "")[0] == 403
    m = scrape(d)
    assert value(m, "swapd_requests_total", model="a", code="403") == 1
    assert value(m, "swapd_requests_total", model="", code="403") is None


def test_a_device_reading_that_fails_leaves_the_other_metrics_scraped(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """No device answers (a GPU lost): the scrape still answers, without device memory.

    The reading raised through the scrape: every scrape was a 500, and the request,
    load and state series went dark exactly when the device failed.
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    d = start_daemon(
        {"a": fake_preset("A", "--probe-file", str(probe), memory=GIB)},
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    assert d.chat("a")[0] == 200
    assert value(scrape(d), "swapd_device_memory_bytes", device="gpu0", kind="total") == 8 * GIB
    good = probe.read_text()
    probe.write_text("{not json")
    m = scrape(d)
    assert value(m, "swapd_requests_total", model="a", code="200") == 1
    assert value(m, "swapd_model_state", model="a", state="ready", tier="device") == 1
    assert not [k for k in m if k[0] == "swapd_device_memory_bytes"]
    probe.write_text(good)
    assert value(scrape(d), "swapd_device_memory_bytes", device="gpu0", kind="total") == 8 * GIB


def test_a_stream_its_client_left_after_the_first_chunk_still_times_its_first_byte(
    start_daemon: StartDaemon,
) -> None:
    """The backend's answer began: the time to it counts, though the request ends as 499.

    Only answers below 400 were timed, so a client that read the first chunk and hung up
    (a slow stream abandoned) was left out of the first-byte histogram.
    """
    d = start_daemon({"a": fake_preset("A", "--chunks", "200", "--chunk-interval", "0.05")})
    assert d.chat("a")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: value(scrape(d), "swapd_requests_total", model="a", code="499") == 1)
    m = scrape(d)
    assert value(m, "swapd_request_seconds_count", model="a") == 2
    assert value(m, "swapd_time_to_first_byte_seconds_count", model="a") == 2


def test_requests_refused_for_want_of_a_key_are_counted(start_daemon: StartDaemon) -> None:
    """A 401 on an inference or ``/upstream/`` route counts (``model=""``: the body is unread).

    The access checks refuse before the handler, which marked a request as counted: the
    refusals were in ``request.done`` but never in ``swapd_requests_total``, so a client
    with a lost key was invisible on a dashboard. Other routes stay uncounted.
    """
    d = start_daemon(
        {"a": fake_preset("A")}, {"admin_keys": [ADMIN_KEY], "api_keys": [INFERENCE_KEY]}
    )
    assert d.chat("a")[0] == 401
    assert d.request("GET", "/upstream/a/props")[0] == 401
    assert d.get("/v1/models")[0] == 401
    assert d.get("/swapd/status")[0] == 401
    m = scrape(d, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert value(m, "swapd_requests_total", model="", code="401") == 2
    assert value(m, "swapd_request_seconds_count", model="") == 2
    assert value(m, "swapd_time_to_first_byte_seconds_count", model="") is None


def test_a_backend_error_answer_in_one_piece_times_its_first_byte(
    start_daemon: StartDaemon,
) -> None:
    """A backend's own error (a sized 404, an HTML 500) is its answer: the time to it counts.

    Only sized answers below 400 were timed: a backend refusing a prompt (llama-server's
    400 for a context too long) was left out of the histogram, a stream of it was not.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    assert d.request("GET", "/upstream/a/no/such/route")[0] == 404
    assert d.chat("a", fake_chunked_error=500)[0] == 500  # its text put in the envelope
    assert d.chat("nope")[0] == 404  # swapd's own answer: no backend's byte to time
    m = scrape(d)
    assert value(m, "swapd_requests_total", model="a", code="404") == 1
    assert value(m, "swapd_time_to_first_byte_seconds_count", model="a") == 3
    assert value(m, "swapd_time_to_first_byte_seconds_count", model="") is None


def test_a_backend_error_behind_cold_load_pings_times_its_first_byte(
    start_daemon: StartDaemon,
) -> None:
    """A streamed request that waited for the load with pings, answered by a backend error.

    The error is the backend's answer, in the stream the pings opened: timed as a sized
    or streamed error of a ready model is (the pings themselves are not).
    """
    d = start_daemon({"a": fake_preset("A", "--start-delay", "4")})  # past the first ping
    body = {"model": "a", "stream": True, "fake_chunked_error": 500}
    status, text = d.request("POST", "/v1/chat/completions", {**body, "messages": []})
    assert status == 200  # the pings' own
    assert ": loading" in text
    assert "the backend broke" in text
    m = scrape(d)
    assert value(m, "swapd_requests_total", model="a", code="500") == 1
    assert value(m, "swapd_time_to_first_byte_seconds_count", model="a") == 1


def test_each_tiers_bytes_and_budget_are_scraped_as_status_counts_them(
    start_daemon: StartDaemon,
) -> None:
    """A dashboard reads the tiers' fill against their budgets without polling status."""
    d = start_daemon(
        {"a": fake_preset("A", "--mem-bytes", str(64 * 2**20))}, {"ram_budget": "3GiB"}
    )
    assert d.chat("a")[0] == 200
    wait_for(lambda: d.events("model.measure"))
    tiers = d.get("/swapd/status")[1]["tiers"]
    m = scrape(d)
    assert tiers["device"]["bytes"] > 0
    assert value(m, "swapd_tier_bytes", tier="device") == tiers["device"]["bytes"]
    assert value(m, "swapd_tier_bytes", tier="ram") == tiers["ram"]["bytes"] == 0
    assert value(m, "swapd_tier_budget_bytes", tier="ram") == 3 * GIB
    # No budget set for the device tier, and no cache: no series rather than a made-up one.
    assert value(m, "swapd_tier_budget_bytes", tier="device") is None
    assert value(m, "swapd_tier_bytes", tier="disk") is None
