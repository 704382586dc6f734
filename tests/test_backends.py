"""How presets become command lines and environments for each backend kind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swapd.backends import BinaryNotFound, Placement, build_launch, child_env, has_flag
from swapd.presets import Preset


def _preset(tmp_path: Path, **keys: object) -> Preset:
    binary = tmp_path / "server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    values: dict[str, object] = {
        "name": "m",
        "file": "presets/m.yaml",
        "backend": "llama-server",
        "model": tmp_path / "m.gguf",
        "binary": str(binary),
        **keys,
    }
    return Preset(**values)  # type: ignore[arg-type]


def test_llama_server_gets_host_port_and_pinned_settings(tmp_path: Path) -> None:
    """swapd adds loopback host, the port, -ngl for the device, -c and the alias."""
    launch = build_launch(_preset(tmp_path, args=("-np", "1")), 4321, Placement(on_gpu=False))
    argv = launch.argv
    assert argv[1:3] == ("-m", str(tmp_path / "m.gguf"))
    assert argv[-4:] == ("--host", "127.0.0.1", "--port", "4321")
    assert argv[argv.index("-ngl") + 1] == "0"
    assert argv[argv.index("-c") + 1] == "0"
    assert argv[argv.index("--alias") + 1] == "m"
    assert (launch.host, launch.port, launch.health_path) == ("127.0.0.1", 4321, "/health")


def test_llama_server_keeps_what_the_preset_sets(tmp_path: Path) -> None:
    """Flags the preset gives, in either spelling, are never added a second time."""
    args = ("--ctx-size=2048", "--n-gpu-layers", "20", "-a", "other")
    argv = build_launch(_preset(tmp_path, args=args), 1, Placement(on_gpu=True)).argv
    assert argv.count("-c") + argv.count("--ctx-size=2048") == 1
    assert "-ngl" not in argv
    assert "--alias" not in argv


def test_llama_server_on_a_gpu_offloads_every_layer(tmp_path: Path) -> None:
    """On a GPU device swapd pins full offload."""
    argv = build_launch(_preset(tmp_path), 1, Placement(on_gpu=True)).argv
    assert argv[argv.index("-ngl") + 1] == "999"


def test_vllm_gets_served_names_and_its_share_of_the_gpu(tmp_path: Path) -> None:
    """vLLM serves the preset name and aliases, sized to the memory swapd granted."""
    preset = _preset(tmp_path, backend="vllm", aliases=("a1",), args=("--max-model-len", "64"))
    argv = build_launch(preset, 7, Placement(on_gpu=True, gpu_fraction=0.25)).argv
    assert argv[1:3] == ("serve", str(tmp_path / "m.gguf"))
    names = argv.index("--served-model-name")
    assert argv[names + 1 : names + 3] == ("m", "a1")
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.250"
    assert argv[-4:] == ("--host", "127.0.0.1", "--port", "7")


def test_command_macros_are_replaced(tmp_path: Path) -> None:
    """${PORT} and ${MODEL} are replaced inside every argument of cmd."""
    preset = _preset(tmp_path, backend="command", cmd=("true", "--listen=:${PORT}", "${MODEL}"))
    assert build_launch(preset, 99, Placement(on_gpu=False)).argv == (
        "true",
        "--listen=:99",
        str(tmp_path / "m.gguf"),
    )


def test_child_env_drops_systemd_variables_and_adds_device_and_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Children never see swapd's notify socket; the device and preset variables win."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    env = child_env(_preset(tmp_path, env={"A": "1"}), {"CUDA_VISIBLE_DEVICES": "1"})
    assert "NOTIFY_SOCKET" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["A"] == "1"
    assert env["PATH"] == os.environ["PATH"]


def test_missing_binary_says_what_to_do(tmp_path: Path) -> None:
    """A binary that does not exist is reported by name."""
    preset = _preset(tmp_path, binary=str(tmp_path / "nope"))
    with pytest.raises(BinaryNotFound, match=r"not found: no file at .*nope; fix binary: in"):
        build_launch(preset, 1)


@pytest.mark.parametrize(
    ("args", "expected"),
    [(("-c", "1"), True), (("--ctx-size=5",), True), (("-cb",), False), ((), False)],
)
def test_has_flag(args: tuple[str, ...], expected: bool) -> None:
    """Flags match in both spellings, never by prefix."""
    assert has_flag(args, "-c", "--ctx-size") is expected


def test_the_placement_names_the_gpu_over_a_presets_own_and_an_empty_one_hides_them(
    tmp_path: Path,
) -> None:
    """A preset's CUDA_VISIBLE_DEVICES gives way to the placement's; one set to nothing stays.

    Set to nothing it hides every GPU: the backend runs on the CPU, as its preset asks.
    """
    gpu = {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    placement = Placement(on_gpu=True, device_env=gpu)
    named = _preset(tmp_path, env={"CUDA_VISIBLE_DEVICES": "1", "X": "y"})
    env = build_launch(named, 1, placement).env
    assert (env["CUDA_VISIBLE_DEVICES"], env["X"]) == ("0", "y")
    hidden = _preset(tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert build_launch(hidden, 1, placement).env["CUDA_VISIBLE_DEVICES"] == ""
