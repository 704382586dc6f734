"""``GET /swapd/events``: every model now, then each state move; streams end at shutdown."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from typing import Any

import yaml
from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for


class Events:
    """The change feed, read on a thread: ``(event, data)`` as they come, and its end."""

    def __init__(self, d: Daemon, path: str = "/swapd/events") -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        self.got: list[tuple[str, Any]] = []
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        event = ""
        for raw in self.resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                self.got.append((event, json.loads(line[6:])))
        self.ended.set()

    def states(self, name: str) -> list[str]:
        """The states seen for one model, repeats (progress) folded."""
        seen: list[str] = []
        for event, data in list(self.got):
            if (
                event == "model"
                and data["name"] == name
                and (not seen or seen[-1] != data["state"])
            ):
                seen.append(data["state"])
        return seen

    def close(self) -> None:
        """Hang up, let the reader see the end, then close."""
        if self.conn.sock is not None:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.ended.wait(30)
        self.conn.close()


def test_the_feed_starts_with_every_model_then_follows_each_move(
    start_daemon: StartDaemon,
) -> None:
    """A load shows queued, starting and ready; ``?model=`` keeps one model."""
    d = start_daemon({"a": fake_preset("A", "--start-delay", "1"), "b": fake_preset("B")})
    every, one = Events(d), Events(d, "/swapd/events?model=a")
    try:
        wait_for(lambda: len(every.got) >= 2 and one.got)
        assert {data["name"] for _, data in every.got[:2]} == {"a", "b"}
        assert d.request("POST", "/swapd/models/a/load")[0] == 200
        wait_for(lambda: one.states("a")[-1:] == ["ready"])
        assert one.states("a") == ["stopped", "queued", "starting", "ready"]
        assert {data["name"] for _, data in one.got} == {"a"}
        assert every.resp.headers["Content-Type"] == "text/event-stream"
    finally:
        every.close()
        one.close()


def test_an_unknown_model_is_404(start_daemon: StartDaemon) -> None:
    """The feed of a model that is not configured is refused before it begins."""
    d = start_daemon({"a": fake_preset("A")})
    status, body = d.get("/swapd/events?model=nope")
    assert (status, body["error"]["code"]) == (404, "model_not_found")


def test_open_streams_end_when_shutdown_begins(start_daemon: StartDaemon) -> None:
    """A feed and a followed log end at SIGTERM: the drain does not wait for them."""
    d = start_daemon({"a": fake_preset("A")}, {"shutdown_timeout": "10m"})
    assert d.chat("a")[0] == 200
    feed = Events(d)
    logs = Events(d, "/swapd/models/a/logs?follow=true")
    try:
        wait_for(lambda: feed.got and logs.got)
        assert d.stop() == 0  # within Daemon.stop's wait, far below shutdown_timeout
        assert feed.ended.wait(30)
        assert logs.ended.wait(30)
    finally:
        feed.close()
        logs.close()


def test_a_stream_of_one_model_ends_when_a_reload_removes_it(start_daemon: StartDaemon) -> None:
    """``?model=b`` ends once b is gone, as b's followed logs do; it sent keepalives forever."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    feed = Events(d, "/swapd/events?model=b")
    wait_for(lambda: feed.states("b"))
    (d.root / "presets" / "b.yaml").unlink()
    assert d.request("POST", "/swapd/reload")[1]["removed"] == ["b"]
    assert feed.ended.wait(30)
    feed.close()
    assert feed.got[-1] == ("removed", {"name": "b"})  # its last word says why it ended


def test_head_on_a_stream_gives_its_headers_and_frees_the_connection(
    start_daemon: StartDaemon,
) -> None:
    """HEAD on the events feed or a followed log answers at once; the next request follows.

    The stream's loop ran on for a HEAD, and the connection behind it never answered again.
    """
    d = start_daemon({"a": fake_preset("A")})
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    for path in ("/swapd/events", "/swapd/models/a/logs?follow=true"):
        conn.request("HEAD", path)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        resp.read()
        conn.request("GET", "/health")  # on the same connection
        health = conn.getresponse()
        assert health.status == 200
        health.read()
    conn.close()


def test_a_crashed_backends_pid_leaves_the_feed(start_daemon: StartDaemon) -> None:
    """A crash moves the model to failed while its group is reaped; the feed then drops the pid.

    With the breaker open (five crashes) nothing moves after that, so the last view is what
    a dashboard keeps: it held the dead pid and port for good.
    """
    d = start_daemon({"a": fake_preset("A", "--crash-after", "0")})
    one = Events(d, "/swapd/events?model=a")
    try:
        for _ in range(5):
            wait_for(lambda: d.model("a")["state"] in ("stopped", "failed"), timeout=30)
            assert d.chat("a")[0] == 502  # the backend dies on its first completion
            wait_for(lambda: d.model("a")["pid"] is None, timeout=30)
        assert d.model("a")["failures"] == 5
        wait_for(lambda: one.got and one.got[-1][1]["state"] == "failed")
        wait_for(lambda: one.got[-1][1]["pid"] is None and one.got[-1][1]["port"] is None)
    finally:
        one.close()


