"""How swapd launches vLLM 0.32, checked against what vLLM 0.32 itself does with it.

Each test names the vLLM source (site-packages/vllm, the CPU build in
``$SWAPD_CACHE/vllm-venv``) whose behaviour it holds swapd to. They are unit tests:
the launch swapd builds (admission's need, the manager's placement, the kind's argv)
is compared with what vLLM's own code makes of that launch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from swapd.backends import Placement
from swapd.backends._launch import child_env
from swapd.backends.vllm import VLLM, VLLM_CPU_KV_DEFAULT, VLLM_CPU_RUNTIME
from swapd.errors import ConfigErrors, Forbidden
from swapd.footprints import Footprints
from swapd.manager import Manager
from swapd.needs import estimate_bytes, memory_need
from swapd.passthrough import backend_path
from swapd.presets import Preset, load_presets
from swapd.probe import HOST_DEVICE, Device
from swapd.units import parse_size

GiB = 1024**3
GPU = Device(id="gpu0", kind="nvidia", index=0, name="GPU 0", visible_env={})
# vllm/config/cache.py:102: gpu_memory_utilization defaults to 0.92 (CPU builds too).
VLLM_DEFAULT_UTILIZATION = 0.92
# vllm/engine/arg_utils.py:1356-1360: both spellings set gpu_memory_utilization.
UTILIZATION_FLAGS = ("--gpu-memory-utilization", "--device-memory-utilization")


def _preset(tmp_path: Path, **keys: object) -> Preset:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    values: dict[str, object] = {
        "name": "m",
        "file": "presets/m.yaml",
        "backend": "vllm",
        "model": model,
        "binary": "/bin/true",
        **keys,
    }
    return Preset(**values)  # type: ignore[arg-type]


def _launch(preset: Preset, device: Device, total: int, tmp_path: Path) -> tuple[list[str], int]:
    """The argv swapd runs and the bytes admission reserved for it, on a first load.

    The same path as a load: the kind's estimate, the need admission takes from it (no
    footprint measured yet), the manager's placement for that need, the kind's argv.
    """
    estimate = estimate_bytes(preset, device, total)
    need = memory_need(preset, device, estimate, Footprints(tmp_path))
    slot = SimpleNamespace(preset=preset, kind=VLLM, need=need, staged_path=None)
    manager = SimpleNamespace(ram_budget=0, _sleep_refused={}, _sleep_missing={})
    placement = Manager._placement(cast("Manager", manager), cast("Any", slot), device, total)
    return VLLM.argv(preset, "vllm", 40000, placement), need.bytes


def _last_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The value argparse keeps for a flag: the last one given (``_`` read as ``-``)."""
    found = None
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        flag = "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag
        if flag in names:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def _vllm_utilization(argv: list[str]) -> float:
    value = _last_value(argv, UTILIZATION_FLAGS)
    return VLLM_DEFAULT_UTILIZATION if value is None else float(value)


