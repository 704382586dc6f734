"""Hundreds of presets: what a request, an idle feed and an idle swapd cost stays flat.

Each test counts work (a walk of the presets, a snapshot of a model) rather than time:
a request or a tick that reads every configured model costs hundreds of times more
with hundreds of presets.
"""

from __future__ import annotations

import contextlib
import http.client
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import fake_preset, wait_for
from faults import calls_env, calls_made

from swapd.config import load_config

MODELS = 40
TICKS = 1.6  # seconds: three of the feed's 0.5 s progress ticks at least


class CountedPresets(tuple[Any, ...]):
    """The config's presets, counting each walk of them."""

    __slots__ = ()
    walks = 0

    def __iter__(self) -> Any:
        CountedPresets.walks += 1
        return super().__iter__()


def test_a_name_lookup_does_not_walk_the_presets(tmp_path: Path) -> None:
    """``Config.preset`` (asked on every request) and the deepest name are indexed, not walked."""
    folder = tmp_path / "presets"
    folder.mkdir()
    for i in range(MODELS):
        (folder / f"m{i:03d}.yaml").write_text(
            f'backend: command\ncmd: ["true", "${{PORT}}"]\naliases: [org/a{i}]\n'
        )
    (tmp_path / "swapd.yaml").write_text("")
    loaded = load_config(tmp_path / "swapd.yaml")
    config = replace(loaded, presets=CountedPresets(loaded.presets))
    CountedPresets.walks = 0
    last = f"m{MODELS - 1:03d}"
    for _ in range(100):
        found = config.preset(last)
        assert found is not None
        assert found.name == last
        assert config.preset(f"org/a{MODELS - 1}") is found
        assert config.preset("nobody") is None
    assert CountedPresets.walks <= 1
    walks = CountedPresets.walks
    for _ in range(100):
        assert config.deepest_name == 2  # /upstream/org/a1/... is split at most this deep
    assert CountedPresets.walks - walks <= 1


@contextlib.contextmanager
def _feed(port: int, query: str = "") -> Iterator[http.client.HTTPResponse]:
    """An open ``/swapd/events`` stream, closed at the end of the block."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/swapd/events{query}")
        yield conn.getresponse()
    finally:
        conn.close()


def _read_events(resp: http.client.HTTPResponse, count: int) -> list[bytes]:
    """The next ``count`` events' data lines."""
    lines: list[bytes] = []
    while len(lines) < count:
        line = resp.readline()
        if line.startswith(b"data:"):
            lines.append(line)
    return lines


def test_an_idle_events_feed_snapshots_no_model_at_rest(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The feed's progress ticks read only models on the move: none while all are at rest."""
    presets = {f"m{i:03d}": fake_preset(f"m{i:03d}") for i in range(MODELS)}
    d = start_daemon(presets, env=calls_env(tmp_path, "swapd.slot:snapshot"))
    wait_for(lambda: d.events("swapd.ready"))
    with _feed(d.port) as resp:
        assert len(_read_events(resp, MODELS)) == MODELS  # every model's view, once
        before = calls_made(tmp_path)
        time.sleep(TICKS)
        assert calls_made(tmp_path) == before


def test_a_one_model_feed_snapshots_only_its_model(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """``/swapd/events?model=NAME`` reads its one model, never every model, to begin or tick."""
    presets = {f"m{i:03d}": fake_preset(f"m{i:03d}") for i in range(MODELS)}
    d = start_daemon(presets, env=calls_env(tmp_path, "swapd.slot:snapshot"))
    wait_for(lambda: d.events("swapd.ready"))
    before = calls_made(tmp_path)
    with _feed(d.port, "?model=m007") as resp:
        assert b'"name":"m007"' in _read_events(resp, 1)[0]
        time.sleep(TICKS)
        assert calls_made(tmp_path) - before <= 2  # the name's check and its first view


def test_swapd_outside_systemd_snapshots_no_model_while_idle(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Without a notify socket no STATUS line is built: an idle swapd reads no model."""
    presets = {f"m{i:03d}": fake_preset(f"m{i:03d}") for i in range(MODELS)}
    env = calls_env(tmp_path, "swapd.slot:snapshot") | {"NOTIFY_SOCKET": ""}
    d = start_daemon(presets, env=env)
    wait_for(lambda: d.events("swapd.ready"))
    before = calls_made(tmp_path)
    time.sleep(2.5)  # more than the STATUS line's 2 s refresh
    assert calls_made(tmp_path) == before
