"""Reloads that meet models mid-way: staged, queued behind a busy model, draining, removed."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import Daemon, fake_preset, queue_behind, wait_for
from fakes import probe_file
from test_reload import Stream

MIB = 1024**2
GIB = 1024**3


def _model(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _preset(model: Path, **keys: Any) -> dict[str, Any]:
    preset = fake_preset("S", "--health-path", "/health", model=str(model), **keys)
    preset["cmd"] = [*preset["cmd"], "--name", "${MODEL}"]
    return preset


def test_unstaging_a_preset_by_reload_starts_the_new_model_not_the_old_copy(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """s was staged from a.gguf; a reload points it at b.gguf with stage: false.

    The restarted backend gets b.gguf, not the cached copy of a.gguf.
    """
    a = _model(tmp_path / "slow" / "a.gguf", 2 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 2 * MIB)
    d = start_daemon({"s": _preset(a, stage=True)}, {"cache_dir": str(tmp_path / "cache")})
    assert d.chat("s")[0] == 200
    d.presets = {"s": _preset(b)}
    d.write()
    plan = d.request("POST", "/swapd/reload")[1]
    assert plan["restarted"] == ["s"], plan
    wait_for(lambda: len(d.events("backend.spawn")) == 2 and d.model("s")["state"] == "ready")
    argv = d.events("backend.spawn")[-1]["argv"]
    assert d.chat("s")[0] == 200
    assert str(b) in argv, argv[-1]


def test_a_removed_models_queued_load_neither_evicts_nor_spawns(
    start_daemon: StartDaemon,
) -> None:
    """b's load waits for busy a (max_running 1); a reload removes b.

    Nobody can be served by b any more: the load is cancelled, its waiter gets 404, and
    a keeps running (before, once a's request ended, b's load evicted a and spawned b).
    """
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B")},
        {"max_running": 1, "max_wait": "60s", "queue_timeout": "60s"},
    )
    assert d.chat("a")[0] == 200
    a_pid = d.model("a")["pid"]
    with ThreadPoolExecutor(2) as pool:
        long, for_b = queue_behind(d, pool, "a", "b", 3)
        d.presets = {"a": fake_preset("A")}
        (d.root / "presets" / "b.yaml").unlink()
        assert d.request("POST", "/swapd/reload")[1]["removed"] == ["b"]
        assert long.result()[0] == 200
        status, _ = for_b.result()
    assert status == 404
    evicted = [(e["model"], e["victims"]) for e in d.events("model.evict")]
    spawned = [e["model"] for e in d.events("backend.spawn")]
    assert (evicted, spawned, d.model("a")["pid"]) == ([], ["a"], a_pid)


def test_a_retiring_model_still_counts_for_max_running(start_daemon: StartDaemon) -> None:
    """a streams; a reload removes a; b is asked for with max_running 1.

    a's process runs until its stream ends, so b waits for it: a retiring model still
    counts for admission.
    """
    slow = ("--chunks", "30", "--chunk-interval", "0.1")
    d = start_daemon({"a": fake_preset("A", *slow), "b": fake_preset("B")}, {"max_running": 1})
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    d.presets = {"b": fake_preset("B")}
    (d.root / "presets" / "a.yaml").unlink()
    assert d.request("POST", "/swapd/reload")[1]["removed"] == ["a"]
    assert d.chat("b")[0] == 200
    live = len(d.leftovers())  # backends running now (swapd's reaper excluded)
    events = stream.finish()
    assert len(events) == 31
    assert live <= 1, f"{live} backends ran at once with max_running: 1"


def test_removing_ram_budget_by_reload_restores_the_default(start_daemon: StartDaemon) -> None:
    """ram_budget: 0 (tier off), then a reload without the key: the default comes back."""
    d = start_daemon({"a": fake_preset("A")}, {"ram_budget": 0})
    fresh = start_daemon({"a": fake_preset("A")})
    default = fresh.get("/swapd/status")[1]["tiers"]["ram"]["budget"]
    assert d.get("/swapd/status")[1]["tiers"]["ram"]["budget"] == 0
    d.settings = {}
    d.write()
    status, plan = d.request("POST", "/swapd/reload")
    assert status == 200, plan
    assert plan["restart_needed"] == [], plan
    assert d.get("/swapd/status")[1]["tiers"]["ram"]["budget"] == default


def test_a_load_asked_for_before_a_removal_starts_no_orphan(start_daemon: StartDaemon) -> None:
    """a drains a stream (an unload); a load of a is asked for; a reload removes a.

    Once a has stopped, the pending load does not start it again (before, it did: a
    backend for a model the config no longer had, outside every slot).
    """
    slow = ("--chunks", "30", "--chunk-interval", "0.1")
    d = start_daemon({"a": fake_preset("A", *slow, ttl="1s"), "b": fake_preset("B")})
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    with ThreadPoolExecutor(2) as pool:
        unload = pool.submit(d.request, "POST", "/swapd/models/a/unload")
        wait_for(lambda: d.model("a")["state"] == "draining")
        load = pool.submit(d.request, "POST", "/swapd/models/a/load")
        time.sleep(0.5)
        (d.root / "presets" / "a.yaml").unlink()
        assert d.request("POST", "/swapd/reload")[1]["removed"] == ["a"]
        stream.finish()
        unload.result()
        load.result()
    time.sleep(3)  # a's ttl, twice over
    assert [m["name"] for m in d.get("/swapd/status")[1]["models"]] == ["b"]
    spawned = [e["model"] for e in d.events("backend.spawn")]
    assert (spawned, d.leftovers()) == (["a"], [])


def test_a_raised_concurrency_lets_a_queued_request_go(start_daemon: StartDaemon) -> None:
    """A request queued behind ``concurrency: 1`` goes once a reload raises the limit.

    Before, it kept the limit it had read on arrival and waited for the long request.
    """
    d = start_daemon({"a": fake_preset("A", concurrency=1)})
    assert d.chat("a")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(d.chat, "a", "long", fake_delay=5)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        second = pool.submit(d.chat, "a")
        wait_for(lambda: d.model("a")["waiting"] == 1)
        d.presets = {"a": fake_preset("A", concurrency=2)}
        d.write()
        assert d.request("POST", "/swapd/reload")[1]["in_place"] == ["a"]
        assert second.result()[0] == 200
        assert not long.done()  # served beside the long request, not after it
        assert long.result()[0] == 200


def test_a_lowered_max_running_takes_idle_models_down(start_daemon: StartDaemon) -> None:
    """Three models run; a reload sets max_running: 1 while the first one used streams.

    The two idle ones go down at once; the busy one keeps its process and its stream.
    """
    slow = ("--chunks", "20", "--chunk-interval", "0.05")
    presets = {"a": fake_preset("A", *slow), "b": fake_preset("B"), "c": fake_preset("C")}
    d = start_daemon(presets, {"ram_budget": 0})
    for name in ("a", "b", "c"):
        assert d.chat(name)[0] == 200
    a_pid = d.model("a")["pid"]
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    d.settings = {"ram_budget": 0, "max_running": 1}
    d.write()
    assert d.request("POST", "/swapd/reload")[0] == 200
    wait_for(lambda: {d.model(n)["state"] for n in ("b", "c")} == {"stopped"})
    assert len(stream.finish()) == 21
    assert (d.model("a")["state"], d.model("a")["pid"]) == ("ready", a_pid)


def test_a_second_reload_does_not_count_a_model_already_going_down(
    start_daemon: StartDaemon,
) -> None:
    """max_running goes 3 -> 2: b, the least used, goes down (slowly: it ignores SIGTERM).

    A second reload while b still stops must not count b as running again and take a
    second model down: two of the three stay up.
    """
    slow_stop = fake_preset("B", "--ignore-sigterm", stop_timeout="3s")
    presets = {"a": fake_preset("A"), "b": slow_stop, "c": fake_preset("C")}
    d = start_daemon(presets, {"ram_budget": 0, "max_running": 3})
    for name in ("b", "a", "c"):
        assert d.chat(name)[0] == 200
    d.settings = {"ram_budget": 0, "max_running": 2}
    d.write()
    assert d.request("POST", "/swapd/reload")[0] == 200
    wait_for(lambda: d.model("b")["state"] == "stopping")
    assert d.request("POST", "/swapd/reload")[0] == 200  # nothing changed: b still stops
    wait_for(lambda: d.model("b")["state"] == "stopped")
    assert (d.model("a")["state"], d.model("c")["state"]) == ("ready", "ready")
    assert [e["model"] for e in d.events("model.stop")] == ["b"]


def test_a_victim_that_shares_its_name_with_a_retiring_model_is_moved_once(
    start_daemon: StartDaemon,
) -> None:
    """a streams; a reload removes a, and the next adds it back; b then evicts the new a.

    Two residents are named a: the retiring one (busy, its stream still going) and the
    new one (idle), the plan's victim. Only the new one goes down, once, and the stream
    of the old one ends whole.
    """
    slow = ("--chunks", "60", "--chunk-interval", "0.1")
    presets = {"a": fake_preset("A", *slow), "b": fake_preset("B")}
    d = start_daemon(presets, {"max_running": 2})
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    (d.root / "presets" / "a.yaml").unlink()
    d.presets = {"b": presets["b"]}
    assert d.request("POST", "/swapd/reload")[1]["removed"] == ["a"]
    d.presets = presets
    d.write()
    assert d.request("POST", "/swapd/reload")[1]["added"] == ["a"]
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    assert [e["actions"] for e in d.events("model.evict")] == [["stop:a"]]
    assert len(stream.finish()) == 61
    assert d.model("a")["state"] == "stopped"
    assert d.model("b")["state"] == "ready"


def _retiring_a_on_gpu0_new_a_on_gpu1(
    start_daemon: StartDaemon, tmp_path: Path, chunks: int
) -> tuple[Daemon, Stream]:
    """a streams ``chunks`` events on gpu0; a reload removes a, the next adds it on gpu1.

    One model fits on each GPU; b is for gpu0 and, with max_wait 1s, waits for the
    retiring a there. The new a has served one request. Returns the old a's stream.
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(
        probe,
        {
            "gpu0": {"total": int(1.5 * GIB), "outside": 0},
            "gpu1": {"total": int(1.5 * GIB), "outside": 0},
        },
    )
    slow = ("--chunks", str(chunks), "--chunk-interval", "0.1")
    mem = ("--probe-file", str(probe), "--mem-bytes", str(GIB))
    old_a = fake_preset("A", *mem, *slow, memory=GIB, devices=[0])
    new_a = fake_preset("A", *mem, memory=GIB, devices=[1])
    b = fake_preset("B", *mem, memory=GIB, devices=[0])
    d = start_daemon(
        {"a": old_a, "b": b},
        {"devices": "auto", "reserve": 0, "max_wait": "1s"},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    (d.root / "presets" / "a.yaml").unlink()
    d.presets = {"b": b}
    assert d.request("POST", "/swapd/reload")[1]["removed"] == ["a"]
    d.presets = {"a": new_a, "b": b}
    d.write()
    assert d.request("POST", "/swapd/reload")[1]["added"] == ["a"]
    assert d.chat("a")[0] == 200
    return d, stream


def test_a_wait_on_a_retiring_model_does_not_drain_its_idle_namesake(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """b waits for the retiring a on gpu0; a, added back, serves on gpu1, idle.

    The plan waits on the name a, which stands for the retiring model (busy with its
    stream). Past max_wait only busy models are drained for the swap: the new a, idle on
    another GPU, keeps serving (before, it was drained, and requests for it queued).
    """
    d, stream = _retiring_a_on_gpu0_new_a_on_gpu1(start_daemon, tmp_path, 40)
    a_pid = d.model("a")["pid"]
    assert d.chat("b")[0] == 200  # once the retiring a's stream has ended
    assert len(stream.finish()) == 41
    assert d.events("model.drain") == []
    assert (d.model("a")["state"], d.model("a")["pid"]) == ("ready", a_pid)


def test_a_wait_on_a_retiring_model_does_not_drain_its_busy_namesake_elsewhere(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """b waits for the retiring a on gpu0; a, added back, serves on gpu1, busy.

    The plan waits on the retiring a (its stream) on gpu0. The new a, busy with a request
    of its own on gpu1, is not what frees b's room: past max_wait it keeps serving (before,
    being busy, it was drained, and its requests queued until the old a's stream ended).
    """
    d, stream = _retiring_a_on_gpu0_new_a_on_gpu1(start_daemon, tmp_path, 60)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(d.chat, "a", "long", fake_delay=3)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        assert d.chat("b")[0] == 200  # once the retiring a's stream has ended
        assert busy.result()[0] == 200
    assert len(stream.finish()) == 61
    assert d.events("model.drain") == []


def _restart_slowly(d: Daemon) -> None:
    """Change a's launch to one that takes 3 s to start; wait until that start is under way."""
    assert d.chat("a")[0] == 200
    d.presets = {**d.presets, "a": fake_preset("A2", "--start-delay", "3")}
    d.write()
    assert d.request("POST", "/swapd/reload")[1]["restarted"] == ["a"]
    wait_for(lambda: d.model("a")["state"] == "starting")


def test_a_restart_whose_model_is_removed_meanwhile_is_no_failure(
    start_daemon: StartDaemon,
) -> None:
    """a restarts (its new launch starts slowly); a second reload removes a mid-start.

    The removal cancels the start, as the README says: that is the user's last word, not a
    failed reload (before, ``model.reload.fail`` was logged at error level, with a 404).
    """
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    _restart_slowly(d)
    (d.root / "presets" / "a.yaml").unlink()
    assert d.request("POST", "/swapd/reload")[1]["removed"] == ["a"]
    stay = wait_for(lambda: d.events("model.reload.stay_down"))
    assert [(e["model"], e["reason"]) for e in stay] == [("a", "removed")]
    assert d.events("model.reload.fail") == []
    assert [m["name"] for m in d.get("/swapd/status")[1]["models"]] == ["b"]
    wait_for(lambda: len(d.events("backend.exit")) == 2)  # the old a, and the cut start


def test_a_forced_unload_during_a_restarts_start_keeps_the_model_down_quietly(
    start_daemon: StartDaemon,
) -> None:
    """a restarts (its new launch starts slowly); a forced unload cuts that start.

    As an unload during the drain does, it keeps a down (``model.reload.stay_down``):
    before, the cut start was logged as ``model.reload.fail`` at error level.
    """
    d = start_daemon({"a": fake_preset("A")})
    _restart_slowly(d)
    status, body = d.request("POST", "/swapd/models/a/unload?force=true")
    assert (status, body["state"]) == (200, "stopped")
    stay = wait_for(lambda: d.events("model.reload.stay_down"))
    assert [(e["model"], e["reason"]) for e in stay] == [("a", "unloaded")]
    assert d.events("model.reload.fail") == []
    assert d.model("a")["state"] == "stopped"


def test_a_lowered_queue_timeout_bounds_a_load_already_waiting(
    start_daemon: StartDaemon,
) -> None:
    """b's load waits for busy a (max_running 1); a reload lowers queue_timeout to 1 s.

    b's wait is bounded by the new value, counted from when it began: 503 queue_timeout
    while a still serves. Before, it kept the bound it began with (60 s) and was served
    once a's 10 s request had ended, though the key was said to apply at once.
    """
    d = start_daemon(
        {"a": fake_preset("A"), "b": fake_preset("B")},
        {"max_running": 1, "max_wait": "60s", "queue_timeout": "60s"},
    )
    assert d.chat("a")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        long, for_b = queue_behind(d, pool, "a", "b", 10)
        d.settings = {**d.settings, "queue_timeout": "1s"}
        d.write()
        assert d.request("POST", "/swapd/reload")[0] == 200
        status, body = for_b.result()
        assert (status, body["error"]["code"]) == (503, "queue_timeout"), body
        assert "waited 1s" in body["error"]["message"]
        assert long.result()[0] == 200
    assert [e["model"] for e in d.events("backend.spawn")] == ["a"]
