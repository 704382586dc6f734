"""What swapd reports against what happened: ``/swapd/events`` after moves without a state change.

The change feed sends a model's status entry at each state move. Fields that change later,
with no move of their own (a sleeper's ram bytes, the breaker's count and error, locked
pages given up), must still reach it: a dashboard fed by the stream otherwise shows, at
rest, what ``/swapd/status`` and ``/metrics`` no longer say. Each test loads a barrier
model last, so every view published before it has reached the reader.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import FAKE_UPSTREAM, Daemon, fake_preset, wait_for
from test_events import Events
from test_metrics import scrape, value
from test_reload import Stream
from test_tiers import HOLD, vllm_preset

BARRIER = fake_preset("BARRIER", memory="1MiB")


def _last_view(events: Events, name: str) -> dict[str, Any]:
    """The feed's latest status entry for ``name``."""
    views = [data for event, data in list(events.got) if event == "model" and data["name"] == name]
    assert views, f"no view of {name} in the feed"
    latest: dict[str, Any] = views[-1]
    return latest


def _settle(d: Daemon, events: Events) -> None:
    """Load the barrier model: every view published before its load is in ``events``."""
    assert d.request("POST", "/swapd/models/barrier/load")[0] == 200
    wait_for(lambda: "ready" in events.states("barrier"))


def _fake_llama_server(path: Path) -> Path:
    """A stand-in llama-server: answers ``--help``, else runs the fake upstream on ``--port``."""
    path.write_text(
        "#!/bin/sh\n"
        'case "$1" in --help) echo "-c,  --ctx-size N"; exit 0;; esac\n'
        'port=""\n'
        'while [ $# -gt 0 ]; do [ "$1" = "--port" ] && port="$2"; shift; done\n'
        f'exec {sys.executable} {FAKE_UPSTREAM} --port "$port" --name T\n'
    )
    path.chmod(0o755)
    return path


def test_the_feed_shows_the_ram_bytes_of_a_model_put_to_sleep(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """A vLLM put to sleep by its TTL: the feed's entry says what it holds in the ram tier.

    The asleep view went out before the sleeper's cost was read, and nothing published
    it after: the feed kept ``memory.ram`` 0 while status counted the bytes in ``tiers``.
    """
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s"), "barrier": BARRIER},
        env={"FAKE_VLLM_HOLD_BYTES": str(HOLD)},
    )
    events = Events(d)
    try:
        assert d.chat("v")[0] == 200
        wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
        wait_for(lambda: d.events("model.sleep"))  # logged once the ram cost is recorded
        status = d.model("v")
        assert status["memory"]["ram"] > 0
        _settle(d, events)
        seen = _last_view(events, "v")
        assert (seen["state"], seen["tier"]) == ("asleep", "ram")
        assert seen["memory"]["ram"] == d.model("v")["memory"]["ram"], (
            f"feed: {seen['memory']}, status: {d.model('v')['memory']}"
        )
    finally:
        events.close()


def test_the_feed_shows_the_breaker_opening(start_daemon: StartDaemon) -> None:
    """The fifth failed start in a row: the feed says so, with the error, as status does.

    The move to ``failed`` was published before the failure was counted and its error
    kept, and an open breaker makes no further move: the feed's last entry said 4
    failures and no error while status said 5 and why.
    """
    d = start_daemon({"a": fake_preset("A", "--exit-at-start", "3"), "barrier": BARRIER})
    events = Events(d)
    try:
        for _ in range(5):
            # Each backoff ends in ``failed``; the next request starts it again.
            wait_for(lambda: d.model("a")["state"] == "failed" or not d.model("a")["failures"])
            assert d.chat("a")[0] == 502
        status = d.model("a")
        assert (status["state"], status["failures"]) == ("failed", 5)
        assert status["error"]
        assert d.chat("a")[1]["error"]["code"] == "backend_failed"
        _settle(d, events)
        seen = _last_view(events, "a")
        assert (seen["state"], seen["failures"], seen["error"]) == (
            "failed",
            5,
            status["error"],
        ), f"feed: {seen['state']}, {seen['failures']} failures, error {seen['error']!r}"
    finally:
        events.close()


