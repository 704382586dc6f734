"""Every failure has an owner: an event, nothing left running, the usual envelope.

An unexpected error while loading, stopping or measuring is handled like any other.
Regression tests for three failures found in review: an unwritable
``state_dir/children`` leaked live backends and left the model in ``starting``; a
probe that raised gave a ``text/plain`` 500 and left the model in ``queued``; an
error while measuring a footprint vanished without an event.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import StartDaemon
from daemon import fake_preset, wait_for
from fakes import probe_file

GIB = 1024**3


def test_unwritable_child_records_leak_nothing(start_daemon: StartDaemon) -> None:
    """When the child record cannot be written, the spawned backend is stopped and reported."""
    d = start_daemon({"a": fake_preset("A")})
    children = d.root / "state" / "children"
    shutil.rmtree(children, ignore_errors=True)
    children.parent.mkdir(parents=True, exist_ok=True)
    children.write_text("a file where a directory should be")
    status, body = d.chat("a")
    assert status == 500
    assert body["error"]["code"] == "load_failed"
    assert "children" in body["error"]["message"]
    assert d.model("a")["state"] in {
        "backoff",
        "failed",
    }  # backing off, or failed once its 1 s is up
    assert d.model("a")["failures"] == 1
    assert d.leftovers() == [] or wait_for(lambda: not d.leftovers(), timeout=10)
    assert len(d.events("model.load.error")) == 1


def test_a_probe_that_raises_answers_json_and_the_model_can_load_later(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A broken memory reading fails the load with the envelope; the model is not stuck."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    d = start_daemon(
        {"a": fake_preset("A", "--probe-file", str(probe), memory=GIB)},
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    good = probe.read_text()
    probe.write_text("{not json")
    status, body = d.chat("a")
    assert status == 500
    assert body["error"]["code"] == "load_failed"
    assert "not valid JSON" in body["error"]["message"]
    assert d.model("a")["state"] in {
        "backoff",
        "failed",
    }  # backing off, or failed once its 1 s is up
    assert d.model("a")["failures"] == 1
    probe.write_text(good)
    wait_for(lambda: d.chat("a")[0] == 200, timeout=10, interval=0.2)  # after the backoff
    assert d.model("a")["state"] == "ready"


def test_a_failed_measurement_is_logged(start_daemon: StartDaemon) -> None:
    """An error while recording the footprint is a model.measure.fail event, not silence."""
    d = start_daemon({"a": fake_preset("A")})
    footprints = d.root / "state" / "footprints.json"
    footprints.mkdir(parents=True)  # a directory where the file should be
    assert d.chat("a")[0] == 200
    [event] = wait_for(lambda: d.events("model.measure.fail"), timeout=10)
    assert event["model"] == "a"
    assert "IsADirectoryError" in event["error"]
    assert d.chat("a")[0] == 200  # the model keeps serving


def test_an_unexpected_error_after_admission_is_a_failed_start(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A start that fails before any process runs backs off; it stayed ``starting`` for good.

    Here the second shard of a split GGUF goes after the config was read: sizing the files
    raises once the load was admitted (state STARTING), and every later request was a 500
    BadTransition until swapd restarted.
    """
    shards = [tmp_path / f"m-0000{i}-of-00002.gguf" for i in (1, 2)]
    for shard in shards:
        shard.write_bytes(b"GGUF" + b"\0" * 64)
    d = start_daemon({"a": fake_preset("A", model=str(shards[0]))})
    shards[1].unlink()
    status, body = d.chat("a")
    assert (status, body["error"]["code"]) == (500, "load_failed"), body
    model = d.model("a")
    assert model["state"] in {"backoff", "failed"}, model
    assert (model["pid"], model["device"]) == (None, None)
    shards[1].write_bytes(b"\0" * 64)  # the shard is back
    wait_for(lambda: d.chat("a")[0] == 200, timeout=20, interval=0.2)  # after the backoff
