"""Backends in their corners.

Split GGUF fallbacks, a preset's own vLLM share, a llamafile as the program, and the
llama-server build's flags read with the preset's environment.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from fakes.tiny_gguf import write_tiny_llama_gguf

from swapd.backends import Placement, build_launch, llama_server_flags
from swapd.backends.llama_server import LLAMA_SERVER
from swapd.backends.vllm import VLLM
from swapd.estimate import CPU_OVERHEAD, GPU_OVERHEAD
from swapd.footprints import Footprints
from swapd.needs import memory_need
from swapd.presets import Preset
from swapd.probe import HOST_DEVICE, Device

GIB = 1024**3
MIB = 1024**2
GPU = Device("gpu0", "nvidia", 0, "NVIDIA Test", {"CUDA_VISIBLE_DEVICES": "0"})


def _write_split_without_context_length(path: Path) -> list[Path]:
    """A llama GGUF split in three files whose metadata lacks ``llama.context_length``.

    The estimate cannot read it (``model.estimate.fail``), so swapd falls back to the
    file size; the two later shards hold most of the weights.
    """
    writer = gguf.GGUFWriter(str(path), "llama", split_max_tensors=2)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), np.float32))
    writer.add_tensor("output.weight", np.zeros((100, 64), np.float32))
    for i in range(2):
        # 4 MiB each, in the second and third files.
        writer.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((16384, 64), np.float32))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", np.zeros((64, 16384), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    assert len(shards) == 3, shards
    return shards


def test_unreadable_split_gguf_falls_back_to_the_size_of_every_shard(tmp_path: Path) -> None:
    """A split GGUF the estimate cannot read counts every shard, never less.

    The fallback counted the first file only (mostly metadata), far below what loads.
    """
    shards = _write_split_without_context_length(tmp_path / "m.gguf")
    every_shard = sum(p.stat().st_size for p in shards)
    assert shards[0].stat().st_size < every_shard // 4  # the first file is mostly metadata
    preset = Preset(name="m", file="m.yaml", backend="llama-server", model=shards[0])
    need = LLAMA_SERVER.estimate(preset, HOST_DEVICE, 64 * GIB)
    assert need is not None
    assert need >= every_shard + CPU_OVERHEAD, (
        f"fallback need {need} < {every_shard} bytes of the shards llama-server loads "
        f"+ {CPU_OVERHEAD} overhead"
    )


def test_vllm_estimate_follows_the_presets_own_gpu_memory_utilization() -> None:
    """The preset's ``--gpu-memory-utilization`` (kept in the command line) is the share.

    The estimate assumed 90% (vLLM's own default) whatever the preset set, so a card with
    a fifth held elsewhere refused a 30% vLLM as impossible.
    """
    preset = Preset(
        name="v",
        file="v.yaml",
        backend="vllm",
        model=Path("/models/v"),
        args=("--gpu-memory-utilization", "0.3"),
    )
    total = 80 * GIB
    # The preset's flag is kept on the command line: vLLM will take 30% of the card.
    argv = VLLM.argv(preset, "vllm", 1, Placement(on_gpu=True, gpu_fraction=0.9))
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.3"
    assert "0.900" not in argv
    need = VLLM.estimate(preset, GPU, total)
    assert need == int(total * 0.3), f"estimate {need} bytes for a 24 GiB vLLM"


def test_a_command_may_run_its_model_as_the_program(tmp_path: Path) -> None:
    """``cmd: ["${MODEL}", ...]`` runs the model file itself (a llamafile).

    The binary check looked up the text ``${MODEL}`` on PATH: every start was a 502.
    """
    model = tmp_path / "qwen.llamafile"
    model.write_text("#!/bin/sh\nexit 0\n")
    model.chmod(0o755)
    preset = Preset(
        name="q",
        file="q.yaml",
        backend="command",
        model=model,
        cmd=("${MODEL}", "--server", "--port", "${PORT}"),
    )
    launch = build_launch(preset, 4242, Placement())
    assert launch.argv == (str(model), "--server", "--port", "4242")


def _fake_llama_server(path: Path, *, help_needs: str | None) -> Path:
    """A stand-in llama-server whose ``--help`` lists ``--fit``.

    With ``help_needs``, it runs only with that directory on LD_LIBRARY_PATH, as a build
    whose shared libraries live beside it but off the loader's path does.
    """
    fit = 'echo "-fit,  --fit [on|off]   whether to adjust unset arguments to fit"'
    if help_needs is None:
        body = fit
    else:
        body = (
            f'case "$LD_LIBRARY_PATH" in *{help_needs}*) {fit};; '
            '*) echo "error while loading shared libraries: libllama.so" >&2; exit 127;; esac'
        )
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_fit_off_is_pinned_for_a_build_that_needs_the_presets_env_to_run(tmp_path: Path) -> None:
    """``--help`` runs with the preset's environment, as the server does.

    A build that needs its ``LD_LIBRARY_PATH`` to run gave no flags, and no ``--fit off``.
    """
    libs = tmp_path / "lib"
    libs.mkdir()
    binary = _fake_llama_server(tmp_path / "llama-server", help_needs=str(libs))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    preset = Preset(
        name="m",
        file="m.yaml",
        backend="llama-server",
        model=model,
        binary=str(binary),
        env={"LD_LIBRARY_PATH": str(libs)},
    )
    launch = build_launch(preset, 1, Placement(on_gpu=True))
    assert launch.env["LD_LIBRARY_PATH"] == str(libs)  # what the server itself runs with
    assert "--fit" in launch.argv, launch.argv


def test_fit_flag_follows_a_binary_replaced_in_place(tmp_path: Path) -> None:
    """A build replaced in place (an upgrade) has its ``--help`` read again.

    The flags were cached by path for the daemon's life: the new build never got
    ``--fit off``.
    """
    binary = tmp_path / "llama-server"
    binary.write_text('#!/bin/sh\necho "-c,  --ctx-size N"\n')
    binary.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    preset = Preset(
        name="m", file="m.yaml", backend="llama-server", model=model, binary=str(binary)
    )
    assert "--fit" not in build_launch(preset, 1, Placement(on_gpu=True)).argv
    _fake_llama_server(tmp_path / "new", help_needs=None).replace(binary)  # the upgrade
    argv = build_launch(preset, 2, Placement(on_gpu=True)).argv
    assert "--fit" in argv, (
        f"new build's --fit not pinned off; cached: {llama_server_flags(str(binary))}"
    )


def _projector(path: Path) -> Path:
    """A vision projector GGUF holding one 8 MiB tensor."""
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_tensor("v.blk.0.attn_q.weight", np.zeros((2048, 1024), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("extra", "device", "counted"),
    [
        ((), GPU, True),
        (("--no-mmproj-offload",), GPU, False),
        (("--no-mmproj-offload",), HOST_DEVICE, True),
        (("--no-mmproj-offload", "--mmproj-offload"), GPU, True),
        # Counted: older servers drop a named projector for --no-mmproj, newer ones load it.
        (("--no-mmproj",), GPU, True),
    ],
)
def test_a_vision_projector_counts_where_it_goes(
    tmp_path: Path, extra: tuple[str, ...], device: Device, counted: bool
) -> None:
    """``--mmproj FILE`` loads onto the GPU by default: its weights count there.

    The estimate read the model file alone, so a vision model was admitted with less than
    it takes until measured.
    """
    model = tmp_path / "m.gguf"
    write_tiny_llama_gguf(model)
    mmproj = _projector(tmp_path / "mmproj.gguf")
    plain = Preset(name="m", file="m.yaml", backend="llama-server", model=model)
    vision = Preset(
        name="m",
        file="m.yaml",
        backend="llama-server",
        model=model,
        args=("--mmproj", str(mmproj), *extra),
    )
    without = LLAMA_SERVER.estimate(plain, device, 80 * GIB)
    with_projector = LLAMA_SERVER.estimate(vision, device, 80 * GIB)
    assert without is not None
    assert with_projector is not None
    assert with_projector - without == (mmproj.stat().st_size if counted else 0)


@pytest.mark.parametrize(
    ("draft_flags", "alone_flags"),
    [
        ((), ()),
        (("-ngld", "0"), ("-ngl", "0")),
        (("--spec-draft-ngl=0",), ("-ngl", "0")),
        (("-ctkd", "q8_0", "-ctvd", "q8_0"), ("-ctk", "q8_0", "-ctv", "q8_0")),
        # An older server's -cd: a draft context of that size for each slot.
        (("-cd", "256"), ("-c", "1024", "-np", "4", "-no-kvu")),
    ],
)
@pytest.mark.parametrize("device", [GPU, HOST_DEVICE])
def test_a_draft_model_counts_as_a_second_model_without_a_second_runtime(
    tmp_path: Path, draft_flags: tuple[str, ...], alone_flags: tuple[str, ...], device: Device
) -> None:
    """``-md FILE`` loads a draft model for speculative decoding beside the target.

    It shares the target's context and slots and takes its own layers (``-ngld``) and
    cache types (``-ctkd``, ``-ctvd``): its weights, cache and compute buffer count, the
    runtime's overhead once. The estimate counted the target alone.
    """
    model = tmp_path / "m.gguf"
    write_tiny_llama_gguf(model)
    draft = tmp_path / "draft.gguf"
    write_tiny_llama_gguf(draft)
    shared = ("-c", "512")

    def estimate(path: Path, *args: str) -> int:
        preset = Preset(name="m", file="m.yaml", backend="llama-server", model=path, args=args)
        found = LLAMA_SERVER.estimate(preset, device, 80 * GIB)
        assert found is not None
        return found

    overhead = GPU_OVERHEAD if device.kind != "cpu" else CPU_OVERHEAD
    target = estimate(model, *shared)
    both = estimate(model, *shared, "-md", str(draft), *draft_flags)
    assert both - target == estimate(draft, *shared, *alone_flags) - overhead


def test_a_draft_model_counts_its_file_when_the_flags_cannot_be_read(tmp_path: Path) -> None:
    """With a malformed flag the estimate falls back to file sizes: the draft's too."""
    model = tmp_path / "m.gguf"
    write_tiny_llama_gguf(model)
    draft = tmp_path / "draft.gguf"
    write_tiny_llama_gguf(draft)
    args = ("-c", "lots", "--model-draft", str(draft))
    preset = Preset(name="m", file="m.yaml", backend="llama-server", model=model, args=args)
    found = LLAMA_SERVER.estimate(preset, GPU, 80 * GIB)
    assert found == model.stat().st_size + draft.stat().st_size + GPU_OVERHEAD


def _write_moe(path: Path) -> int:
    """A two-block llama MoE GGUF; returns the bytes of its expert tensors (``*_exps``)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_expert_count(8)
    writer.add_expert_used_count(2)
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), np.float32))
    experts = 0
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((64, 64), np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.zeros((8, 64), np.float32))
        for part in ("gate", "up", "down"):
            data = np.zeros((8, 512, 64), np.float32)  # 1 MiB per tensor
            writer.add_tensor(f"blk.{i}.ffn_{part}_exps.weight", data)
            experts += data.nbytes
    writer.add_tensor("output.weight", np.zeros((100, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return experts


@pytest.mark.parametrize(("flags", "blocks_kept"), [(("--cpu-moe",), 2), (("-ncmoe", "1"), 1)])
def test_experts_kept_on_the_cpu_are_not_counted_on_the_gpu(
    tmp_path: Path, flags: tuple[str, ...], blocks_kept: int
) -> None:
    """``--cpu-moe`` (every block) and ``--n-cpu-moe N`` keep MoE experts in host RAM.

    The estimate counted every expert on the device: a big MoE on a small card was refused
    as impossible there, and, never loaded, never measured either.
    """
    model = tmp_path / "moe.gguf"
    experts = _write_moe(model)
    plain = Preset(name="m", file="m.yaml", backend="llama-server", model=model, args=("-c", "256"))
    kept = Preset(
        name="m", file="m.yaml", backend="llama-server", model=model, args=("-c", "256", *flags)
    )
    all_on_gpu = LLAMA_SERVER.estimate(plain, GPU, 80 * GIB)
    some_on_cpu = LLAMA_SERVER.estimate(kept, GPU, 80 * GIB)
    assert all_on_gpu is not None
    assert some_on_cpu is not None
    # The experts kept on the host, less the largest (1 MiB): op offload copies it to the
    # device's compute buffer to run its product there.
    assert all_on_gpu - some_on_cpu == experts * blocks_kept // 2 - MIB


def test_a_vllm_footprint_from_a_big_card_does_not_bar_a_small_one(tmp_path: Path) -> None:
    """vLLM takes the share of whichever card it runs on: a footprint from another says nothing.

    Footprints are kept per device kind: 72 GiB measured on an 80 GiB card was the need on
    a 24 GiB card of the same kind, refused there for good.
    """
    model = tmp_path / "v"
    model.mkdir()
    preset = Preset(name="v", file="v.yaml", backend="vllm", model=model)
    big = Device("gpu0", "nvidia", 0, "NVIDIA H100 80GB", {"CUDA_VISIBLE_DEVICES": "0"})
    small = Device("gpu1", "nvidia", 1, "NVIDIA RTX 4090", {"CUDA_VISIBLE_DEVICES": "1"})
    footprints = Footprints(tmp_path)
    footprints.put(preset, big.kind, int(80 * GIB * 0.9))  # what it took on gpu0
    small_total = 24 * GIB
    need = memory_need(preset, small, VLLM.estimate(preset, small, small_total), footprints)
    assert need.bytes <= small_total, (
        f"need on the 24 GiB card: {need.bytes / GIB:.1f} GiB ({need.source})"
    )
