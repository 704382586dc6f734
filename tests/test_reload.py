"""Live reload: only what changed restarts, a bad config changes nothing, SIGHUP works."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for

from swapd.config import Config
from swapd.presets import Preset
from swapd.reload import diff


class Stream:
    """A streamed chat completion read on a thread: its chunks as they come."""

    def __init__(self, d: Daemon, model: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]}
        self.conn.request("POST", "/v1/chat/completions", json.dumps(body))
        self.resp = self.conn.getresponse()
        self.events: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for raw in self.resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                self.events.append(line[6:])

    def finish(self) -> list[str]:
        """Every event, once the stream has ended."""
        self.thread.join(timeout=60)
        self.conn.close()
        return self.events


def reload(d: Daemon) -> tuple[int, Any]:
    """POST /swapd/reload."""
    return d.request("POST", "/swapd/reload")


def pid(d: Daemon, name: str) -> int | None:
    """The model's backend pid now."""
    found: int | None = d.model(name)["pid"]
    return found


def test_reload_restarts_only_the_changed_model_while_another_streams(
    start_daemon: StartDaemon,
) -> None:
    """A preset changes while another model streams: only the changed model restarts.

    The stream completes, its backend keeps its pid, and the changed model serves again.
    """
    slow = ("--chunks", "20", "--chunk-interval", "0.1")
    d = start_daemon({"a": fake_preset("A", *slow), "b": fake_preset("B")}, {"max_running": 2})
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    a_pid, b_pid = pid(d, "a"), pid(d, "b")
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    d.presets = {**d.presets, "b": fake_preset("B2")}
    d.write()
    status, plan = reload(d)
    assert status == 200, plan
    assert (plan["restarted"], plan["unchanged"]) == (["b"], ["a"])
    events = stream.finish()
    assert len(events) == 21
    assert events[-1] == "[DONE]"
    assert pid(d, "a") == a_pid
    wait_for(lambda: d.model("b")["state"] == "ready" and pid(d, "b") != b_pid)
    assert not psutil.pid_exists(b_pid or 0)
    status, body = d.chat("b")
    assert status == 200
    assert body["choices"][0]["message"]["content"].startswith("B2:")


def test_a_changed_model_restarts_once_its_stream_is_done(start_daemon: StartDaemon) -> None:
    """A model whose launch changed finishes the request it serves before its restart."""
    d = start_daemon({"a": fake_preset("A", "--chunks", "60", "--chunk-interval", "0.1")})
    assert d.chat("a")[0] == 200
    old = pid(d, "a")
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    d.presets = {"a": fake_preset("A2")}
    d.write()
    assert reload(d)[1]["restarted"] == ["a"]
    assert d.model("a")["state"] == "draining"
    events = stream.finish()
    assert len(events) == 61
    wait_for(lambda: d.model("a")["state"] == "ready" and pid(d, "a") != old)
    assert d.chat("a")[1]["choices"][0]["message"]["content"].startswith("A2:")


def test_an_unload_during_a_restart_keeps_the_model_down(start_daemon: StartDaemon) -> None:
    """A restart waits for a stream; an unload meanwhile is the last word: no start after.

    The restart used to start the model again once it had stopped, so the unload
    answered ``queued`` and the model came back.
    """
    d = start_daemon({"a": fake_preset("A", "--chunks", "30", "--chunk-interval", "0.1")})
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    d.presets = {"a": fake_preset("A2")}
    d.write()
    assert reload(d)[1]["restarted"] == ["a"]
    status, body = d.request("POST", "/swapd/models/a/unload", timeout=60)
    assert (status, body["state"]) == (200, "stopped")
    assert len(stream.finish()) == 31  # drained, not cut
    wait_for(lambda: d.events("model.reload.stay_down"))
    assert d.model("a")["state"] == "stopped"
    assert d.chat("a")[1]["choices"][0]["message"]["content"].startswith("A2:")