def _vllm_cpu_reservation(argv: list[str], env: dict[str, str], total: int) -> int:
    """Host RAM vLLM 0.32's CPU worker sets aside at start, from its launch.

    - vllm/platforms/cpu.py:323-327: ``VLLM_CPU_KVCACHE_SPACE`` (GiB), where set, becomes
      ``kv_cache_memory_bytes``, over the command line's.
    - vllm/v1/worker/cpu_worker.py:213-230: an explicit KV size is allocated as such (the
      weights come on top of it).
    - vllm/v1/worker/cpu_worker.py:72-95 and 231-238: otherwise the worker requests
      ``gpu_memory_utilization`` (default 0.92) of the node's memory, refuses to start
      unless that much is available, and fills what its RSS leaves of it with KV cache.
    """
    if env.get("VLLM_CPU_KVCACHE_SPACE"):
        return int(env["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    kv = _last_value(argv, ("--kv-cache-memory-bytes",))
    if kv is not None:
        return int(kv.rstrip("G")) * GiB if kv.endswith("G") else int(kv)
    return math.ceil(total * _vllm_utilization(argv))


# --- CPU hosts: the estimate against vLLM 0.32's CPU memory sizing --------------------


def test_cpu_vllm_reserves_no_more_host_ram_than_admission_granted(tmp_path: Path) -> None:
    """A plain vLLM preset on a CPU-only host, no ``memory:``.

    swapd admitted it with a flat 4 GiB and passed no utilization on a CPU, so
    vLLM 0.32 asks for 0.92 of the host (cpu_worker.py:72-95): its start fails unless
    92% of RAM is free (it is not once anything else is loaded, and swapd evicted only
    4 GiB for it), and a start that succeeds takes ~92% behind admission's back.
    """
    total = 64 * GiB
    argv, need = _launch(_preset(tmp_path), HOST_DEVICE, total, tmp_path)
    reserved = _vllm_cpu_reservation(argv, {}, total)
    assert reserved <= need + total // 1000, (
        f"vLLM reserves {reserved / GiB:.1f} GiB, admission granted {need / GiB:.1f} GiB"
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ((), {"VLLM_CPU_KVCACHE_SPACE": "40"}),
        (("--kv-cache-memory-bytes", "40G"), {}),
    ],
    ids=["VLLM_CPU_KVCACHE_SPACE", "--kv-cache-memory-bytes"],
)
def test_cpu_vllm_explicit_kv_cache_size_is_admitted(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    """A preset that sizes the CPU KV cache itself (40 GiB) is admitted for at least that.

    vllm.py's own comment says the CPU KV cache comes from VLLM_CPU_KVCACHE_SPACE, yet the
    estimate is a flat 4 GiB whatever the preset's env or args say (platforms/cpu.py:
    323-327, cpu_worker.py:213-230 allocate the 40 GiB, plus the weights).
    """
    total = 64 * GiB
    preset = _preset(tmp_path, args=args, env=env)
    argv, need = _launch(preset, HOST_DEVICE, total, tmp_path)
    assert need >= _vllm_cpu_reservation(argv, env, total) == 40 * GiB


def test_cpu_kv_cache_size_inherited_from_swapds_environment_is_admitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``VLLM_CPU_KVCACHE_SPACE=40`` in swapd's own environment (a unit's ``Environment=``).

    Every vLLM child inherits it and vLLM 0.32 takes it over the command line's size
    (platforms/cpu.py:323-327), yet the estimate read the preset's ``env`` alone: it
    admitted the 3 GiB swapd gives where vLLM allocated 40 GiB.
    """
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "40")
    total = 64 * GiB
    preset = _preset(tmp_path)
    argv, need = _launch(preset, HOST_DEVICE, total, tmp_path)
    child = child_env(preset, HOST_DEVICE.visible_env)
    assert need >= _vllm_cpu_reservation(argv, child, total) == 40 * GiB
    # The preset's own env still comes first, as it does in the child's.
    smaller = _preset(tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert _launch(smaller, HOST_DEVICE, total, tmp_path)[1] < 40 * GiB


def test_cpu_vllm_counts_a_mistral_repos_weights_once(tmp_path: Path) -> None:
    """Mistral's repos hold the weights as ``consolidated.safetensors`` and as ``model-*``.

    vLLM 0.32 loads the consolidated file alone (default_loader.py:168-197; an HF folder's
    ``model.safetensors.index.json`` picks among its shards the same way, weight_utils.py:
    585-611); the CPU estimate counted both copies, 29 GiB for a 7B model of 14.5.
    """
    preset = _preset(tmp_path)
    model = cast("Path", preset.model)
    (model / "model.safetensors").unlink()
    (model / "consolidated.safetensors").write_bytes(b"\0" * (8 << 20))
    (model / "model-00001-of-00001.safetensors").write_bytes(b"\0" * (8 << 20))
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _, need = _launch(preset, HOST_DEVICE, 64 * GiB, tmp_path)
    assert need == VLLM_CPU_KV_DEFAULT + (8 << 20) + VLLM_CPU_RUNTIME


# --- GPU: the preset's own share in vLLM's other spelling ------------------------------


def test_presets_device_memory_utilization_is_its_share_of_the_gpu(tmp_path: Path) -> None:
    """``--device-memory-utilization 0.3`` is vLLM's alias of --gpu-memory-utilization.

    vllm/engine/arg_utils.py:1356-1360 registers both for one dest. swapd does not know
    the alias: it estimates 0.9 of the card and appends ``--gpu-memory-utilization 0.900``,
    which argparse takes over the preset's (the last wins; checked with vLLM 0.32's own
    parser). The model takes 90% of the card where its preset asked for 30%.
    README: the flags swapd adds give way to a preset's own.
    """
    total = 80 * GiB
    preset = _preset(tmp_path, args=("--device-memory-utilization", "0.3"))
    argv, need = _launch(preset, GPU, total, tmp_path)
    assert _vllm_utilization(argv) == pytest.approx(0.3)
    assert need == pytest.approx(0.3 * total, rel=0.01)


def test_a_share_given_twice_is_admitted_as_vllm_reads_it(tmp_path: Path) -> None:
    """``--gpu-memory-utilization 0.3`` and later ``--device-memory-utilization=0.6``.

    argparse keeps the last value of one dest (checked with vLLM 0.32's own parser): vLLM
    takes 60% of the card. The estimate read the first, 30%, so admission left the other
    30% to another model.
    """
    total = 80 * GiB
    args = ("--gpu-memory-utilization", "0.3", "--device-memory-utilization=0.6")
    argv, need = _launch(_preset(tmp_path, args=args), GPU, total, tmp_path)
    assert _vllm_utilization(argv) == pytest.approx(0.6)
    assert need == pytest.approx(0.6 * total, rel=0.01)


# --- /upstream and the development routes that VLLM_SERVER_DEV_MODE=1 turns on ----------


@pytest.mark.parametrize(
    "route",
    [
        "/abort_requests",
        "/init_weight_transfer_engine",
        "/start_weight_update",
        "/update_weights",
        "/finish_weight_update",
    ],
)
def test_upstream_refuses_the_rl_routes_dev_mode_adds(route: str) -> None:
    """With VLLM_SERVER_DEV_MODE=1 (set by swapd for sleep) vLLM also mounts its RL router.

    vllm/entrypoints/launchers/api_server/routers.py:40-47 registers the RL routes with the
    sleep routes; vllm/entrypoints/rl/online/api_router.py:94-139: ``POST /abort_requests``
    with ``{}`` aborts every request in flight, and 159-211 replace the served weights.
    swapd reserves /pause, /resume and /collective_rpc from that family but not these,
    so any inference key holder can abort everyone's requests through /upstream/.
    """
    with pytest.raises(Forbidden):
        backend_path(route)


# --- the refused --enable-sleep-mode retry ----------------------------------------------


def test_retry_without_sleep_mode_drops_the_presets_own_flag(tmp_path: Path) -> None:
    """The retry after a refusal must not carry ``--enable-sleep-mode`` in any form.

    A preset that writes the flag itself keeps it on the retry (argv only skips adding
    swapd's copy), so vLLM's CPU build refuses it again (config/model.py:655-657) and the
    load fails; every later start (sleep_flag False, no refusal check) fails the same way.
    """
    preset = _preset(tmp_path, args=("--enable-sleep-mode",), sleep=1)
    retry = Placement(on_gpu=False, sleep_level=1, sleep_flag=False)
    argv = VLLM.argv(preset, "vllm", 40000, retry)
    assert not [a for a in argv if a.startswith("--enable-sleep") or a == "--enable_sleep_mode"]


def test_cumem_allocator_refusal_is_a_sleep_mode_refusal() -> None:
    """vLLM's cumem allocator refusal is a refusal of --enable-sleep-mode.

    vllm/config/model.py:655-667: with --enable-sleep-mode on a CUDA/ROCm build whose
    ``vllm.cumem_allocator`` extension is missing (device_allocator/cumem.py:37-53), vLLM
    logs its cumem line and then raises "cumem allocator is not supported on current
    platform." The flag caused it: started without it, vLLM would run.
    """
    tail = [
        (
            "(APIServer pid=1) INFO [model.py:660] "
            "Enabling cumem allocator because sleep mode requires it."
        ),
        "(APIServer pid=1) ValueError: cumem allocator is not supported on current platform.",
    ]
    assert VLLM.refused_sleep(tail) is not None


@pytest.mark.parametrize(
    ("backend", "model", "args"),
    [
        ("vllm", "m", ["--model", "other"]),
        ("vllm", "m", ["--model=other"]),
        ("llama-server", "m.gguf", ["-m", "other.gguf"]),
        ("llama-server", "m.gguf", ["--model", "other.gguf"]),
    ],
)
def test_a_preset_may_not_name_its_model_in_args(
    tmp_path: Path, backend: str, model: str, args: list[str]
) -> None:
    """swapd passes the model itself (``model:``, or the staged copy).

    vLLM moves a preset's ``--model`` ahead of the positional model swapd passes and
    then refuses that one ("unrecognized arguments"); a llama-server would run another
    file than the one admission estimated. ``swapd check`` let both through.
    """
    (tmp_path / "m").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "p.yaml").write_text(
        f"backend: {backend}\nmodel: {model}\nargs: {json.dumps(args)}\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_presets(tmp_path, {})
    flag = args[0].split("=", 1)[0]
    assert f"args: {flag} is swapd's to pass, from model:" in str(info.value)


@pytest.mark.parametrize(
    ("memory", "kv"), [(None, 3 * GiB), ("8GiB", 7 * GiB - 4096), ("1GiB", 256 * 1024**2)]
)
def test_a_cpu_vllm_gets_a_kv_cache_of_the_presets_size_never_of_a_measure(
    tmp_path: Path, memory: str | None, kv: int
) -> None:
    """On a CPU swapd sizes the KV cache itself: from ``memory:`` or the default.

    A share (``--gpu-memory-utilization``) would be of the NUMA node's memory, not of what
    swapd counts (a cgroup's limit, the whole host), and a share from a measured footprint
    (which counts vLLM's front-end process too) grew the cache at each start.
    """
    keys: dict[str, object] = {} if memory is None else {"memory": parse_size(memory)}
    preset = _preset(tmp_path, **keys)
    first, _ = _launch(preset, HOST_DEVICE, 64 * GiB, tmp_path)
    Footprints(tmp_path).put(preset, "cpu", 20 * GiB)  # the tree's RSS, front end and all
    again, need = _launch(preset, HOST_DEVICE, 64 * GiB, tmp_path)
    assert need == (20 * GiB if memory is None else parse_size(memory))
    assert _last_value(first, ("--kv-cache-memory-bytes",)) == str(kv)
    assert first == again
    assert _last_value(first, UTILIZATION_FLAGS) is None


def test_memory_set_beside_the_presets_own_share_admits_the_share(tmp_path: Path) -> None:
    """``memory: 20GiB`` with the preset's own ``--gpu-memory-utilization 0.5`` of 80 GiB.

    swapd's share gives way to the preset's, so vLLM takes 40 GiB; admitted for the 20
    that ``memory:`` said, the other 20 went to another model and the card ran out.
    """
    total = 80 * GiB
    preset = _preset(tmp_path, memory=20 * GiB, args=("--gpu-memory-utilization", "0.5"))
    argv, need = _launch(preset, GPU, total, tmp_path)
    assert _vllm_utilization(argv) == pytest.approx(0.5)
    assert need == 40 * GiB
    plain, need_plain = _launch(_preset(tmp_path, memory=20 * GiB), GPU, total, tmp_path)
    assert need_plain == 20 * GiB  # without a share of its own, memory: is its share
    assert _vllm_utilization(plain) == pytest.approx(0.25)


def test_memory_set_beside_the_presets_own_share_on_a_cpu_admits_the_share(
    tmp_path: Path,
) -> None:
    """``memory: 4GiB`` with the preset's own ``--gpu-memory-utilization 0.5`` on a CPU host.

    vLLM 0.32's CPU worker reserves that share of the node's memory (cpu_worker.py:72-95,
    231-238) and swapd passes no KV size beside it; admitted for the 4 GiB memory: said,
    the other 28 went to other models. An explicit KV size is read over the share there,
    so then memory: stands.
    """
    total = 64 * GiB
    args = ("--gpu-memory-utilization", "0.5")
    argv, need = _launch(_preset(tmp_path, memory=4 * GiB, args=args), HOST_DEVICE, total, tmp_path)
    assert need >= _vllm_cpu_reservation(argv, {}, total) == 32 * GiB
    sized = _preset(tmp_path, memory=4 * GiB, args=(*args, "--kv-cache-memory-bytes", "1G"))
    assert _launch(sized, HOST_DEVICE, total, tmp_path)[1] == 4 * GiB


@pytest.mark.parametrize(
    ("args", "level", "expected"),
    [
        # vllm/config/offload.py: cpu_offload_gb is GiB per GPU, a float; argparse keeps
        # the last. Level 2 discards the weights on the GPU, not those in host RAM.
        (["--cpu-offload-gb", "1", "--cpu-offload-gb=2.5"], 2, int(2.5 * GiB)),
        (["--cpu-offload-gb", "2", "-tp", "2"], 2, 4 * GiB),  # each worker pins its own
        (["--cpu-offload-gb", "64"], 2, 10 * GiB),  # no more than the weights there are
        ([], 2, 0),
        (["--cpu-offload-gb", "2"], 1, 10 * GiB),  # on the GPU or offloaded: all in RAM
        (["--data-parallel-size", "2"], 1, 20 * GiB),  # each replica backs up a copy
    ],
)
def test_a_gpu_sleepers_host_ram_counts_weights_cpu_offload_keeps_there(
    tmp_path: Path, args: list[str], level: int, expected: int
) -> None:
    """What a vLLM with 10 GiB of weights holds in host RAM asleep on a GPU."""
    preset = _preset(tmp_path, args=args)
    assert VLLM.asleep_bytes(preset, 10 * GiB, level) == expected


@pytest.mark.parametrize(
    ("load_format", "files"),
    [
        # vllm/model_executor/model_loader/default_loader.py _prepare_weights: the globs
        # each format reads at the folder's top, first match wins.
        ("auto", ["model.safetensors"]),
        ("hf", ["model.safetensors"]),
        ("safetensors", ["model.safetensors"]),
        ("pt", ["model.pt"]),
        ("npcache", ["pytorch_model.bin"]),
        ("dummy", ["model.safetensors"]),  # nothing read, the same weights allocated
    ],
)
def test_a_cpu_vllm_counts_the_weight_files_its_load_format_reads(
    tmp_path: Path, load_format: str, files: list[str]
) -> None:
    """A folder holding the weights as safetensors, .bin and .pt, each of another size."""
    preset = _preset(tmp_path, args=["--load-format", load_format])
    assert preset.model is not None
    sizes = {"model.safetensors": 8 << 20, "pytorch_model.bin": 4 << 20, "model.pt": 2 << 20}
    for name, size in sizes.items():
        (preset.model / name).write_bytes(b"\0" * size)
    weights = sum(sizes[name] for name in files)
    kv_and_runtime = VLLM_CPU_KV_DEFAULT + VLLM_CPU_RUNTIME
    assert VLLM.estimate(preset, HOST_DEVICE, 64 * GiB) == weights + kv_and_runtime


def test_a_gpu_starts_pinned_host_ram_is_its_offload_at_most_its_weights(tmp_path: Path) -> None:
    """vllm/model_executor/offloader/uva.py offloads parameters until the GiB are reached."""
    preset = _preset(tmp_path, args=["--cpu-offload-gb", "4", "-pp", "2"])
    assert VLLM.pinned_bytes(preset, 0) == 8 * GiB  # weights not read yet: the flag's word
    assert VLLM.pinned_bytes(preset, 20 * GiB) == 8 * GiB
    assert VLLM.pinned_bytes(preset, 6 * GiB) == 6 * GiB
    assert VLLM.pinned_bytes(_preset(tmp_path, args=[]), 6 * GiB) == 0


@pytest.mark.parametrize("size", ["²", "-2", "two", "0"])
def test_a_parallel_size_vllm_would_refuse_counts_as_one(tmp_path: Path, size: str) -> None:
    """``"²".isdigit()`` holds and ``int("²")`` raises: sizing raised where vLLM refuses."""
    preset = _preset(tmp_path, args=["--data-parallel-size", size, "--cpu-offload-gb", "1"])
    assert VLLM.gpus_needed(preset) == 1
    assert VLLM.asleep_bytes(preset, 3 * GiB, 1) == 3 * GiB
    assert VLLM.pinned_bytes(preset, 3 * GiB) == GiB
