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
from collections.abc import Sequence
from typing import TYPE_CHECKING

from swapd.backends._kind import OwnKey, Placement, RamVia, Tier
from swapd.backends._launch import (
    BinaryNotFound,
    explicit_binary,
    flag_as_written,
    has_flag,
    search_path,
)
from swapd.upstream import UpstreamError

if TYPE_CHECKING:
    from swapd.presets import Preset
    from swapd.probe import Device
    from swapd.upstream import UpstreamPool

# vLLM on a CPU sizes its KV cache from VLLM_CPU_KVCACHE_SPACE; without a declared
# memory: swapd assumes this much host RAM for it.
VLLM_CPU_DEFAULT = 4 * 1024**3
# vLLM on a GPU takes --gpu-memory-utilization of the card (its default is 0.9).
VLLM_GPU_DEFAULT_FRACTION = 0.9
SLEEP_FLAG = "--enable-sleep-mode"
# How vLLM says it cannot run sleep mode ("Sleep mode is not supported on current
# platform.", "Sleep mode allocator is not available on platform ...").
_REFUSAL_WORDS = ("not support", "only supported", "not available")
# How long a sleep or wake call may take before swapd gives up on the backend.
_CALL_TIMEOUT = 120.0
_WAKE_POLL = 0.01


class SleepFailed(Exception):
    """The backend did not sleep or wake as asked; the message has its answer."""


async def _call(  # noqa: PLR0913, PLR0917 - where, what, and a JSON body
    pool: UpstreamPool, host: str, port: int, method: str, path: str, payload: bytes = b""
) -> bytes:
    headers = ((b"Content-Type", b"application/json"),) if payload else ()
    try:
        async with asyncio.timeout(_CALL_TIMEOUT):  # the answer's body too
            status, body = await pool.control(host, port, method, path, headers, payload)
    except (UpstreamError, TimeoutError) as exc:
        raise SleepFailed(f"{method} {path}: {exc or type(exc).__name__}") from exc
    if status != 200:
        raise SleepFailed(f"{method} {path}: HTTP {status}: {body[:200]!r}")
    return body


def _own_fraction(args: Sequence[str]) -> float | None:
    """The preset's ``--gpu-memory-utilization`` (any spelling vLLM reads), if valid."""
    for i, arg in enumerate(args):
        if flag_as_written([arg], "--gpu-memory-utilization", argparse=True) is None:
            continue
        value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
        try:
            fraction = float(value)
        except ValueError:
            return None
        return fraction if 0 < fraction <= 1 else None
    return None


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
        if not has_flag(args, "--served-model-name", argparse=True):
            args += ["--served-model-name", preset.name, *preset.aliases]
        fraction = placement.gpu_fraction
        if fraction is not None and not has_flag(args, "--gpu-memory-utilization", argparse=True):
            args += ["--gpu-memory-utilization", f"{fraction:.3f}"]
        wants_sleep = placement.sleep_level and placement.sleep_flag
        if wants_sleep and not has_flag(args, SLEEP_FLAG, argparse=True):
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
        return None

    def extra_env(self, preset: Preset, placement: Placement) -> dict[str, str]:
        """The development endpoints (/sleep, /wake_up, /is_sleeping) when sleep is wanted."""
        del preset
        return {"VLLM_SERVER_DEV_MODE": "1"} if placement.sleep_level else {}

    def estimate(self, preset: Preset, device: Device, total: int) -> int | None:
        """vLLM takes its share of a GPU, or ``VLLM_CPU_DEFAULT`` of host RAM.

        The share is the preset's own ``--gpu-memory-utilization`` where it sets one (it is
        kept in the command line), else vLLM's default.
        """
        if device.kind == "cpu":
            return VLLM_CPU_DEFAULT
        return int(total * (_own_fraction(preset.args) or VLLM_GPU_DEFAULT_FRACTION))

    async def sleep(self, pool: UpstreamPool, host: str, port: int, level: int) -> None:
        """POST ``/sleep?level=N``; vLLM answers once the weights have moved."""
        await _call(pool, host, port, "POST", f"/sleep?level={level}")

    async def wake(self, pool: UpstreamPool, host: str, port: int, level: int) -> None:
        """POST ``/wake_up``, then confirm with ``/is_sleeping`` until it says false.

        Level 2 discarded the weights: their memory comes back first, they are read
        again from the model (``reload_weights``), then the KV cache comes back.
        """
        if level == 2:
            await _call(pool, host, port, "POST", "/wake_up?tags=weights")
            rpc = json.dumps({"method": "reload_weights"}).encode()
            await _call(pool, host, port, "POST", "/collective_rpc", rpc)
            await _call(pool, host, port, "POST", "/wake_up?tags=kv_cache")
        else:
            await _call(pool, host, port, "POST", "/wake_up")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CALL_TIMEOUT
        while True:
            body = await _call(pool, host, port, "GET", "/is_sleeping")
            try:
                asleep = bool(json.loads(body).get("is_sleeping"))
            except (ValueError, AttributeError) as exc:
                raise SleepFailed(f"GET /is_sleeping: unreadable answer {body[:200]!r}") from exc
            if not asleep:
                return
            if loop.time() > deadline:
                raise SleepFailed(f"still asleep {_CALL_TIMEOUT:g}s after /wake_up")
            await asyncio.sleep(_WAKE_POLL)


VLLM = VllmKind()
