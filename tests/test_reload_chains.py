"""Reloads that come one after another while a model drains, and what they leave alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for
from test_reload import Stream, reload

from swapd.config import Config
from swapd.presets import Preset
from swapd.reload import diff

STREAMING = ("--chunks", "30", "--chunk-interval", "0.1")


def set_preset(d: Daemon, preset: dict[str, Any]) -> None:
    """Write model ``a`` anew and reload; the reload restarts it."""
    d.presets = {"a": preset}
    d.write()
    assert reload(d)[1]["restarted"] == ["a"]


def names_started(d: Daemon) -> list[str]:
    """The fake's ``--name`` of each backend swapd spawned, in order."""
    argvs = [event["argv"] for event in d.events("backend.spawn")]
    return [argv[argv.index("--name") + 1] for argv in argvs]


def test_a_vllm_memory_change_applies_at_the_next_start(tmp_path: Path) -> None:
    """``memory`` is used at the next start: no restart, though vLLM sizes its cache from it."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 100)

    def preset(memory: int) -> Preset:
        return Preset(name="v", file="v.yaml", backend="vllm", model=model, memory=memory)

    plan, _ = diff(
        Config("c", presets=(preset(8 << 30),)), Config("c", presets=(preset(16 << 30),))
    )
    assert [p.name for p in plan.in_place] == ["v"], plan.as_json()


def test_two_reloads_during_a_drain_start_only_the_last_launch(start_daemon: StartDaemon) -> None:
    """Two launch changes while a stream drains: the one between is never started."""
    d = start_daemon({"a": fake_preset("A", *STREAMING)})
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    set_preset(d, fake_preset("A1"))
    set_preset(d, fake_preset("A2"))
    stream.finish()
    wait_for(lambda: d.model("a")["state"] == "ready" and names_started(d)[-1] == "A2", 30)
    assert d.chat("a")[1]["choices"][0]["message"]["content"].startswith("A2:")
    assert names_started(d) == ["A", "A2"]


def test_a_broken_launch_reverted_during_the_drain_comes_back(start_daemon: StartDaemon) -> None:
    """The model served before both reloads: it serves after them, and nothing failed."""
    d = start_daemon({"a": fake_preset("A", *STREAMING)})
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    set_preset(d, fake_preset("A", "--exit-at-start", "3"))
    set_preset(d, fake_preset("A", *STREAMING))
    stream.finish()
    wait_for(lambda: d.model("a")["state"] == "ready" and len(names_started(d)) == 2, 30)
    assert d.events("model.reload.fail") == []


def test_an_in_place_change_of_something_else_keeps_the_ttl_clock(
    start_daemon: StartDaemon,
) -> None:
    """A new description is no new ttl: the idle model's TTL runs on from its last use."""
    d = start_daemon({"a": fake_preset("A", ttl="1h")})
    assert d.chat("a")[0] == 200
    wait_for(lambda: d.model("a")["ttl_left"] < 3599)
    before = d.model("a")["ttl_left"]
    d.presets = {"a": fake_preset("A", ttl="1h", description="hello")}
    d.write()
    assert reload(d)[1]["in_place"] == ["a"]
    assert d.model("a")["ttl_left"] <= before
