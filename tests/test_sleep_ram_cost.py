"""What a vLLM asleep at level 1 on a GPU counts in the ram tier.

Level 1 keeps the weights vLLM loaded in pinned host RAM. A model folder cloned with
git-lfs also holds every weight file a second time under ``.git/lfs/objects`` (and
Meta's repos ship ``original/consolidated.*.pth`` beside the safetensors); Mistral's
hold them as ``consolidated.safetensors`` and as indexed ``model-*`` shards; a trainer's
checkpoint keeps its optimizer's state beside them. vLLM loads one copy of the weights,
but swapd counted every file under the folder, or every top-level weight file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import StartDaemon
from daemon import Daemon, wait_for
from fakes import probe_file

MIB = 1024**2
GIB = 1024**3


def _git_lfs_clone(model: Path) -> None:
    lfs = model / ".git" / "lfs" / "objects" / "ab" / "cd"
    lfs.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * (4 * MIB))
    (lfs / ("abcd" + "0" * 60)).write_bytes(b"\0" * (4 * MIB))  # git-lfs's copy of it


def _mistral_repo(model: Path) -> None:
    """Mistral's layout: the weights whole, and again as the shards the index names."""
    (model / "consolidated.safetensors").write_bytes(b"\0" * (4 * MIB))
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for shard in shards:
        (model / shard).write_bytes(b"\0" * (2 * MIB))
    index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def _trainer_checkpoint(model: Path) -> None:
    """A checkpoint saved in .bin form, with its optimizer's state (twice the weights)."""
    (model / "pytorch_model.bin").write_bytes(b"\0" * (4 * MIB))
    (model / "optimizer.bin").write_bytes(b"\0" * (8 * MIB))
    (model / "training_args.bin").write_bytes(b"\0" * 4096)


@pytest.mark.parametrize("layout", [_git_lfs_clone, _mistral_repo, _trainer_checkpoint])
def test_level_1_ram_cost_counts_the_weights_vllm_loads_not_every_file(
    start_daemon: StartDaemon,
    vllm_binary: str,
    tmp_path: Path,
    layout: Callable[[Path], None],
) -> None:
    """Asleep at level 1 on a (fake) GPU: 4 MiB of weights, whatever else the folder holds."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    model = tmp_path / "m"
    model.mkdir()
    layout(model)
    (model / "config.json").write_text("{}")
    d = start_daemon(
        {
            "v": {
                "backend": "vllm",
                "model": str(model),
                "binary": vllm_binary,
                "sleep": 1,
                "ttl": "1s",
                "memory": "1GiB",
            }
        },
        {"devices": "auto", "reserve": 0},
        env={
            "SWAPD_FAKE_PROBE": str(probe),
            "FAKE_VLLM_UPSTREAM_ARGS": f"--probe-file {probe} --mem-bytes {GIB}",
        },
    )
    assert d.chat("v")[0] == 200
    assert d.model("v")["device"] == "gpu0"
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    wait_for(lambda: d.events("model.sleep"))
    ram = d.model("v")["memory"]["ram"]
    assert ram <= 4 * MIB + 2, f"ram tier counts {ram / MIB:.1f} MiB for 4 MiB of weights"


def _gpu_sleeper(
    start_daemon: StartDaemon,
    vllm_binary: str,
    tmp_path: Path,
    keys: dict[str, object],
    daemon_config: dict[str, object],
) -> Daemon:
    """A vLLM on a (fake) GPU with 4 MiB of safetensors, asleep after its TTL (level 2).

    Beside them, 1 MiB of ``.pt`` weights: vLLM reads them only if told to.
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * (4 * MIB))
    (model / "model.pt").write_bytes(b"\0" * MIB)
    (model / "config.json").write_text("{}")
    preset = {"backend": "vllm", "model": str(model), "binary": vllm_binary, "sleep": 2}
    return start_daemon(
        {"v": {**preset, "ttl": "1s", "memory": "1GiB", **keys}},
        {"devices": "auto", "reserve": 0, **daemon_config},
        env={
            "SWAPD_FAKE_PROBE": str(probe),
            "FAKE_VLLM_UPSTREAM_ARGS": f"--probe-file {probe} --mem-bytes {GIB}",
        },
    )


def test_level_2_ram_cost_counts_the_weights_cpu_offload_keeps_in_host_ram(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """``--cpu-offload-gb`` weights are host RAM that a level-2 sleep keeps: counted 0 before."""
    args = ["--cpu-offload-gb", "0.002"]
    d = _gpu_sleeper(start_daemon, vllm_binary, tmp_path, {"args": args}, {})
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    wait_for(lambda: d.events("model.sleep"))
    assert d.model("v")["memory"]["ram"] == int(0.002 * GIB)


def test_a_level_2_sleeper_whose_offloaded_weights_pass_the_ram_budget_goes_to_disk(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """2 MiB offloaded, a 1 MiB ram budget: it cannot stay asleep in the ram tier."""
    keys: dict[str, object] = {"args": ["--cpu-offload-gb=0.002"]}
    d = _gpu_sleeper(start_daemon, vllm_binary, tmp_path, keys, {"ram_budget": MIB})
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.events("model.sleep") or d.model("v")["tier"] == "disk", timeout=40)
    wait_for(lambda: d.model("v")["tier"] == "disk", timeout=40)
    assert d.model("v")["state"] == "stopped"


@pytest.mark.parametrize(("load_format", "weights"), [("pt", MIB), ("auto", 4 * MIB)])
def test_level_1_ram_cost_counts_the_files_the_load_format_reads(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path, load_format: str, weights: int
) -> None:
    """``--load-format pt`` reads the ``.pt`` file only (default_loader.py): its size, not 4 MiB."""
    args = ["--load-format", "safetensors", "--load-format", load_format]  # the last counts
    d = _gpu_sleeper(start_daemon, vllm_binary, tmp_path, {"args": args, "sleep": 1}, {})
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    wait_for(lambda: d.events("model.sleep"))
    assert d.model("v")["memory"]["ram"] == weights


def test_a_victim_does_not_sleep_into_host_ram_the_newcomers_cpu_offload_pins(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """``b`` offloads more weights to host RAM than this host has: ``a`` cannot sleep there.

    Before, the ram tier's room ignored what ``b`` would pin, and put ``a`` to sleep in it.
    """
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * (4 * MIB))
    preset = {"backend": "vllm", "model": str(model), "binary": vllm_binary, "memory": "6GiB"}
    d = start_daemon(
        {"a": {**preset, "sleep": 1}, "b": {**preset, "args": ["--cpu-offload-gb", "1e6"]}},
        {"devices": "auto", "reserve": 0},
        env={
            "SWAPD_FAKE_PROBE": str(probe),
            "FAKE_VLLM_UPSTREAM_ARGS": f"--probe-file {probe} --mem-bytes {6 * GIB}",
        },
    )
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    [evict] = d.events("model.evict")
    assert evict["actions"] == ["stop:a"]
    wait_for(lambda: d.model("a")["tier"] == "disk")
