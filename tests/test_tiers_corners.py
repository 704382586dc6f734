"""Tiers and admission in their corners.

Needs that differ per device, a sleeper that stops, weights changed between starts, a wake
that waits, `swapd plan` beside a pinned model. Each test was written against a way the
code departed from the README; its docstring says what the older code did.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for
from fakes import probe_file
from test_tiers import vllm_preset

from swapd import policy

GiB = 1024**3
MiB = 1024**2


def gpu_preset(name: str, probe: Path, nbytes: int, *extra: str, **keys: Any) -> dict[str, Any]:
    """A fake backend that holds ``nbytes`` on its GPU while it runs."""
    args = ("--probe-file", str(probe), "--mem-bytes", str(nbytes), *extra)
    return fake_preset(name.upper(), *args, memory=nbytes, **keys)


def start_gpu(
    start_daemon: StartDaemon,
    probe: Path,
    presets: dict[str, Any],
    env: dict[str, str] | None = None,
    **settings: Any,
) -> Daemon:
    """Swapd reading the probe file as its GPUs."""
    return start_daemon(
        presets,
        {"devices": "auto", "reserve": 0, **settings},
        env={"SWAPD_FAKE_PROBE": str(probe), **(env or {})},
    )


# ---------------------------------------------------------------- several devices


def test_best_plan_prefers_a_device_without_evictions_when_needs_differ() -> None:
    """Pure policy: gpu0 needs an eviction, gpu1 fits as it is; the plan must pick gpu1.

    Needs differ per device whenever the estimate depends on the device (vLLM's 90% of
    the card). README: "the model goes where it fits without evictions".
    """
    views = [
        policy.DeviceView("gpu0", 8 * GiB, 6 * GiB),
        policy.DeviceView("gpu1", 16 * GiB, 16 * GiB),
    ]
    needs = {"gpu0": int(8 * GiB * 0.9), "gpu1": int(16 * GiB * 0.9)}
    residents = [policy.Resident("a", "gpu0", 2 * GiB, last_used=1.0, measured=2 * GiB)]
    plan = policy.best_plan(needs, views, residents, policy.Limits())
    assert plan == policy.Admit("gpu1", ()), plan


def test_a_vllm_goes_to_the_gpu_where_it_fits_without_evicting(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """Two GPUs of different sizes: vLLM (90% of the card) fits on gpu1 as it is.

    On gpu0 it would need a's eviction. README (Memory admission): with several devices
    the model goes where it fits without evictions. swapd evicts a and uses gpu0.
    """
    path = tmp_path / "gpus.json"
    probe_file.write_devices(
        path, {"gpu0": {"total": 8 * GiB, "outside": 0}, "gpu1": {"total": 16 * GiB, "outside": 0}}
    )
    presets = {
        "a": gpu_preset("a", path, 2 * GiB, devices=[0]),
        "v": vllm_preset(vllm_binary, tmp_path / "v"),
    }
    env = {"FAKE_VLLM_UPSTREAM_ARGS": f"--probe-file {path} --mem-bytes {GiB}"}
    d = start_gpu(start_daemon, path, presets, env)
    assert d.chat("a")[0] == 200
    assert d.model("a")["device"] == "gpu0"
    status, body = d.chat("v")
    assert status == 200, body
    assert (d.model("v")["device"], d.model("a")["state"]) == ("gpu1", "ready"), (
        d.model("v")["device"],
        d.model("a")["state"],
        [e["victims"] for e in d.events("model.evict")],
    )


# ---------------------------------------------------------------- a sleeper leaving ram


def test_max_running_does_not_count_a_sleeper_stopping_out_of_ram(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """README: "max_running counts models in the device tier only".

    A sleeping vLLM whose ram_ttl expired stops (its tier is not device while it stops, as
    test_tier_while_stopping checks). A load of another model with max_running: 1 must
    not wait for that stop; swapd counts the stopping sleeper as running and waits.
    """
    presets = {
        "a": vllm_preset(
            vllm_binary, tmp_path / "a", ttl="1s", ram_ttl="1s", stop_timeout="8s", memory="64MiB"
        ),
        "b": fake_preset("B"),
    }
    # The fake ignores SIGTERM: a's stop lasts stop_timeout.
    d = start_daemon(
        presets, {"max_running": 1}, env={"FAKE_VLLM_UPSTREAM_ARGS": "--ignore-sigterm"}
    )
    assert d.chat("a")[0] == 200
    wait_for(lambda: d.model("a")["state"] == "stopping", timeout=40, interval=0.02)
    assert d.model("a")["tier"] != "device"
    assert d.chat("b")[0] == 200
    waits = [e["busy"] for e in d.events("model.load.wait") if e["model"] == "b"]
    assert waits == [], waits
    wait_for(lambda: d.model("a")["state"] == "stopped", timeout=40)


def test_a_sleeper_stopping_out_of_ram_counts_only_what_it_holds_on_the_device(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """README: admission counts what a sleeping process still holds on the device, as measured.

    a (6 GiB granted) sleeps on an 8 GiB GPU holding nothing there; its ram_ttl expires
    and it stops, slowly. b (4 GiB) fits in the 8 GiB free, but swapd counts a's full
    grant while it stops (as memory still to be taken from free) and makes b wait.
    """
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 8 * GiB, "outside": 0}})
    presets = {
        "a": vllm_preset(
            vllm_binary, tmp_path / "a", ttl="1s", ram_ttl="1s", stop_timeout="8s", memory="6GiB"
        ),
        "b": gpu_preset("b", path, 4 * GiB),
    }
    upstream = f"--ignore-sigterm --probe-file {path} --mem-bytes {6 * GiB}"
    d = start_gpu(start_daemon, path, presets, {"FAKE_VLLM_UPSTREAM_ARGS": upstream})
    assert d.chat("a")[0] == 200
    wait_for(lambda: d.model("a")["state"] == "stopping", timeout=40, interval=0.02)
    assert d.model("a")["tier"] != "device"
    assert d.chat("b")[0] == 200
    waits = [e["busy"] for e in d.events("model.load.wait") if e["model"] == "b"]
    assert waits == [], waits
    wait_for(lambda: d.model("a")["state"] == "stopped", timeout=40)


# ---------------------------------------------------------------- a model file that changed


def test_a_sleeping_vllm_counts_the_weights_its_process_loaded(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """README: at level 1 on a GPU the weights count in the ram tier as the files vLLM loads.

    The weights in the model folder grow (a new revision written in place) between two
    starts. The second process loaded 32 MiB of weights, but its sleep is counted at the
    size read at the first start (1 KiB), so the ram tier and ram_budget under-count it.
    """
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 8 * GiB, "outside": 0}})
    model = tmp_path / "v"
    presets = {"v": vllm_preset(vllm_binary, model, ttl="1s", memory="1GiB")}
    d = start_gpu(start_daemon, path, presets)
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep" and d.model("v")["memory"]["ram"], 40)
    assert d.model("v")["memory"]["ram"] == 1024
    assert d.request("POST", "/swapd/models/v/unload")[0] == 200
    assert d.model("v")["state"] == "stopped"
    with (model / "weights.safetensors").open("r+b") as weights:
        weights.truncate(32 * MiB)
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep" and d.model("v")["memory"]["ram"], 40)
    assert d.model("v")["memory"]["ram"] == 32 * MiB, d.model("v")["memory"]


# ---------------------------------------------------------------- ram budget


def test_a_demotion_while_a_wake_waits_keeps_the_ram_tier_within_its_budget(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """README: ram_budget is the bytes the ram tier may hold.

    a sleeps on gpu0 (100 MiB of weights in the ram tier, budget 150 MiB); its wake waits
    behind busy b. Meanwhile c's TTL demotes it on gpu1. a still sleeps (status shows it
    in the ram tier, 100 MiB), yet the demotion plans the tier as empty and puts c to
    sleep too: the tier holds 200 MiB against its 150 MiB budget.
    """
    path = tmp_path / "gpus.json"
    gpus = {"gpu0": {"total": 8 * GiB, "outside": 0}, "gpu1": {"total": 8 * GiB, "outside": 0}}
    probe_file.write_devices(path, gpus)
    presets = {
        "a": vllm_preset(vllm_binary, tmp_path / "a", ttl="1s", memory="1GiB", devices=[0]),
        "b": gpu_preset("b", path, 7 * GiB + 512 * MiB, devices=[0]),
        "c": vllm_preset(vllm_binary, tmp_path / "c", ttl="1s", memory="1GiB", devices=[1]),
    }
    for name in ("a", "c"):
        with (tmp_path / name / "weights.safetensors").open("r+b") as weights:
            weights.truncate(100 * MiB)
    upstream = f"--probe-file {path} --mem-bytes {GiB}"
    d = start_gpu(
        start_daemon,
        path,
        presets,
        {"FAKE_VLLM_UPSTREAM_ARGS": upstream},
        ram_budget="150MiB",
        queue_timeout="60s",
        max_wait="60s",
    )
    assert d.chat("a")[0] == 200
    wait_for(lambda: d.model("a")["state"] == "asleep" and d.model("a")["memory"]["ram"], 40)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(d.chat, "b", "long", fake_delay=15)
        wait_for(lambda: d.model("b")["in_flight"] == 1, timeout=40)
        wake = pool.submit(d.chat, "a")
        wait_for(lambda: d.model("a")["state"] == "queued", timeout=40)
        assert d.chat("c")[0] == 200
        wait_for(lambda: d.model("c")["state"] in ("asleep", "stopped"), timeout=40)
        wait_for(lambda: d.model("c")["state"] == "stopped" or d.model("c")["memory"]["ram"], 40)
        _, status = d.get("/swapd/status")
        by_name = {m["name"]: m for m in status["models"]}
        assert by_name["a"]["state"] == "queued", "setup: a's wake no longer waits"
        assert by_name["a"]["tier"] == "ram"
        ram = status["tiers"]["ram"]
        assert ram["bytes"] <= ram["budget"], (
            ram,
            {n: (m["state"], m["memory"]["ram"]) for n, m in by_name.items()},
        )
        assert busy.result()[0] == 200
        assert wake.result()[0] == 200


# ---------------------------------------------------------------- swapd plan and pins


def test_plan_says_never_for_a_model_that_fits_only_by_evicting_a_pinned_one(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """README: `alone` means "only with the packed ones evicted"; pinned ones never are.

    keep (6 GiB, pinned, preloaded) holds an 8 GiB GPU; x needs 4 GiB. Admission refuses
    x (503 insufficient_memory: the 6 GiB are pinned), but `swapd plan` says x fits alone.
    """
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 8 * GiB, "outside": 0}})
    presets = {
        "keep": gpu_preset("keep", path, 6 * GiB, pin=True, preload=True),
        "x": gpu_preset("x", path, 4 * GiB),
    }
    d = start_gpu(start_daemon, path, presets)
    wait_for(lambda: d.model("keep")["state"] == "ready", timeout=40)
    status, body = d.chat("x")
    assert (status, body["error"]["code"]) == (503, "insufficient_memory"), body
    _, plan = d.get("/swapd/plan")
    fits = {m["name"]: (m["fit"], m["device"]) for m in plan["models"]}
    assert fits["x"] == ("never", None), fits


# ---------------------------------------------------------------- the tiers in status


def test_the_device_tiers_budget_is_the_budget_of_every_device_together(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """``budget`` caps each device; the tier's bytes add up every device, so must its budget.

    It showed the one device's cap beside the bytes of both: 6 GiB held against a 4 GiB
    budget, a tier over budget that no device was.
    """
    path = tmp_path / "gpus.json"
    gpus = {"gpu0": {"total": 8 * GiB, "outside": 0}, "gpu1": {"total": 8 * GiB, "outside": 0}}
    probe_file.write_devices(path, gpus)
    presets = {
        "a": gpu_preset("a", path, 3 * GiB, devices=[0]),
        "b": gpu_preset("b", path, 3 * GiB, devices=[1]),
    }
    d = start_gpu(start_daemon, path, presets, budget="4GiB")
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    _, status = d.get("/swapd/status")
    assert status["tiers"]["device"] == {"bytes": 6 * GiB, "budget": 8 * GiB}


def test_sleep_auto_is_level_1_on_a_gpu(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """``sleep: auto`` means 1 on a GPU: the flag and dev mode at start, and a TTL sleeps it."""
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 8 * GiB, "outside": 0}})
    presets = {"v": vllm_preset(vllm_binary, tmp_path / "v", sleep="auto", ttl="1s")}
    env = {"FAKE_VLLM_UPSTREAM_ARGS": f"--probe-file {path} --mem-bytes {GiB}"}
    d = start_gpu(start_daemon, path, presets, env)
    assert d.chat("v")[0] == 200
    [spawn] = d.events("backend.spawn")
    assert "--enable-sleep-mode" in spawn["argv"]
    assert d.model("v")["sleep"] == {"level": 1, "note": None}
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)  # dev mode: /sleep answers
    assert d.model("v")["tier"] == "ram"


def test_what_sleepers_keep_on_a_gpu_is_counted_and_the_least_worth_goes_to_disk(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """README: admission counts what a sleeping process still holds on the device, as measured.

    Three vLLMs hold 3.5 GiB awake and keep 512 MiB asleep (a CUDA context). The budget
    fits one awake and one asleep, not one awake and two asleep: b's load puts a to sleep,
    c's load puts b to sleep and stops a; a request for b wakes it and puts c to sleep.
    Counting the sleepers as holding nothing would keep a asleep past the budget.
    (``tests/test_gpu_real.py`` runs the same on real VRAM.)
    """
    context, need = 512 * MiB, 3 * GiB + 512 * MiB
    path = tmp_path / "gpus.json"
    probe_file.write_devices(path, {"gpu0": {"total": 80 * GiB, "outside": 0}})
    presets = {n: vllm_preset(vllm_binary, tmp_path / n, sleep="auto", memory=need) for n in "abc"}
    upstream = f"--probe-file {path} --mem-bytes {need} --sleep-residual-bytes {context}"
    budget = need + context * 3 // 2
    d = start_gpu(start_daemon, path, presets, {"FAKE_VLLM_UPSTREAM_ARGS": upstream}, budget=budget)

    def states() -> dict[str, tuple[str, str]]:
        return {n: (d.model(n)["state"], d.model(n)["tier"]) for n in "abc"}

    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    assert states() == {"a": ("asleep", "ram"), "b": ("ready", "device"), "c": ("stopped", "disk")}
    # What a keeps on the GPU asleep is the device's as well as b's whole need (read after
    # the sleep, off the load's path).
    device_tier = {"bytes": need + context, "budget": budget}
    wait_for(lambda: d.get("/swapd/status")[1]["tiers"]["device"] == device_tier)
    assert d.chat("c")[0] == 200
    assert states() == {"a": ("stopped", "disk"), "b": ("asleep", "ram"), "c": ("ready", "device")}
    b_pid = d.model("b")["pid"]
    assert d.chat("b")[0] == 200
    assert states() == {"a": ("stopped", "disk"), "b": ("ready", "device"), "c": ("asleep", "ram")}
    assert d.model("b")["pid"] == b_pid
    assert len(d.events("backend.spawn")) == 3