def test_a_restart_of_a_model_an_unload_drains_keeps_it_down(start_daemon: StartDaemon) -> None:
    """An unload drains a stream; a reload changes the model meanwhile: it stays down.

    The restart used to count the unload's drain as serving, and started the model again
    once it had stopped: the unload answered ``queued`` and the model came back.
    """
    d = start_daemon({"a": fake_preset("A", "--chunks", "30", "--chunk-interval", "0.1")})
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    with ThreadPoolExecutor(1) as pool:
        unload = pool.submit(d.request, "POST", "/swapd/models/a/unload", timeout=60)
        wait_for(lambda: d.model("a")["state"] == "draining")
        d.presets = {"a": fake_preset("A2")}
        d.write()
        assert reload(d)[1]["restarted"] == ["a"]
        assert len(stream.finish()) == 31  # drained, not cut
        status, body = unload.result()
    assert (status, body["state"]) == (200, "stopped")
    stay = wait_for(lambda: d.events("model.reload.stay_down"))
    assert [(e["model"], e["reason"]) for e in stay] == [("a", "unloaded")]
    assert (d.model("a")["state"], len(d.events("backend.spawn"))) == ("stopped", 1)


def test_an_unload_during_a_replaced_restart_keeps_the_model_down(
    start_daemon: StartDaemon,
) -> None:
    """A restart drains a stream; a second reload replaces it; a forced unload ends the drain.

    The unload came during the drain, so the model stays down: before, the first restart
    handed over only that the model had served, and the second one started it again.
    """
    d = start_daemon({"a": fake_preset("A", "--chunks", "300", "--chunk-interval", "0.1")})
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    for name in ("A2", "A3"):
        d.presets = {"a": fake_preset(name)}
        d.write()
        assert reload(d)[1]["restarted"] == ["a"]
    assert d.model("a")["state"] == "draining"
    status, body = d.request("POST", "/swapd/models/a/unload?force=true")
    assert (status, body["state"]) == (200, "stopped")
    stream.finish()
    stay = wait_for(lambda: d.events("model.reload.stay_down"))
    assert [(e["model"], e["reason"]) for e in stay] == [("a", "unloaded")]
    assert (d.model("a")["state"], len(d.events("backend.spawn"))) == ("stopped", 1)


def test_a_restart_of_a_model_a_swap_drains_leaves_the_room_to_the_swap(
    start_daemon: StartDaemon,
) -> None:
    """A swap drains a (``max_wait``); a reload changes a meanwhile: b gets the room.

    The restart counted the swap's drain as serving: once a had stopped it started a
    again, and that load queued for the room a had been drained to make for b.
    """
    d = start_daemon(
        {
            "a": fake_preset("A", "--chunks", "30", "--chunk-interval", "0.1"),
            "b": fake_preset("B"),
        },
        {"max_running": 1, "max_wait": "1s", "queue_timeout": "60s"},
    )
    assert d.chat("a")[0] == 200
    stream = Stream(d, "a")
    wait_for(lambda: stream.events)
    with ThreadPoolExecutor(1) as pool:
        for_b = pool.submit(d.chat, "b")
        wait_for(lambda: d.model("a")["state"] == "draining")  # for b, at max_wait
        d.presets = {**d.presets, "a": fake_preset("A2")}
        d.write()
        assert reload(d)[1]["restarted"] == ["a"]
        assert len(stream.finish()) == 31  # drained, not cut
        status, body = for_b.result(timeout=60)
    assert status == 200, body
    # a's stop came before b's start, and so would a start of a for the restart.
    assert [e["model"] for e in d.events("model.load.start")] == ["a", "b"]
    assert (d.model("a")["state"], d.model("b")["state"]) == ("stopped", "ready")


def test_a_bad_config_is_refused_whole_and_the_running_one_stays(
    start_daemon: StartDaemon,
) -> None:
    """Any error refuses the whole reload: 400 with file:line:col: key: reason, exit 1."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    assert d.chat("a")[0] == 200
    a_pid = pid(d, "a")
    d.presets = {"a": fake_preset("A2"), "b": {**fake_preset("B"), "ttl": "ten"}}
    d.write()
    status, body = reload(d)
    assert status == 400
    assert body["error"]["code"] == "config_invalid"
    [error] = body["errors"]
    assert error.startswith("presets/b.yaml:")
    assert error.endswith('ttl: expected a duration like "10m", got "ten"')
    cli = subprocess.run(
        [sys.executable, "-m", "swapd", "reload", "--url", d.url],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert cli.returncode == 1
    assert error in cli.stderr
    assert pid(d, "a") == a_pid
    assert d.chat("a")[1]["choices"][0]["message"]["content"].startswith("A:")
    assert d.events("config.reload.fail")


def test_a_preset_keyed_by_a_list_of_aliases_is_refused_and_reloads_go_on(
    start_daemon: StartDaemon,
) -> None:
    """A list as a key was made text with every value its aliases stand for, unbounded.

    A ten-level one took the reload's thread to gigabytes and held the reload lock, so
    no later reload ran; five levels (100,000 values) already made a 6 MB error.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    bomb = "&l0 [" + ", ".join(["x"] * 10) + "]"
    for level in range(1, 5):
        bomb = f"&l{level} [{bomb}, " + ", ".join([f"*l{level - 1}"] * 9) + "]"
    (d.root / "presets" / "b.yaml").write_text(f"? {bomb}\n: 1\n")
    status, body = reload(d)
    assert (status, body["errors"]) == (
        400,
        ["presets/b.yaml:1:3: (top level): a key is a name, not a list or a mapping"],
    )
    (d.root / "presets" / "b.yaml").unlink()
    assert reload(d)[0] == 200
    assert d.chat("a")[1]["choices"][0]["message"]["content"].startswith("A:")


