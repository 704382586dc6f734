"""Admission holds a device's lock only to plan: starts run unlocked and in parallel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import Daemon, fake_preset, hook_env, wait_for
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


def test_two_vllms_on_one_gpu_start_one_after_the_other(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """vLLM profiles the card's free memory while it starts: a second one waits until it is ready.

    Both fit on gpu0 at once; only their starts are serialized, so the second one's spawn
    comes after the first one's load is done. A llama-server or command start is not held.
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    upstream = f"--probe-file {probe} --mem-bytes {GIB} --start-delay 2"

    def vllm(name: str) -> dict[str, Any]:
        model = tmp_path / name
        model.mkdir()
        (model / "weights.safetensors").write_bytes(b"\0" * 1024)
        env = {"FAKE_VLLM_UPSTREAM_ARGS": upstream}
        return {
            "backend": "vllm",
            "model": str(model),
            "binary": vllm_binary,
            "memory": GIB,
            "sleep": 0,
            "env": env,
        }

    d = start_daemon(
        {"a": vllm("a"), "b": vllm("b")},
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(d.chat, ["a", "b"]))
    assert [status for status, _ in results] == [200, 200]
    assert {d.model(m)["device"] for m in ("a", "b")} == {"gpu0"}
    spawns = d.events("backend.spawn")
    [first_done, _] = d.events("model.load.done")
    assert len(spawns) == 2
    # The second spawn waited for the first load to be done; nothing was evicted.
    assert spawns[1]["timestamp"] >= first_done["timestamp"]
    assert len(d.events("model.start.wait")) == 1
    assert d.events("model.evict") == []


def _slow_and_other(
    start_daemon: StartDaemon, probe: Path, start_delay: str, env: dict[str, str]
) -> Daemon:
    """``slow`` (1 GiB, ``start_delay`` to start) and ``other`` on a gpu0 with room for one."""
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": int(6.5 * GIB)}})
    return start_daemon(
        {
            "slow": _gpu_preset("slow", probe, 0, "--start-delay", start_delay),
            "other": _gpu_preset("other", probe, 0),
        },
        {"devices": "auto", "reserve": 0},
        env=env,
    )


def _other_while_slow_starts(d: Daemon, meanwhile: Path | None = None) -> None:
    """``slow`` asked for, then ``other`` while it starts (``meanwhile`` made first): both 200."""
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(d.chat, "slow")
        wait_for(lambda: d.model("slow")["state"] == "starting")
        if meanwhile is not None:
            meanwhile.touch()
        other = pool.submit(d.chat, "other")
        assert slow.result()[0] == 200
        assert other.result()[0] == 200


