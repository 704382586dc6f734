"""What a vLLM asleep at level 1 on a GPU counts in the ram tier.

Level 1 keeps the weights vLLM loaded in pinned host RAM. A model folder cloned with
git-lfs also holds every weight file a second time under ``.git/lfs/objects`` (and
Meta's repos ship ``original/consolidated.*.pth`` beside the safetensors); vLLM loads
neither, but swapd counts every file under the folder.
"""

from __future__ import annotations

from pathlib import Path

from conftest import StartDaemon
from daemon import wait_for
from fakes import probe_file

MIB = 1024**2
GIB = 1024**3


def test_level_1_ram_cost_counts_the_weights_vllm_loads_not_every_file(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """Asleep at level 1 on a (fake) GPU: 4 MiB of safetensors, plus git-lfs's copy."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 8 * GIB, "outside": 0}})
    model = tmp_path / "m"
    lfs = model / ".git" / "lfs" / "objects" / "ab" / "cd"
    lfs.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * (4 * MIB))
    (lfs / ("abcd" + "0" * 60)).write_bytes(b"\0" * (4 * MIB))  # git-lfs's copy of it
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
