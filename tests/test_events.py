"""``GET /swapd/events``: every model now, then each state move; streams end at shutdown."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from typing import Any

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
