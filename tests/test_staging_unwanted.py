"""Copies nobody will use any more: stopped, not run to their end.

Each test was written against a fault of the cache or of the manager's use of it; its
docstring says what the older code did.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from conftest import StartDaemon
from daemon import Daemon, hook_env, wait_for
from test_staging_daemon import MIB, _cached_entries, _model, staged_preset

# Slow storage: one MiB per chunk, a fifth of a second each (a copy still stops between
# chunks when asked to).
SLOW_CHUNKS = """
import time
import swapd._copy as c
_real = c._chunk
def _chunk(method, src_fd, dst_fd, want, buffer):
    time.sleep(0.2)
    return _real(method, src_fd, dst_fd, min(want, 1 << 20), buffer)
c._chunk = _chunk
c.CHUNK = 1 << 20
"""

# A slow sizing too: the load's copy is under way before its plan finds it cannot fit.
SLOW_SIZING = """
import asyncio
import swapd.admission as a
_needs = a.Admission.needs
async def needs(self, *args, **kwargs):
    await asyncio.sleep(1)
    return await _needs(self, *args, **kwargs)
a.Admission.needs = needs
"""


def _copy_ended(d: Daemon, source: Path) -> dict[str, Any] | None:
    events = [*d.events("staging.copy.done"), *d.events("staging.copy.fail")]
    return next((e for e in events if e["source"] == str(source)), None)


def _disk_bytes(d: Daemon) -> int:
    _, status = d.get("/swapd/status")
    used: int = status["tiers"]["disk"]["bytes"]  # copies in progress count in full
    return used


def test_a_load_that_can_never_fit_stops_the_copy_it_started(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """big needs more memory than the host has: 503 insufficient_memory at once.

    Its copy, started while the load planned, ran on to its end: the whole model read
    from slow storage, and a copy in the cache (evicting idle copies for it) for a model
    that cannot load until its preset changes.
    """
    model = _model(tmp_path / "slow" / "big.gguf", 24 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"big": staged_preset(model, memory="100TiB")},
        {"cache_dir": str(cache)},
        env=hook_env(tmp_path / "hook", SLOW_CHUNKS + SLOW_SIZING),
    )
    status, body = d.chat("big")
    assert (status, body["error"]["code"]) == (503, "insufficient_memory"), body
    assert len(d.events("staging.copy.start")) == 1
    ended = wait_for(lambda: _copy_ended(d, model))
    assert ended["event"] == "staging.copy.fail", ended
    assert "can never fit" in str(ended["error"]), ended
    assert _disk_bytes(d) == 0
    assert _cached_entries(cache) == []
    assert d.model("big")["tier"] == "store"


def test_a_copy_for_a_model_a_reload_removed_is_stopped(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """a is removed by a reload while its copy runs: its load gets 404, its copy went on.

    The copy ended and stayed in the cache (room other models' copies could use) until
    evicted, for a model no preset names any more.
    """
    model = _model(tmp_path / "slow" / "a.gguf", 24 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"a": staged_preset(model)},
        {"cache_dir": str(cache)},
        env=hook_env(tmp_path / "hook", SLOW_CHUNKS),
    )
    _remove_a_while_it_copies(d)
    ended = wait_for(lambda: _copy_ended(d, model))
    assert ended["event"] == "staging.copy.fail", ended
    assert "no model" in str(ended["error"]), ended
    assert _cached_entries(cache) == []


def _remove_a_while_it_copies(d: Daemon) -> None:
    """A request starts a's copy; a reload removes a once the copy has begun (its load: 404)."""
    with ThreadPoolExecutor(1) as pool:
        for_a = pool.submit(d.chat, "a")
        wait_for(lambda: (d.model("a")["staging"] or {}).get("done", 0) > 0)
        (d.root / "presets" / "a.yaml").unlink()
        assert d.request("POST", "/swapd/reload")[0] == 200
        assert for_a.result()[0] == 404


def test_a_copy_another_preset_of_the_same_file_wants_survives_a_reload(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """a is removed while its copy runs; a2 stages the same file: the copy is made."""
    model = _model(tmp_path / "slow" / "a.gguf", 8 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"a": staged_preset(model), "a2": staged_preset(model)},
        {"cache_dir": str(cache)},
        env=hook_env(tmp_path / "hook", SLOW_CHUNKS),
    )
    _remove_a_while_it_copies(d)
    ended = wait_for(lambda: _copy_ended(d, model))
    assert ended["event"] == "staging.copy.done", ended
    assert d.model("a2")["tier"] == "disk"


def test_a_copy_that_another_load_waits_on_goes_on_when_one_can_never_fit(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """fits and big stage the same file; big can never fit, fits can: the copy is made."""
    model = _model(tmp_path / "slow" / "m.gguf", 8 * MIB)
    d = start_daemon(
        {"fits": staged_preset(model), "big": staged_preset(model, memory="100TiB")},
        {"cache_dir": str(tmp_path / "cache")},
        env=hook_env(tmp_path / "hook", SLOW_CHUNKS),
    )
    with ThreadPoolExecutor(1) as pool:
        for_fits = pool.submit(d.chat, "fits")
        wait_for(lambda: (d.model("fits")["staging"] or {}).get("done", 0) > 0)
        status, body = d.chat("big")
        assert (status, body["error"]["code"]) == (503, "insufficient_memory"), body
        assert for_fits.result()[0] == 200
    assert [e["event"] for e in d.events("staging.copy.done")] == ["staging.copy.done"]
    assert d.events("staging.copy.fail") == []


def test_a_copy_a_cut_load_left_runs_on_until_a_reload_turns_stage_off(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A forced unload cuts a's load: its copy runs on (a retry would start from zero).

    A reload then turns ``stage`` off: no load waits on the copy and no preset wants it.
    Before, it ran to its end and stayed in the cache.
    """
    model = _model(tmp_path / "slow" / "a.gguf", 24 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"a": staged_preset(model)},
        {"cache_dir": str(cache)},
        env=hook_env(tmp_path / "hook", SLOW_CHUNKS),
    )
    with ThreadPoolExecutor(1) as pool:
        for_a = pool.submit(d.chat, "a")
        wait_for(lambda: (d.model("a")["staging"] or {}).get("done", 0) > 0)
        assert d.request("POST", "/swapd/models/a/unload?force=true")[0] == 200
        assert for_a.result()[0] == 503
    assert _copy_ended(d, model) is None  # it runs on, as the cache owns it
    preset = staged_preset(model)
    preset["stage"] = False
    (d.root / "presets" / "a.yaml").write_text(yaml.safe_dump(preset))
    assert d.request("POST", "/swapd/reload")[0] == 200
    ended = wait_for(lambda: _copy_ended(d, model))
    assert ended["event"] == "staging.copy.fail", ended
    assert "no model stages it" in str(ended["error"]), ended
    assert _cached_entries(cache) == []


# A copy held at a chunk while the file GATE exists (storage that stalls); MARK written
# once a stage() has looked its source up, about to join or start the copy.
GATED_CHUNKS = """
import contextvars
import os
import time
from pathlib import Path
import swapd._copy as c
import swapd.staging as s
GATE, MARK = os.environ["TEST_GATE"], os.environ["TEST_MARK"]
_real = c._chunk
def _chunk(method, src_fd, dst_fd, want, buffer):
    time.sleep(0.1)
    while os.path.exists(GATE):
        time.sleep(0.05)
    return _real(method, src_fd, dst_fd, min(want, 1 << 20), buffer)
c._chunk = _chunk
c.CHUNK = 1 << 20
_staging = contextvars.ContextVar("staging", default=False)
_stage = s.StagingCache._stage
async def stage(self, *args, **kwargs):
    _staging.set(True)
    return await _stage(self, *args, **kwargs)
s.StagingCache._stage = stage
_scan = s.scan
def scan(path):
    found = _scan(path)
    if _staging.get():
        Path(MARK).write_text("")
    return found
s.scan = scan
"""


def test_a_load_waits_out_a_copy_stopped_as_unwanted_and_copies_anew(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A reload turns ``stage`` off, then on again, while the stopped copy still ends.

    The copy stops between chunks; a load in that time joined it, and failed with the
    copy's "stopped, no model stages it any more" although its preset stages the file.
    """
    model = _model(tmp_path / "slow" / "a.gguf", 8 * MIB)
    gate, mark = tmp_path / "gate", tmp_path / "mark"
    env = hook_env(tmp_path / "hook", GATED_CHUNKS)
    env |= {"TEST_GATE": str(gate), "TEST_MARK": str(mark)}
    d = start_daemon({"a": staged_preset(model)}, {"cache_dir": str(tmp_path / "cache")}, env=env)
    preset_file = d.root / "presets" / "a.yaml"
    with ThreadPoolExecutor(1) as pool:
        for_a = pool.submit(d.chat, "a")
        wait_for(lambda: (d.model("a")["staging"] or {}).get("done", 0) > 0)
        gate.touch()  # the copy stalls at its next chunk
        assert d.request("POST", "/swapd/models/a/unload?force=true")[0] == 200
        assert for_a.result()[0] == 503
    for stage in (False, True):  # stopped by the first reload; wanted again by the second
        preset = staged_preset(model)
        preset["stage"] = stage
        preset_file.write_text(yaml.safe_dump(preset))
        assert d.request("POST", "/swapd/reload")[0] == 200
    mark.unlink(missing_ok=True)
    with ThreadPoolExecutor(1) as pool:
        for_a = pool.submit(d.chat, "a")
        wait_for(mark.exists)
        gate.unlink()
        status, body = for_a.result()
    assert status == 200, body
    [stopped] = d.events("staging.copy.fail")
    assert "no model stages it" in str(stopped["error"]), stopped
    assert [e["event"] for e in d.events("staging.copy.done")] == ["staging.copy.done"]