def test_removed_models_stop_and_new_ones_appear(start_daemon: StartDaemon) -> None:
    """A removed preset's backend stops and its name is unknown; a new preset serves."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")}, {"max_running": 2})
    assert d.chat("b")[0] == 200
    b_pid = pid(d, "b")
    d.presets = {"a": fake_preset("A"), "c": fake_preset("C")}
    d.write()
    (d.root / "presets" / "b.yaml").unlink()
    status, plan = reload(d)
    assert status == 200
    assert (plan["removed"], plan["added"], plan["unchanged"]) == (["b"], ["c"], ["a"])
    wait_for(lambda: not psutil.pid_exists(b_pid or 0))
    status, body = d.chat("b")
    assert status == 404
    assert body["error"]["code"] == "model_not_found"
    assert d.chat("c")[0] == 200
    assert {m["id"] for m in d.get("/v1/models")[1]["data"]} == {"a", "c"}


def test_ttl_and_alias_changes_apply_in_place(start_daemon: StartDaemon) -> None:
    """A new ttl and a new alias take effect at once, on the running process."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    a_pid = pid(d, "a")
    assert d.model("a")["ttl_left"] is None
    d.presets = {"a": fake_preset("A", ttl="10m", aliases=["alpha"])}
    d.write()
    assert reload(d)[1]["in_place"] == ["a"]
    assert d.chat("alpha")[0] == 200
    view = d.model("a")
    assert (view["pid"], view["ttl"]) == (a_pid, 600.0)
    assert 0 < view["ttl_left"] <= 600


def test_sighup_reloads_and_keys_bound_at_start_wait_for_a_restart(
    start_daemon: StartDaemon,
) -> None:
    """SIGHUP re-reads the config; a new listen address is reported, not applied."""
    d = start_daemon({"a": fake_preset("A")})
    d.presets = {"a": fake_preset("A"), "b": fake_preset("B")}
    d.settings = {"listen": "127.0.0.1:1"}
    d.write()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.events("config.reload"))
    assert d.events("config.reload.restart_needed")[0]["keys"] == ["listen"]
    assert d.chat("b")[0] == 200  # still served on the old port


