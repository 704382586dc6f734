"""vLLM (``vllm serve``): argv sized to the memory swapd grants, and its sleep mode.

Sleep level 1 moves the weights to pinned host RAM and drops the KV cache; level 2
drops the weights too. The process stays alive, so a wake takes well under a second
where a restart takes tens. The endpoints exist only with ``VLLM_SERVER_DEV_MODE=1``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from swapd.backends._kind import OwnKey, Placement, RamVia, Tier
from swapd.backends._launch import (
    BinaryNotFound,
    child_env,
    explicit_binary,
    flag_as_written,
    flag_value,
    has_flag,
    search_path,
)
from swapd.upstream import UpstreamError
from swapd.weights import weight_bytes

if TYPE_CHECKING:
    from pathlib import Path

    from swapd.presets import Preset
    from swapd.probe import Device
    from swapd.upstream import UpstreamPool

# vLLM takes --gpu-memory-utilization of the card, or on a CPU of host RAM (its default
# is 0.92; swapd passes the share it grants, 0.9 unless the preset says otherwise).
VLLM_GPU_DEFAULT_FRACTION = 0.9
# A CPU vLLM takes its KV cache, its weights and its runtime. Left to itself it takes
# 0.92 of its NUMA node's memory (--gpu-memory-utilization is of host RAM there), which
# is no share of what swapd counts (a cgroup's limit, the whole host): so where the preset
# sizes neither, swapd gives it a KV cache of its own, 3 GiB (with the runtime the 4 GiB
# VLLM_CPU_KVCACHE_SPACE used to default to), or what ``memory:`` leaves for one.
VLLM_CPU_RUNTIME = 1024**3
VLLM_CPU_KV_DEFAULT = 3 * 1024**3
VLLM_CPU_KV_MIN = 256 * 1024**2
# Both spellings set one share (vLLM's --device-memory-utilization is the other's alias).
UTILIZATION_FLAGS = ("--gpu-memory-utilization", "--device-memory-utilization")
KV_CACHE_FLAG = "--kv-cache-memory-bytes"
PARALLEL_FLAGS = (
    ("--tensor-parallel-size", "-tp"),
    ("--pipeline-parallel-size", "-pp"),
    ("--data-parallel-size", "-dp"),
)
SLEEP_FLAG = "--enable-sleep-mode"
# GiB (a float) of each worker's weights kept in pinned host RAM, read by the GPU on the
# fly: per GPU (vllm/config/offload.py UVAOffloadConfig.cpu_offload_gb; each worker's
# UVAOffloader pins its own, model_executor/offloader/uva.py).
CPU_OFFLOAD_FLAG = "--cpu-offload-gb"
# How vLLM says it cannot run sleep mode ("Sleep mode is not supported on current
# platform.", "Sleep mode allocator is not available on platform ...").
_REFUSAL_WORDS = ("not support", "only supported", "not available")
# How long a sleep call may take before swapd gives up on the backend. A wake's calls
# have no bound of their own: the wake is a load, bounded as a whole by start_timeout, and
# a level-2 wake's reload_weights reads the whole model again, as long as a start's load.
_CALL_TIMEOUT = 120.0
_WAKE_POLL = 0.01


class SleepFailed(Exception):
    """The backend did not sleep or wake as asked; the message has its answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of a refusing answer, if one came

    @property
    def api_missing(self) -> bool:
        """The sleep API is not there (404, 405: no ``VLLM_SERVER_DEV_MODE``, a build without it).

        Not a passing fault: every later sleep (or level-2 wake, whose ``/collective_rpc``
        a build may lack) of the same launch would fail the same way.
        """
        return self.status in (404, 405)


async def _call(  # noqa: PLR0913, PLR0917 - where, what, a JSON body, whether capped
    pool: UpstreamPool,
    host: str,
    port: int,
    method: str,
    path: str,
    payload: bytes = b"",
    *,
    capped: bool = True,
) -> bytes:
    """One sleep-API call, within :data:`_CALL_TIMEOUT` unless the caller bounds it."""
    headers = ((b"Content-Type", b"application/json"),) if payload else ()
    try:
        async with asyncio.timeout(_CALL_TIMEOUT if capped else None):  # the body too
            status, body = await pool.control(host, port, method, path, headers, payload)
    except TimeoutError as exc:  # its text is empty: say what it was
        raise SleepFailed(f"{method} {path}: no answer within {_CALL_TIMEOUT:g}s") from exc
    except UpstreamError as exc:
        raise SleepFailed(f"{method} {path}: {exc}") from exc
    if status != 200:
        raise SleepFailed(f"{method} {path}: HTTP {status}: {body[:200]!r}", status)
    return body