def test_a_starting_model_counts_before_it_takes_memory(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Room granted to a model that is still starting is not granted twice.

    gpu0 has room for one 1 GiB model beside 6.5 GiB used elsewhere. While a slow model
    starts (and has taken nothing yet), a second load must not be admitted beside it: it
    waits for the first to finish and then evicts it.
    """
    probe = tmp_path / "gpus.json"
    d = _slow_and_other(start_daemon, probe, "2", {"SWAPD_FAKE_PROBE": str(probe)})
    _other_while_slow_starts(d)
    assert [e["victims"] for e in d.events("model.evict")] == [["slow"]]
    assert [e["model"] for e in d.events("model.load.wait")][:1] == ["other"]


# A stand-in pynvml (loaded into the daemon through sitecustomize) whose one GPU's totals
# follow the fake probe file, and which lists no processes (NotSupported, as on some boards
# or in a container's own pid namespace): swapd has device totals only ("device-delta").
_NVML_TOTALS_ONLY = """
import json, os, sys, time, types
import psutil

class NVMLError(Exception):
    pass

def _not_supported(_handle):
    raise NVMLError("Not Supported")

def _memory(_handle):
    lost = os.environ.get("STAND_IN_LOST", "")
    if lost and os.path.exists(lost):
        raise NVMLError("GPU is lost")
    with open(os.environ["STAND_IN_PROBE"]) as f:
        state = json.load(f)
    gpu = state["devices"]["gpu0"]
    used = gpu["outside"] + sum(
        p["bytes"] for pid, p in state["processes"].items()
        if p["device"] == "gpu0" and psutil.pid_exists(int(pid))
    )
    slow = os.environ.get("STAND_IN_SLOW_READ", "")
    if slow and os.path.exists(slow):
        time.sleep(2.5)  # a driver slow to answer: the totals above are from before it
    return types.SimpleNamespace(total=gpu["total"], free=max(0, gpu["total"] - used), used=used)

module = types.ModuleType("pynvml")
module.__dict__.update(
    NVMLError=NVMLError,
    nvmlInit=lambda: None,
    nvmlShutdown=lambda: None,
    nvmlDeviceGetCount=lambda: 1,
    nvmlDeviceGetHandleByIndex=lambda i: f"g{i}",
    nvmlDeviceGetName=lambda _h: "Stand-in GPU",
    nvmlDeviceGetMemoryInfo=_memory,
    nvmlDeviceGetComputeRunningProcesses=_not_supported,
    nvmlDeviceGetGraphicsRunningProcesses=_not_supported,
)
sys.modules["pynvml"] = module
"""


def test_a_starting_model_counts_before_it_takes_memory_with_device_totals_only(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Without per-process figures too, room granted to a starting model is not granted twice.

    Device totals cannot tell what a starting process has taken yet, so all of its grant
    still counts: a second load waits for the first and then evicts it. It was admitted
    beside it, into the same free memory, and the two together overran the GPU.
    """
    probe = tmp_path / "gpus.json"
    env = hook_env(tmp_path / "hook", _NVML_TOTALS_ONLY)
    d = _slow_and_other(start_daemon, probe, "2", {**env, "STAND_IN_PROBE": str(probe)})
    assert [e["detail"] for e in d.events("probe.fallback")], "the stand-in NVML was not used"
    _other_while_slow_starts(d)
    assert [e["victims"] for e in d.events("model.evict")] == [["slow"]]
    assert d.model("slow")["state"] != "ready"


def test_a_model_ready_by_the_end_of_a_slow_reading_still_counts_its_grant(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A model still starting as a device-totals reading began counts all of its grant.

    The reading's free figure was taken before that model took its memory; when it was
    ready by the time the plan used the reading, it counted as shown in that figure, and
    a second load was admitted into the same free memory.
    """
    probe = tmp_path / "gpus.json"
    slow_read = tmp_path / "slow-read"  # once made, each reading takes 2.5 s after its totals
    env = hook_env(tmp_path / "hook", _NVML_TOTALS_ONLY)
    env |= {"STAND_IN_PROBE": str(probe), "STAND_IN_SLOW_READ": str(slow_read)}
    d = _slow_and_other(start_daemon, probe, "1", env)
    _other_while_slow_starts(d, meanwhile=slow_read)
    assert [e["victims"] for e in d.events("model.evict")] == [["slow"]]


def test_the_only_gpu_lost_answers_503_and_loads_once_it_is_back(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """No GPU answering is no room (503 ``insufficient_memory``), not a failed load.

    Every read raised with the only GPU lost: the load answered 500 ``load_failed`` and the
    model was backed off, as if it had failed to start, though nothing had run.
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    lost = tmp_path / "lost"
    env = hook_env(tmp_path / "hook", _NVML_TOTALS_ONLY)
    d = start_daemon(
        {"a": _gpu_preset("a", probe, 0)},
        {"devices": "auto", "reserve": 0},
        env={**env, "STAND_IN_PROBE": str(probe), "STAND_IN_LOST": str(lost)},
    )
    lost.touch()
    status, body = d.chat("a")
    assert status == 503, body
    assert body["error"]["code"] == "insufficient_memory", body
    assert "probe.device.fail" in body["error"]["message"]
    lost.unlink()
    assert d.chat("a")[0] == 200  # no backoff to wait out: it never failed


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


def test_eviction_keeps_the_model_that_is_slow_to_start_again(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Asked for as often, the model whose start took seconds outlives a quick one.

    ``slow`` takes 3 s to start, ``quick`` a fraction of one; both served one request,
    ``quick`` the more recently. Room for two: ``new`` evicts ``quick`` (before, the
    least recently used, ``slow``, whose next request would wait 3 s again).
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": int(2.5 * GIB), "outside": 0}})
    d = start_daemon(
        {
            "slow": _gpu_preset("slow", probe, 0, "--start-delay", "3"),
            "quick": _gpu_preset("quick", probe, 0),
            "new": _gpu_preset("new", probe, 0),
        },
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    for name in ("slow", "quick", "new"):
        assert d.chat(name)[0] == 200
    assert [e["victims"] for e in d.events("model.evict")] == [["quick"]]
    assert d.model("slow")["state"] == "ready"


def _hold_daemon(start_daemon: StartDaemon, tmp_path: Path, **settings: Any) -> Daemon:
    """Room for one of two 1 GiB models; ``often`` has served three requests."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": int(1.5 * GIB), "outside": 0}})
    d = start_daemon(
        {name: _gpu_preset(name, probe, 0) for name in ("often", "rare")},
        {"devices": "auto", "reserve": 0, **settings},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    for _ in range(3):
        assert d.chat("often")[0] == 200
    return d


def test_a_held_load_goes_once_its_demand_outweighs_its_victims(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Held while its victim is in more demand, the load goes as soon as it is not.

    ``hold_busy: 0`` holds whatever the loader does. ``rare`` (CRF 1) would evict
    ``often`` (CRF 3): it is held, says so in status, and three more requests for it
    (CRF 4) end the hold long before its bound.
    """
    d = _hold_daemon(start_daemon, tmp_path, hold_busy=0, hold_max="10m")
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(d.chat, "rare")
        reason = wait_for(lambda: d.model("rare")["hold"])
        assert "victims' CRF" in reason
        assert d.model("often")["state"] == "ready"
        more = [pool.submit(d.chat, "rare") for _ in range(3)]
        assert [f.result()[0] for f in (first, *more)] == [200] * 4
    assert [e["model"] for e in d.events("model.hold.start")] == ["rare"]
    assert [(e["model"], e["why"]) for e in d.events("model.hold.end")] == [("rare", "cleared")]
    assert [e["victims"] for e in d.events("model.evict")] == [["often"]]
    assert d.model("rare")["hold"] is None


def test_a_hold_ends_at_its_bound(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A held load whose demand never catches up still goes, once ``hold_max`` has passed."""
    d = _hold_daemon(start_daemon, tmp_path, hold_busy=0, hold_max="1s")
    assert d.chat("rare")[0] == 200
    assert [(e["model"], e["why"]) for e in d.events("model.hold.end")] == [("rare", "expired")]
    assert [e["victims"] for e in d.events("model.evict")] == [["often"]]


def _slow_rare_then_often(
    start_daemon: StartDaemon, tmp_path: Path, *, hold_max: str
) -> tuple[Daemon, Path]:
    """Room for one of two 1 GiB models: ``rare`` (a 4 s start) served once, then ``often``.

    ``often`` serves three requests (its start takes under a second); every load may be
    held (``hold_busy: 0``).
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": int(1.5 * GIB), "outside": 0}})
    d = start_daemon(
        {
            "often": _gpu_preset("often", probe, 0),
            "rare": _gpu_preset("rare", probe, 0, "--start-delay", "4"),
        },
        {"devices": "auto", "reserve": 0, "hold_busy": 0, "hold_max": hold_max},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    assert d.chat("rare")[0] == 200
    for _ in range(3):
        assert d.chat("often")[0] == 200
    return d, probe


def test_a_hold_weighs_start_times_once_every_start_is_timed(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A victim in more demand that restarts at once does not hold a slow starter.

    ``rare`` starts in about 4 s, ``often`` in under one (counted as 1 s). After
    ``often``'s three requests, ``rare`` (CRF about 2) would evict ``often`` (CRF about
    3): plain CRFs hold that load, as above, but weighed by start times 2 x 4 s
    outweighs 3 x 1 s, so it goes at once. ``often``'s first load, its own start not yet
    timed, compares plain CRFs (1 against ``rare``'s 0.99) and is not held either.
    """
    d, _ = _slow_rare_then_often(start_daemon, tmp_path, hold_max="20s")
    assert d.chat("rare")[0] == 200
    assert d.events("model.hold.start") == []
    assert [e["victims"] for e in d.events("model.evict")] == [["rare"], ["often"]]


def test_a_changed_launch_is_not_weighed_by_the_start_of_the_one_before(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A restart forgets the model's start time: its new launch's first load is not timed.

    ``rare`` first starts in about 4 s; a reload gives it a launch that starts at once.
    The old start would weigh its CRF (about 2) to about 8 against ``often``'s 3 x 1 s and
    evict at once; untimed, plain CRFs compare, 2 against 3, and hold it to ``hold_max``.
    """
    d, probe = _slow_rare_then_often(start_daemon, tmp_path, hold_max="1s")
    d.presets = {**d.presets, "rare": _gpu_preset("rare", probe, 0)}
    d.write()
    status, plan = d.request("POST", "/swapd/reload")
    assert (status, plan["restarted"]) == (200, ["rare"])
    wait_for(lambda: [e["change"] for e in d.events("model.reload")] == ["restart"])
    assert d.chat("rare")[0] == 200
    held = [(e["worth"], e["victims_worth"]) for e in d.events("model.hold.start")]
    assert held == [(None, None)]
    assert [e["victims"] for e in d.events("model.evict")] == [["rare"], ["often"]]


def test_an_idle_loader_never_holds(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """With the default ``hold_busy``, a loader idle most of the time evicts at once."""
    d = _hold_daemon(start_daemon, tmp_path)
    assert d.chat("rare")[0] == 200
    assert d.events("model.hold.start") == []
    assert [e["victims"] for e in d.events("model.evict")] == [["often"]]


def test_a_backend_that_takes_more_than_it_was_admitted_with_is_named(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Declared 1 GiB, measured 2 GiB: model.need.low says so; a true declaration does not."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    over = ("--probe-file", str(probe), "--mem-bytes", str(2 * GIB))
    d = start_daemon(
        {
            "over": fake_preset("O", *over, memory=GIB, devices=[0]),
            "true": _gpu_preset("true", probe, 0),
        },
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    assert d.chat("over")[0] == 200
    assert d.chat("true")[0] == 200
    wait_for(lambda: len(d.events("model.measure")) == 2)
    [low] = d.events("model.need.low")
    assert (low["model"], low["admitted"], low["measured"]) == ("over", GIB, 2 * GIB)
    assert low["source"] == "preset"
    assert "memory:" in low["detail"]


def test_a_preset_env_cannot_move_its_backend_off_the_device_admission_chose(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The device's variables win over the preset's ``env``: a backend runs where it is counted.

    A preset carried over from llama-swap pins its GPU with ``CUDA_VISIBLE_DEVICES: "1"``.
    Admission placed it on gpu0 (the most free memory) and the preset's variable then sent
    the process to gpu1, where swapd counted nothing of it: status named gpu0, and loads
    on gpu1 were granted the memory it held.
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(
        probe,
        {"gpu0": {"total": 8 * GIB, "outside": 0}, "gpu1": {"total": 8 * GIB, "outside": 2 * GIB}},
    )
    preset = fake_preset(
        "A",
        *("--probe-file", str(probe), "--mem-bytes", str(GIB)),
        memory=GIB,
        env={"CUDA_VISIBLE_DEVICES": "1"},
    )
    d = start_daemon(
        {"a": preset}, {"devices": "auto", "reserve": 0}, env={"SWAPD_FAKE_PROBE": str(probe)}
    )
    assert d.chat("a")[0] == 200
    assert d.model("a")["device"] == "gpu0"
    held = probe_file.read_state(probe)["processes"].values()
    assert [p["device"] for p in held] == ["gpu0"]