def test_the_feed_shows_locked_pages_going_down_to_disk(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """A llama-server's pages leave the ram tier at ``ram_ttl``: the feed shows tier disk.

    Dropping the pages changes the tier without a state move (stopped stays stopped),
    and nothing published it: the feed kept tier ram, with its bytes, for good, while
    status and ``swapd_model_state`` said disk.
    """
    binary = _fake_llama_server(tmp_path / "llama-server")
    preset = {"model": str(tiny_gguf), "binary": str(binary), "ttl": "1s", "ram_ttl": "2s"}
    d = start_daemon({"t": {"backend": "llama-server", **preset}, "barrier": BARRIER})
    events = Events(d)
    try:
        assert d.chat("t")[0] == 200
        wait_for(lambda: d.model("t")["tier"] == "ram", timeout=30)
        wait_for(lambda: d.model("t")["tier"] == "disk", timeout=30)
        assert value(scrape(d), "swapd_evictions_total", model="t", reason="ram_ttl") == 1
        assert value(scrape(d), "swapd_model_state", model="t", state="stopped", tier="disk") == 1
        _settle(d, events)
        seen = _last_view(events, "t")
        assert (seen["state"], seen["tier"], seen["pages"], seen["memory"]["ram"]) == (
            "stopped",
            "disk",
            None,
            0,
        ), f"feed: {seen['state']}, {seen['tier']}, {seen['pages']}, {seen['memory']}"
    finally:
        events.close()


def test_the_feed_shows_pages_released_after_a_start_from_them(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """A start from locked pages lets them go once ready: the feed shows none left.

    The ready view went out while the pages were still held, then they were dropped with
    no view published: the feed kept ``pages`` locked and ``memory.ram`` at the file's
    size for a serving model whose status says none.
    """
    binary = _fake_llama_server(tmp_path / "llama-server")
    preset = {"model": str(tiny_gguf), "binary": str(binary), "ttl": "1s"}
    d = start_daemon({"t": {"backend": "llama-server", **preset}, "barrier": BARRIER})
    events = Events(d)
    try:
        assert d.chat("t")[0] == 200
        wait_for(lambda: d.model("t")["tier"] == "ram", timeout=30)
        d.presets = {**d.presets, "t": {"backend": "llama-server", **preset, "ttl": "1h"}}
        d.write()
        assert d.request("POST", "/swapd/reload")[0] == 200
        assert d.chat("t")[0] == 200  # started from its pages
        assert value(scrape(d), "swapd_loads_total", model="t", from_tier="ram") == 1
        status = d.model("t")
        assert (status["state"], status["pages"], status["memory"]["ram"]) == ("ready", None, 0)
        _settle(d, events)
        seen = _last_view(events, "t")
        assert (seen["state"], seen["pages"], seen["memory"]["ram"]) == ("ready", None, 0), (
            f"feed: {seen['state']}, {seen['pages']}, {seen['memory']}"
        )
    finally:
        events.close()


def test_a_retiring_process_does_not_overwrite_its_namesakes_views(
    start_daemon: StartDaemon,
) -> None:
    """a streams; a reload removes a, the next adds it back and it serves again.

    The removed a's process stops once its stream ends, while the new a is ready. The
    feed's last word on a must be the new a's: before, the old process's ``stopping`` and
    ``stopped`` views went out under the same name, after the new one's ``ready``, and a
    dashboard fed by the stream showed a stopped while it served.
    """
    slow = ("--chunks", "20", "--chunk-interval", "0.15")
    d = start_daemon({"a": fake_preset("A", *slow), "barrier": BARRIER})
    assert d.chat("a")[0] == 200
    events = Events(d)
    try:
        stream = Stream(d, "a")
        wait_for(lambda: stream.events)
        presets = dict(d.presets)
        d.presets = {"barrier": BARRIER}
        d.write()
        (d.root / "presets" / "a.yaml").unlink()
        assert d.request("POST", "/swapd/reload")[1]["removed"] == ["a"]
        d.presets = presets
        d.write()
        assert d.request("POST", "/swapd/reload")[1]["added"] == ["a"]
        assert d.chat("a")[0] == 200  # the new a, beside the old one that still drains
        assert len(stream.finish()) == 21  # drained, not cut: then the old a stops
        wait_for(lambda: len(d.events("backend.exit")) == 1)
        _settle(d, events)
        assert d.model("a")["state"] == "ready"
        assert _last_view(events, "a")["state"] == "ready"
    finally:
        events.close()


def test_the_feed_shows_a_model_at_rest_after_its_load_and_requests(
    start_daemon: StartDaemon,
) -> None:
    """Loaded by a request, by ``/load``, or failed: the feed's entry ends as status says.

    The last view went out at the move (ready, failed) while the load or the request still
    waited for it: the feed kept ``waiting: 1``, no last use and no TTL for good, while
    status said nothing waits, when it was used, and when the TTL takes it down.
    """
    d = start_daemon(
        {
            "a": fake_preset("A", ttl="1h"),
            "l": fake_preset("L", ttl="1h"),
            "bad": fake_preset("X", "--exit-at-start", "3"),
            "barrier": BARRIER,
        }
    )
    events = Events(d)
    try:
        assert d.chat("a")[0] == 200
        assert d.request("POST", "/swapd/models/l/load")[0] == 200
        assert d.chat("bad")[0] == 502
        _settle(d, events)
        for name in ("a", "l", "bad"):
            seen, status = _last_view(events, name), d.model(name)
            shown = {k: seen[k] for k in ("in_flight", "waiting")}
            assert shown == {"in_flight": 0, "waiting": 0}, f"{name}: feed {shown}"
            if name != "bad":
                armed = (seen["last_used"] is not None, seen["ttl_left"] is not None)
                assert armed == (True, True), f"{name}: feed {seen}, status {status}"
    finally:
        events.close()
