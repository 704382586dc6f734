"""GPU admission paths, with a programmable probe file standing in for GPU hardware.

Fake upstreams register their memory in the file when ready and release it
(optionally late) when stopped; swapd reads the same file through its fake
probe, so these tests exercise the real admission, eviction and placement code.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for
from fakes import probe_file

GiB = 1024**3


def gpu_preset(name: str, probe: Path, nbytes: int, *extra: str, **keys: Any) -> dict[str, Any]:
    """A fake backend that holds ``nbytes`` on its GPU while it runs."""
    args = ("--probe-file", str(probe), "--mem-bytes", str(nbytes), *extra)
    return fake_preset(name.upper(), *args, memory=nbytes, **keys)


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    """A probe file with one 8 GiB GPU of which 5 GiB are used by something else."""
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 8 * GiB, "outside": 5 * GiB}})
    return path


def start_gpu(
    start_daemon: StartDaemon, probe: Path, presets: dict[str, Any], **settings: Any
) -> Daemon:
    """Swapd reading the probe file as its GPUs."""
    return start_daemon(
        presets,
        {"devices": "auto", "reserve": 0, **settings},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )


def test_memory_used_outside_swapd_is_respected(start_daemon: StartDaemon, probe: Path) -> None:
    """With 3 of 8 GiB free, a second 2 GiB model evicts the first although the count allows two."""
    presets = {n: gpu_preset(n, probe, 2 * GiB) for n in ("a", "b")}
    d = start_gpu(start_daemon, probe, presets)
    assert d.chat("a")[0] == 200
    assert d.model("a")["device"] == "gpu0"
    assert d.chat("b")[0] == 200
    assert [e["victims"] for e in d.events("model.evict")] == [["a"]]
    assert d.model("a")["state"] == "stopped"


def test_impossible_reports_outside_usage(start_daemon: StartDaemon, probe: Path) -> None:
    """A model larger than what swapd could ever free gets a 503 naming the outside usage."""
    d = start_gpu(start_daemon, probe, {"big": gpu_preset("big", probe, 4 * GiB)})
    status, body = d.chat("big")
    assert status == 503
    assert body["error"]["message"] == (
        "cannot load 'big': needs 4.0 GiB; gpu0 has 8.0 GiB, 5.0 GiB used outside swapd, "
        "0.0 MiB pinned, 0.0 MiB reserved"
    )


def test_slow_release_is_waited_for_before_the_next_start(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """After evicting, swapd re-reads memory until the driver really freed it, then starts."""
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 4 * GiB, "outside": 0}})
    slow = ("--release-delay", "1.5")
    presets = {n: gpu_preset(n, path, 3 * GiB, *slow) for n in ("a", "b")}
    d = start_gpu(start_daemon, path, presets, release_timeout="10s")
    assert d.chat("a")[0] == 200
    a_pid = d.model("a")["pid"]
    assert d.chat("b")[0] == 200
    released_at = probe_file.read_state(path)["processes"][str(a_pid)]["released_at"]
    b_start = next(e for e in d.events("backend.spawn") if e["model"] == "b")
    assert datetime.fromisoformat(b_start["timestamp"]).timestamp() >= released_at


def test_two_devices_place_each_model_where_it_fits(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Two 3 GiB models on two 4 GiB GPUs run side by side, each told its own device."""
    path = tmp_path / "gpus.json"
    gpus = {"gpu0": {"total": 4 * GiB, "outside": 0}, "gpu1": {"total": 4 * GiB, "outside": 0}}
    probe_file.write_devices(path, gpus)
    presets = {n: gpu_preset(n, path, 3 * GiB) for n in ("a", "b")}
    presets["pinned1"] = gpu_preset("pinned1", path, 1 * GiB, devices=[1])
    d = start_gpu(start_daemon, path, presets)
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    devices = {d.model(n)["device"] for n in ("a", "b")}
    assert devices == {"gpu0", "gpu1"}
    registered = probe_file.read_state(path)["processes"]
    for name in ("a", "b"):
        model = d.model(name)
        assert registered[str(model["pid"])]["device"] == model["device"]
    assert not d.events("model.evict")
    assert d.chat("pinned1")[0] == 200
    assert d.model("pinned1")["device"] == "gpu1"