def test_a_new_load_does_not_show_the_last_error(start_daemon: StartDaemon) -> None:
    """The queued view of a new attempt carries no error from the failed one before it."""
    d = start_daemon({"bad": fake_preset("X", "--exit-at-start", "7")})
    one = Events(d, "/swapd/events?model=bad")
    try:
        assert d.chat("bad")[0] == 502
        wait_for(lambda: d.model("bad")["state"] == "failed", timeout=15)  # backoff over
        assert d.chat("bad")[0] == 502
        queued = [data for event, data in one.got if data["state"] == "queued"]
        assert len(queued) == 2
        assert [view["error"] for view in queued] == [None, None]
    finally:
        one.close()


def test_streams_of_a_model_end_when_it_is_removed_and_added_back(
    start_daemon: StartDaemon,
) -> None:
    """Removed and added back at once: its feed and its followed logs end all the same.

    They looked for the name only: back before their next look, they went on following
    another process (its log read from the old one's position) for as long as they lasted.
    """
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    assert d.chat("a")[0] == 200
    feed = Events(d, "/swapd/events?model=a")
    logs = Events(d, "/swapd/models/a/logs?follow=true")
    try:
        wait_for(lambda: feed.got and logs.got)
        preset = (d.root / "presets" / "a.yaml").read_text()
        (d.root / "presets" / "a.yaml").unlink()
        assert d.request("POST", "/swapd/reload")[1]["removed"] == ["a"]
        (d.root / "presets" / "a.yaml").write_text(preset)
        assert d.request("POST", "/swapd/reload")[1]["added"] == ["a"]
        assert feed.ended.wait(30)
        assert logs.ended.wait(30)
        assert feed.got[-1] == ("removed", {"name": "a"})  # nothing of the new a
    finally:
        feed.close()
        logs.close()


def test_a_reload_that_adds_hundreds_of_models_shows_each_on_the_feed(
    start_daemon: StartDaemon,
) -> None:
    """Every model a reload adds reaches a listener, however many come at once.

    Each added model's view went into a queue that dropped the oldest past 256 views:
    a reload adding 300 left the first 44 out of the feed for good (they stay stopped).
    """
    d = start_daemon({"a": fake_preset("A")})
    feed = Events(d)
    try:
        wait_for(lambda: feed.got)
        added = {f"m{i}" for i in range(300)}
        for name in added:
            (d.root / "presets" / f"{name}.yaml").write_text(yaml.safe_dump(fake_preset("M")))
        assert len(d.request("POST", "/swapd/reload")[1]["added"]) == len(added)
        assert d.request("POST", "/swapd/models/a/load")[0] == 200  # its views come after
        wait_for(lambda: "ready" in feed.states("a"))
        seen = {data["name"] for event, data in list(feed.got) if event == "model"}
        assert added <= seen, f"{len(added - seen)} added models never on the feed"
    finally:
        feed.close()


def test_a_model_a_reload_removes_leaves_the_whole_feed(start_daemon: StartDaemon) -> None:
    """The feed of every model says ``removed``, and shows nothing of the model after it.

    Status drops a removed model at once; the feed said nothing of it (a model already
    stopped stayed on a dashboard for good), or showed its drain and stop, which put it
    back on a dashboard as a model still configured.
    """
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B"), "c": fake_preset("C")})
    assert d.chat("b")[0] == 200
    feed = Events(d)
    try:
        wait_for(lambda: feed.states("b") == ["ready"])
        for name in ("b", "c"):  # c never ran: no move of its own follows
            (d.root / "presets" / f"{name}.yaml").unlink()
        assert sorted(d.request("POST", "/swapd/reload")[1]["removed"]) == ["b", "c"]
        wait_for(lambda: any(e["model"] == "b" for e in d.events("backend.exit")))
        assert d.request("POST", "/swapd/models/a/load")[0] == 200  # its views come after
        wait_for(lambda: "ready" in feed.states("a"))
        assert [m["name"] for m in d.get("/swapd/status")[1]["models"]] == ["a"]
        for name in ("b", "c"):
            about = [(event, data) for event, data in list(feed.got) if data["name"] == name]
            assert about[-1] == ("removed", {"name": name}), about[-3:]
    finally:
        feed.close()
