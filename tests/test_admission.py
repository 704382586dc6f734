"""Admission holds a device's lock only to plan: starts run unlocked and in parallel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import fake_preset, wait_for
from fakes import probe_file

GIB = 1024**3


def _gpu_preset(name: str, probe: Path, device: int, *extra: str) -> dict[str, Any]:
    args = ("--probe-file", str(probe), "--mem-bytes", str(GIB), *extra)
    return fake_preset(name.upper(), *args, memory=GIB, devices=[device])


def _order(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event"], e["model"]) for e in events]


def test_two_devices_start_models_in_parallel(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Two slow starts on two GPUs overlap: the second starts before the first is ready."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(
        probe, {"gpu0": {"total": 8 * GIB, "outside": 0}, "gpu1": {"total": 8 * GIB, "outside": 0}}
    )
    d = start_daemon(
        {
            "a": _gpu_preset("a", probe, 0, "--start-delay", "2"),
            "b": _gpu_preset("b", probe, 1, "--start-delay", "2"),
        },
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(d.chat, ["a", "b"]))
    assert [status for status, _ in results] == [200, 200]
    starts = d.events("model.load.start")
    dones = d.events("model.load.done")
    assert {e["model"] for e in starts} == {"a", "b"}
    assert {d.model(m)["device"] for m in ("a", "b")} == {"gpu0", "gpu1"}
    # Both starts were logged before either load finished.
    assert max(e["timestamp"] for e in starts) < min(e["timestamp"] for e in dones)


def test_a_slow_cold_start_does_not_hold_up_another_start_on_the_same_device(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A quick model admitted while a slow one starts on the same GPU is ready first."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    d = start_daemon(
        {
            "slow": _gpu_preset("slow", probe, 0, "--start-delay", "4"),
            "quick": _gpu_preset("quick", probe, 0),
        },
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(d.chat, "slow")
        wait_for(lambda: d.model("slow")["state"] == "starting")
        assert d.chat("quick")[0] == 200
        assert d.model("slow")["state"] == "starting"
        assert slow.result()[0] == 200
    done = [e["model"] for e in d.events("model.load.done")]
    assert done == ["quick", "slow"]


def test_a_starting_model_counts_before_it_takes_memory(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Room granted to a model that is still starting is not granted twice.

    gpu0 has room for one 1 GiB model beside 6.5 GiB used elsewhere. While a slow model
    starts (and has taken nothing yet), a second load must not be admitted beside it: it
    waits for the first to finish and then evicts it.
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": int(6.5 * GIB)}})
    d = start_daemon(
        {
            "slow": _gpu_preset("slow", probe, 0, "--start-delay", "2"),
            "other": _gpu_preset("other", probe, 0),
        },
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(d.chat, "slow")
        wait_for(lambda: d.model("slow")["state"] == "starting")
        other = pool.submit(d.chat, "other")
        assert slow.result()[0] == 200
        assert other.result()[0] == 200
    assert [e["victims"] for e in d.events("model.evict")] == [["slow"]]
    assert [e["model"] for e in d.events("model.load.wait")][:1] == ["other"]


def test_eviction_keeps_the_model_asked_for_more_often(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """LRFU, not LRU: a model used five times outlives one used once, even more recently."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": int(2.5 * GIB), "outside": 0}})
    d = start_daemon(
        {name: _gpu_preset(name, probe, 0) for name in ("often", "once", "new")},
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    for _ in range(5):
        assert d.chat("often")[0] == 200
    assert d.chat("once")[0] == 200  # the most recently used of the two
    assert d.chat("new")[0] == 200
    assert [e["victims"] for e in d.events("model.evict")] == [["once"]]
    assert d.model("often")["state"] == "ready"