def test_launch_changes_restart_and_other_changes_do_not(tmp_path: Path) -> None:
    """The diff: args, env and the model file restart; ttl and pin apply in place."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")

    def preset(name: str, **keys: Any) -> Preset:
        return Preset(name=name, file=f"{name}.yaml", backend="command", cmd=("x",), **keys)

    old = Config("c", presets=(preset("a"), preset("b"), preset("c", model=model), preset("d")))
    new = Config(
        "c",
        presets=(
            preset("a", ttl=60.0, pin=True),
            preset("b", env={"X": "1"}),
            preset("c", model=model),
            preset("e"),
        ),
    )
    plan, keys = diff(old, old)
    assert plan.unchanged == ("a", "b", "c", "d")
    os.utime(model, ns=(0, 0))  # same path, another file as far as a restart is concerned
    plan, _ = diff(old, new, keys)
    assert [p.name for p in plan.restarted] == ["b", "c"]
    assert [p.name for p in plan.in_place] == ["a"]
    assert (plan.removed, [p.name for p in plan.added]) == (("d",), ["e"])


def test_shutdown_stops_a_removed_model_that_still_drains(start_daemon: StartDaemon) -> None:
    """Removed by a reload while it streams, then swapd stops: swapd stops its backend too.

    Shutdown stopped only the models of the current config; the removed one was left to
    the reaper's SIGKILL after swapd exited, with no grace and no ``backend.exit``.
    """
    d = start_daemon(
        {
            "a": fake_preset("A", "--chunks", "100", "--chunk-interval", "0.1"),
            "b": fake_preset("B"),
        },
        {"shutdown_timeout": "1s"},
    )
    stream = Stream(d, "a")  # ten seconds of chunks
    wait_for(lambda: d.model("a")["in_flight"] == 1)
    a_pid = pid(d, "a")
    d.presets = {"b": fake_preset("B")}
    d.write()
    (d.root / "presets" / "a.yaml").unlink()
    assert reload(d)[1]["removed"] == ["a"]
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=60) == 0
    stream.finish()
    assert a_pid in [e["pid"] for e in d.events("backend.exit")]


def test_a_change_applied_in_place_clears_the_failure_count(start_daemon: StartDaemon) -> None:
    """Raising ``start_timeout`` after a failed start gives fresh tries, as a restart does.

    The failure count sets the next backoff and opens the breaker at five; the README says a
    changed preset clears it, and a timeout is applied in place, without a restart.
    """
    d = start_daemon({"b": fake_preset("B", "--exit-at-start", "3")})
    assert d.chat("b")[0] == 502
    assert d.model("b")["failures"] == 1
    d.presets = {"b": fake_preset("B", "--exit-at-start", "3", start_timeout="60s")}
    d.write()
    status, plan = reload(d)
    assert (status, plan["in_place"]) == (200, ["b"])
    model = d.model("b")
    assert (model["failures"], model["state"]) == (0, "failed")  # no backoff left to sit out
    assert d.chat("b")[0] == 502  # started again at once: the start itself fails
    assert d.model("b")["failures"] == 1


def test_a_shard_or_a_folders_file_replaced_is_a_changed_model(tmp_path: Path) -> None:
    """The diff looks at every file the model is: each shard of a split GGUF, a folder's files.

    A folder's own mtime does not move when a file in it is rewritten, and the first shard
    says nothing of the second.
    """
    split = [tmp_path / f"m-0000{i}-of-00002.gguf" for i in (1, 2)]
    folder = tmp_path / "hf"
    folder.mkdir()
    for path in (*split, folder / "model.safetensors"):
        path.write_bytes(b"old")
    presets = (
        Preset(name="s", file="s.yaml", backend="command", cmd=("x",), model=split[0]),
        Preset(name="f", file="f.yaml", backend="command", cmd=("x",), model=folder),
    )
    config = Config("c", presets=presets)
    plan, keys = diff(config, config)
    assert plan.unchanged == ("s", "f")
    folder_stat = folder.stat()
    split[1].write_bytes(b"newer")
    (folder / "model.safetensors").write_bytes(b"newer")
    os.utime(folder, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    plan, _ = diff(config, config, keys)
    assert [p.name for p in plan.restarted] == ["s", "f"]


def test_preload_turned_on_by_reload_loads_the_model(start_daemon: StartDaemon) -> None:
    """``preload: true`` added to a running preset loads it now, as for an added preset."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    assert d.model("a")["state"] == "stopped"
    d.presets = {"a": fake_preset("A", preload=True), "b": fake_preset("B")}
    d.write()
    assert reload(d)[1]["in_place"] == ["a"]
    wait_for(lambda: d.model("a")["state"] == "ready")
    assert d.model("b")["state"] == "stopped"


def test_a_preload_removed_while_the_preloads_run_is_no_failure(
    start_daemon: StartDaemon,
) -> None:
    """a and b preload at start; a reload removes b while a still starts.

    b is not configured any more: the preloads skip it (before, they logged
    ``model.preload.fail`` at error level, for a model nobody asked for).
    """
    a = fake_preset("A", "--start-delay", "3", preload=True)
    d = start_daemon({"a": a, "b": fake_preset("B", preload=True)})
    wait_for(lambda: d.model("a")["state"] == "starting")
    d.presets = {"a": a}
    (d.root / "presets" / "b.yaml").unlink()
    assert reload(d)[1]["removed"] == ["b"]
    wait_for(lambda: d.events("swapd.ready"))
    assert d.events("model.preload.fail") == []
    assert [e["model"] for e in d.events("backend.spawn")] == ["a"]