def test_busy_victim_queues_then_times_out_with_retry_after(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """If only a busy model could make room, the load waits; past queue_timeout it is a 503."""
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 4 * GiB, "outside": 0}})
    presets = {n: gpu_preset(n, path, 3 * GiB) for n in ("a", "b")}
    d = start_gpu(start_daemon, path, presets, queue_timeout="1s")
    assert d.chat("a")[0] == 200
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(d.chat, "a", "long", fake_delay=4.0)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        status, body = d.chat("b")
        assert busy.result()[0] == 200
    assert status == 503
    assert body["error"]["code"] == "queue_timeout"
    assert "busy models to finish: a" in body["error"]["message"]
    assert d.model("a")["state"] == "ready"
    # Once a is idle, b evicts it.
    assert d.chat("b")[0] == 200


def test_busy_victim_is_waited_for_within_the_queue_timeout(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A load queued behind a busy model starts as soon as that model's request finishes."""
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 4 * GiB, "outside": 0}})
    presets = {n: gpu_preset(n, path, 3 * GiB) for n in ("a", "b")}
    d = start_gpu(start_daemon, path, presets, queue_timeout="30s")
    assert d.chat("a")[0] == 200
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(d.chat, "a", "long", fake_delay=1.5)
        wait_for(lambda: d.model("a")["in_flight"] == 1)
        status, _ = d.chat("b")
        assert busy.result()[0] == 200
    assert status == 200
    assert [e["busy"] for e in d.events("model.load.wait")][:1] == [["a"]]


def test_pinned_models_are_never_evicted_and_preload_loads_at_start(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """pin: true keeps a model resident; preload: true loads it when swapd starts."""
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 4 * GiB, "outside": 0}})
    presets = {
        "keep": gpu_preset("keep", path, 2 * GiB, pin=True, preload=True),
        "a": gpu_preset("a", path, 2 * GiB),
        "b": gpu_preset("b", path, 2 * GiB),
    }
    d = start_gpu(start_daemon, path, presets)
    deadline = time.monotonic() + 20
    while d.model("keep")["state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.model("keep")["state"] == "ready"
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    assert d.model("keep")["state"] == "ready"
    assert [e["victims"] for e in d.events("model.evict")] == [["a"]]


def test_a_ttl_stop_whose_memory_reading_fails_is_tried_again(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The TTL's demotion reads the devices first; a failed reading used to end it for good.

    Nothing armed the TTL again: the idle model stayed up with ``ttl_left: null`` until a
    request came. Now the stop is tried again (``model.ttl.retry``).
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GiB, "outside": 0}})
    d = start_daemon(
        {"a": fake_preset("A", "--probe-file", str(probe), memory=GiB, ttl="2s")},
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    good = probe.read_text()
    assert d.chat("a")[0] == 200
    probe.write_text("{not json")  # the reading the TTL's demotion takes fails
    wait_for(lambda: d.events("model.ttl.retry") or d.events("task.fail"), timeout=20)
    probe.write_text(good)  # the fault is gone: the next try takes the model down
    wait_for(lambda: d.model("a")["state"] == "stopped", timeout=20)


def test_a_model_counts_on_its_device_what_it_holds_there_not_on_every_gpu(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A resident's use is its tree's bytes on its own device, not summed over GPUs.

    A helper of model a holds 20 GiB on gpu1 (a Vulkan build that ignores
    CUDA_VISIBLE_DEVICES, ROCm's page tables on every GPU). For b on gpu0, evicting a
    frees only its 10 GiB there; counted at 30 GiB, a alone looked like enough and was
    stopped for a load that still did not fit.
    """
    path = tmp_path / "gpus.json"
    gpus = {"gpu0": {"total": 30 * GiB, "outside": 0}, "gpu1": {"total": 30 * GiB, "outside": 0}}
    probe_file.write_devices(path, gpus)
    presets = {
        "a": gpu_preset("a", path, 10 * GiB, "--fork-child", devices=[0]),
        "c": gpu_preset("c", path, 15 * GiB, devices=[0]),
        "b": gpu_preset("b", path, 18 * GiB, devices=[0]),
    }
    d = start_gpu(start_daemon, path, presets)
    assert d.chat("a")[0] == 200
    assert d.chat("c")[0] == 200
    [helper] = psutil.Process(d.model("a")["pid"]).children()
    probe_file.register(path, helper.pid, "gpu1", 20 * GiB)
    assert d.chat("b")[0] == 200
    assert [e["victims"] for e in d.events("model.evict")] == [["c"]]
    assert d.model("a")["state"] == "ready"