def _own_fraction(args: Sequence[str]) -> float | None:
    """The preset's ``--gpu-memory-utilization`` (any spelling vLLM reads), if valid."""
    value = flag_value(args, *UTILIZATION_FLAGS, argparse=True)
    if value is None:
        return None
    try:
        fraction = float(value)
    except ValueError:
        return None
    return fraction if 0 < fraction <= 1 else None


SERVED_NAME_FLAG = "--served-model-name"


class VllmKind:
    """``backend: vllm``."""

    name = "vllm"
    tiers: frozenset[Tier] = frozenset({"device", "ram", "disk", "store"})
    ram_via: RamVia | None = "sleep"
    needs_model = True
    sizes_to_card = True
    stop_signal = signal.SIGTERM
    # A key of its own per start (VLLM_API_KEY), sent on forwarded requests, readiness
    # polls and liveness probes. vLLM guards /v1/* with it; /health and the sleep API stay
    # open to swapd's calls.
    own_key: OwnKey | None = OwnKey("VLLM_API_KEY", ("--api-key",), argparse=True)
    # vLLM moves a --model ahead of the positional one swapd passes, then refuses that.
    model_flags: tuple[str, ...] = ("--model",)
    health_says_loaded = True
    served_name_flag: str | None = SERVED_NAME_FLAG  # it answers 404 to other names
    # Its development routes (on for sleep) that empty the caches every client shares, or
    # show the server's configuration and environment. Other engines serve these names as
    # routes of their own (SGLang's /server_info).
    reserved_routes: frozenset[str] = frozenset(
        {"/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache", "/server_info"}
    )
    unused_keys: Mapping[str, str] = MappingProxyType(
        {"cmd": "only a command backend runs cmd; vLLM's own options go in args"}
    )

    def binary(self, preset: Preset) -> str:
        """``binary:``, then ``vllm`` on PATH."""
        if found := explicit_binary(preset):
            return found
        if found := shutil.which("vllm"):
            return found
        raise BinaryNotFound(
            f"vllm not found (searched PATH={search_path()}); set binary: in {preset.file}"
        )

    def argv(self, preset: Preset, binary: str, port: int, placement: Placement) -> list[str]:
        """``serve MODEL ARGS``, the served names, the GPU share and, if asked, sleep mode."""
        args = list(preset.args)
        if not has_flag(args, SERVED_NAME_FLAG, argparse=True):
            args += [SERVED_NAME_FLAG, preset.name, *preset.aliases]
        fraction = placement.gpu_fraction
        if fraction is not None and not has_flag(args, *UTILIZATION_FLAGS, argparse=True):
            # Rounded down, never to 0 (vLLM refuses it): no more than the grant.
            args += ["--gpu-memory-utilization", f"{max(0.001, int(fraction * 1000) / 1000):.3f}"]
        if not placement.on_gpu and _cpu_sized_by_swapd(preset):
            args += [KV_CACHE_FLAG, str(_cpu_kv_cache_given(preset))]
        wants_sleep = placement.sleep_level and placement.sleep_flag
        if not placement.sleep_flag:
            # The start without it, after a refusal: the preset's own copy goes too.
            args = [a for a in args if flag_as_written([a], SLEEP_FLAG, argparse=True) is None]
        elif wants_sleep and not has_flag(args, SLEEP_FLAG, argparse=True):
            args.append(SLEEP_FLAG)
        model = placement.model_path or str(preset.model)
        return [binary, "serve", model, *args, "--host", "127.0.0.1", "--port", str(port)]

    def refused_sleep(self, output: list[str]) -> str | None:
        """The line where the backend refused ``--enable-sleep-mode``, if it did.

        A refusal, not any mention: vLLM's CUDA build logs "Enabling cumem allocator
        because sleep mode requires it." on every start with the flag, so a start that
        then fails for another reason is no refusal. A build without the flag refuses
        it through argparse ("unrecognized arguments: --enable-sleep-mode").
        """
        for line in output:
            low = line.lower()
            if "unrecognized arguments" in low and SLEEP_FLAG in low:
                return line
            if "sleep mode" in low and any(w in low for w in _REFUSAL_WORDS):
                return line
            # The allocator sleep mode needs, missing from a build: the flag caused it.
            if "cumem allocator is not supported" in low:
                return line
        return None

    def extra_env(self, preset: Preset, placement: Placement) -> dict[str, str]:
        """The development endpoints (/sleep, /wake_up, /is_sleeping) when sleep is wanted."""
        del preset
        return {"VLLM_SERVER_DEV_MODE": "1"} if placement.sleep_level else {}

    def estimate(self, preset: Preset, device: Device, total: int) -> int | None:
        """vLLM takes its share of the device: a GPU, or on a CPU host RAM.

        The share is the preset's own ``--gpu-memory-utilization`` where it sets one (it is
        kept in the command line), else 0.9 of a GPU. On a CPU: the KV cache (as the preset
        sizes it, ``VLLM_CPU_KVCACHE_SPACE`` in GiB over ``--kv-cache-memory-bytes``, else
        ``VLLM_CPU_KV_DEFAULT``), the weights and the runtime.
        """
        own = _own_fraction(preset.args)
        if device.kind == "cpu" and (kv := _cpu_kv_cache_bytes(preset)) is not None:
            return kv + _weights(preset) + VLLM_CPU_RUNTIME
        if device.kind == "cpu" and own is None:
            return VLLM_CPU_KV_DEFAULT + _weights(preset) + VLLM_CPU_RUNTIME
        return int(total * (own or VLLM_GPU_DEFAULT_FRACTION))

    def weight_bytes(self, preset: Preset, model: Path) -> int:
        """The weight files vLLM loads from ``model`` for the preset's ``--load-format``."""
        return weight_bytes(model, load_format(preset.args))

    def gpus_needed(self, preset: Preset) -> int:
        """Tensor by pipeline by data parallel size: one process per GPU, each a whole share."""
        needed = 1
        for flags in PARALLEL_FLAGS:
            needed *= _parallel_size(preset.args, flags)
        return needed

    def own_share(self, preset: Preset, device: Device) -> float | None:
        """The preset's own ``--gpu-memory-utilization``, which swapd's share gives way to.

        On a CPU it is a share of host RAM, unless the preset sizes the KV cache itself:
        vLLM then reads no share.
        """
        if device.kind == "cpu" and _cpu_kv_cache_bytes(preset) is not None:
            return None
        return _own_fraction(preset.args)

    def asleep_bytes(self, preset: Preset, weights: int, level: int) -> int:
        """Host RAM the process holds asleep on a GPU: its weights at level 1, its offload at 2.

        Level 1 copies each worker's weights on the GPU to pinned host RAM, next to what
        ``--cpu-offload-gb`` keeps there: all of them, once per data-parallel replica (each
        holds a whole copy). Level 2 discards what is on the GPU, not what is offloaded
        (CuMemBackend.suspend, vllm/device_allocator/sleep_mode_backend.py: the tags
        offloaded are "runtime" and "cudagraph", and "weights" at level 1 only; offloaded
        weights are CPU tensors outside that pool).
        """
        if level == 1:
            return weights * _parallel_size(preset.args, PARALLEL_FLAGS[2])
        return self.pinned_bytes(preset, weights)

    def pinned_bytes(self, preset: Preset, weights: int) -> int:
        """What ``--cpu-offload-gb`` pins: its GiB on each GPU, at most the weights there are.

        ``weights`` 0 (not read yet): the flag's whole amount.
        """
        offloaded = _offload_bytes(preset.args) * self.gpus_needed(preset)
        whole = weights * _parallel_size(preset.args, PARALLEL_FLAGS[2])
        return min(offloaded, whole) if whole else offloaded

    async def sleep(self, pool: UpstreamPool, host: str, port: int, level: int) -> None:
        """POST ``/sleep?level=N``; vLLM answers once the weights have moved."""
        await _call(pool, host, port, "POST", f"/sleep?level={level}")

    async def wake(self, pool: UpstreamPool, host: str, port: int, level: int) -> None:
        """POST ``/wake_up``, then confirm with ``/is_sleeping`` until it says false.

        Level 2 discarded the weights: their memory comes back first, they are read
        again from the model (``reload_weights``), then the KV cache comes back. The
        caller bounds the whole wake (a preset's ``start_timeout``).
        """
        if level == 2:
            await _call(pool, host, port, "POST", "/wake_up?tags=weights", capped=False)
            rpc = json.dumps({"method": "reload_weights"}).encode()
            await _call(pool, host, port, "POST", "/collective_rpc", rpc, capped=False)
            await _call(pool, host, port, "POST", "/wake_up?tags=kv_cache", capped=False)
        else:
            await _call(pool, host, port, "POST", "/wake_up", capped=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CALL_TIMEOUT
        while True:
            body = await _call(pool, host, port, "GET", "/is_sleeping", capped=False)
            try:
                asleep = bool(json.loads(body).get("is_sleeping"))
            except (ValueError, AttributeError) as exc:
                raise SleepFailed(f"GET /is_sleeping: unreadable answer {body[:200]!r}") from exc
            if not asleep:
                return
            if loop.time() > deadline:
                raise SleepFailed(f"still asleep {_CALL_TIMEOUT:g}s after /wake_up")
            await asyncio.sleep(_WAKE_POLL)


def _parallel_size(args: Sequence[str], flags: tuple[str, str]) -> int:
    """One of vLLM's parallel sizes as the preset sets it; 1 where it does not."""
    value = flag_value(args, *flags, argparse=True)
    # ASCII digits only: "²".isdigit() holds, and int() refuses it (vLLM would too).
    ok = value is not None and value.isascii() and value.isdigit() and int(value) > 0
    return int(value) if ok and value is not None else 1


def _offload_bytes(args: Sequence[str]) -> int:
    """Bytes of weights ``--cpu-offload-gb`` keeps in host RAM per GPU; 0 without it."""
    value = flag_value(args, CPU_OFFLOAD_FLAG, argparse=True)
    try:
        gib = float(value) if value is not None else 0.0
    except ValueError:
        return 0  # vLLM refuses it: the start fails
    return int(gib * 1024**3) if 0 < gib < float("inf") else 0


def _cpu_kv_cache_bytes(preset: Preset) -> int | None:
    """The CPU KV cache a preset sizes itself, as vLLM reads it; None where it does not.

    The variable as the child gets it: swapd's own environment (a unit's
    ``Environment=``) passes on to every vLLM, the preset's ``env`` over it.
    """
    space = child_env(preset, {}).get("VLLM_CPU_KVCACHE_SPACE", "")
    if space.strip().isascii() and space.strip().isdigit() and int(space) > 0:
        return int(space) * 1024**3  # vLLM's platforms/cpu.py: GiB, over the flag
    value = flag_value(preset.args, KV_CACHE_FLAG, argparse=True)
    return None if value is None else _human_bytes(value)


def _human_bytes(value: str) -> int | None:
    """vLLM's sizes (its ``human_readable_int``): ``40G``, ``512M`` binary, ``40g`` decimal."""
    scales = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    scales |= {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = value.strip()
    scale = scales.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in scales else text
    try:
        return int(float(number) * scale)
    except ValueError:
        return None


def _weights(preset: Preset) -> int:
    """The weights vLLM loads from the preset's model; 0 where they cannot be read."""
    try:
        return weight_bytes(preset.model, load_format(preset.args)) if preset.model else 0
    except OSError:
        return 0


def load_format(args: Sequence[str]) -> str:
    """The ``--load-format`` vLLM reads from ``args`` (the last given), "auto" without one."""
    return flag_value(args, "--load-format", argparse=True) or "auto"


def _cpu_sized_by_swapd(preset: Preset) -> bool:
    """Whether a CPU start gets swapd's KV size: the preset sizes neither cache nor share."""
    return _cpu_kv_cache_bytes(preset) is None and _own_fraction(preset.args) is None


def _cpu_kv_cache_given(preset: Preset) -> int:
    """The KV cache swapd gives a CPU vLLM: what ``memory:`` leaves, else the default.

    From the preset, never from a measure, so a footprint that counts the front-end
    process too does not grow the cache at each start.
    """
    if preset.memory is None:
        return VLLM_CPU_KV_DEFAULT
    return max(VLLM_CPU_KV_MIN, preset.memory - _weights(preset) - VLLM_CPU_RUNTIME)


VLLM = VllmKind()
