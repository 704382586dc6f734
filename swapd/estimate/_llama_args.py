"""The llama-server flags that change its memory use, parsed from an argv."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from swapd.estimate._cache_types import cache_type_block
from swapd.estimate._sizes import AUTO_SLOTS

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

FlashAttn = Literal["on", "off", "auto"]
ALL_BLOCKS = 1 << 30  # --cpu-moe: as many blocks as any model has
GpuLayers = int | Literal["all", "auto"] | None


@dataclass(frozen=True)
class LlamaArgs:
    """The llama-server flags that change its memory use; None where llama-server decides.

    ``n_parallel`` None (or negative) is llama-server's auto: ``AUTO_SLOTS`` slots sharing
    one cache. ``kv_unified`` None is llama-server's default: unified only for auto slots.
    """

    n_ctx: int | None = None
    n_gpu_layers: GpuLayers = None
    n_parallel: int | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: FlashAttn = "auto"
    n_ubatch: int = 512
    kv_unified: bool | None = None
    swa_full: bool = False
    # Blocks whose MoE experts stay in host RAM (--n-cpu-moe N; --cpu-moe: every block).
    n_cpu_moe: int = 0
    # A draft model for speculative decoding (-md) shares every setting above but these.
    draft_gpu_layers: GpuLayers = None
    # Older servers' -cd: each slot's own draft context, of this size.
    draft_n_ctx: int | None = None
    draft_cache_type_k: str = "f16"
    draft_cache_type_v: str = "f16"
    draft_n_cpu_moe: int = 0

    def for_draft(self) -> LlamaArgs:
        """The settings llama-server gives the draft model's context.

        It copies the target's (context, slots, flash attention, micro-batch) and takes
        the draft's own layers, cache types and MoE placement
        (``common_base_params_to_speculative``). Older servers took ``-cd N`` and made a
        draft context of N for each slot: counted as that many caches of N (their compute
        buffers once).
        """
        own = replace(
            self,
            n_gpu_layers=self.draft_gpu_layers,
            cache_type_k=self.draft_cache_type_k,
            cache_type_v=self.draft_cache_type_v,
            n_cpu_moe=self.draft_n_cpu_moe,
        )
        if self.draft_n_ctx is None:
            return own
        auto = self.n_parallel is None or self.n_parallel < 0
        slots = AUTO_SLOTS if auto else max(self.n_parallel or 1, 1)
        return replace(own, n_ctx=self.draft_n_ctx * slots, n_parallel=slots, kv_unified=slots == 1)


@dataclass(frozen=True)
class SideFiles:
    """Files a llama-server loads besides ``-m``: a vision projector and a draft model."""

    projector: str | None = None
    # The projector goes to the GPU unless --no-mmproj-offload keeps it in host RAM.
    projector_offload: bool = True
    draft: str | None = None


_FLAG_FIELDS = {
    "-c": "n_ctx",
    "--ctx-size": "n_ctx",
    "-ngl": "n_gpu_layers",
    "--n-gpu-layers": "n_gpu_layers",
    "--gpu-layers": "n_gpu_layers",
    "-np": "n_parallel",
    "--parallel": "n_parallel",
    "-ctk": "cache_type_k",
    "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v",
    "--cache-type-v": "cache_type_v",
    "-fa": "flash_attn",
    "--flash-attn": "flash_attn",
    "-ub": "n_ubatch",
    "--ubatch-size": "n_ubatch",
    "-ncmoe": "n_cpu_moe",
    "--n-cpu-moe": "n_cpu_moe",
    "-cd": "draft_n_ctx",
    "--ctx-size-draft": "draft_n_ctx",
    "-ngld": "draft_gpu_layers",
    "--gpu-layers-draft": "draft_gpu_layers",
    "--n-gpu-layers-draft": "draft_gpu_layers",
    "--spec-draft-ngl": "draft_gpu_layers",
    "-ctkd": "draft_cache_type_k",
    "--cache-type-k-draft": "draft_cache_type_k",
    "--spec-draft-type-k": "draft_cache_type_k",
    "-ctvd": "draft_cache_type_v",
    "--cache-type-v-draft": "draft_cache_type_v",
    "--spec-draft-type-v": "draft_cache_type_v",
    "-ncmoed": "draft_n_cpu_moe",
    "--n-cpu-moe-draft": "draft_n_cpu_moe",
    "--spec-draft-n-cpu-moe": "draft_n_cpu_moe",
    "--spec-draft-ncmoe": "draft_n_cpu_moe",
}

# Flags without a value, and what they set.
_SWITCHES: dict[str, tuple[str, bool | int]] = {
    "-kvu": ("kv_unified", True),
    "--kv-unified": ("kv_unified", True),
    "-no-kvu": ("kv_unified", False),
    "--no-kv-unified": ("kv_unified", False),
    "--swa-full": ("swa_full", True),
    "-cmoe": ("n_cpu_moe", ALL_BLOCKS),
    "--cpu-moe": ("n_cpu_moe", ALL_BLOCKS),
    "-cmoed": ("draft_n_cpu_moe", ALL_BLOCKS),
    "--cpu-moe-draft": ("draft_n_cpu_moe", ALL_BLOCKS),
    "--spec-draft-cpu-moe": ("draft_n_cpu_moe", ALL_BLOCKS),
}

_PROJECTOR_FLAGS = frozenset({"-mm", "--mmproj"})
_DRAFT_FLAGS = frozenset({"-md", "--model-draft", "--spec-draft-model"})

# llama.cpp's spellings of on, off and auto (common_arg_utils::is_truthy and friends).
_FLASH_ATTN_VALUES: dict[str, FlashAttn] = {
    "on": "on",
    "enabled": "on",
    "true": "on",
    "1": "on",
    "off": "off",
    "disabled": "off",
    "false": "off",
    "0": "off",
    "auto": "auto",
    "-1": "auto",
}


# llama-server's variables for the flags read here (common/arg.cpp ``set_env``). It reads
# them first, so a flag on the command line wins.
_ENV_FLAGS = {
    "LLAMA_ARG_CTX_SIZE": "-c",
    "LLAMA_ARG_N_GPU_LAYERS": "-ngl",
    "LLAMA_ARG_N_PARALLEL": "-np",
    "LLAMA_ARG_CACHE_TYPE_K": "-ctk",
    "LLAMA_ARG_CACHE_TYPE_V": "-ctv",
    "LLAMA_ARG_FLASH_ATTN": "-fa",
    "LLAMA_ARG_UBATCH": "-ub",
    "LLAMA_ARG_N_CPU_MOE": "-ncmoe",
    "LLAMA_ARG_N_GPU_LAYERS_DRAFT": "-ngld",
    "LLAMA_ARG_MMPROJ": "--mmproj",
}
# Variables of flags without a value: the flag for a true value, and for a false one.
_ENV_SWITCHES: dict[str, tuple[str, str | None]] = {
    "LLAMA_ARG_SWA_FULL": ("--swa-full", None),
    "LLAMA_ARG_CPU_MOE": ("-cmoe", None),
    "LLAMA_ARG_KV_UNIFIED": ("-kvu", "-no-kvu"),
    "LLAMA_ARG_MMPROJ_OFFLOAD": ("--mmproj-offload", "--no-mmproj-offload"),
}
_TRUE, _FALSE = {"on", "enabled", "true", "1"}, {"off", "disabled", "false", "0"}


def env_args(env: Mapping[str, str]) -> list[str]:
    """The flags that ``env``'s ``LLAMA_ARG_*`` variables stand for, to go before the argv.

    ``LLAMA_ARG_SWA_FULL=1`` is ``--swa-full``, ``LLAMA_ARG_UBATCH=2048`` is ``-ub 2048``.
    """
    found: list[str] = []
    for name, flag in _ENV_FLAGS.items():
        if name in env:
            found += [flag, env[name]]
    for name, (on, off) in _ENV_SWITCHES.items():
        value = env.get(name, "").lower()
        if value in _TRUE:
            found.append(on)
        elif value in _FALSE and off is not None:
            found.append(off)
    return found


def llama_spelling(arg: str) -> str:
    """A flag as llama-server reads it: ``_`` in a long flag is ``-`` (``--ctx_size``)."""
    if not arg.startswith("--"):
        return arg
    flag, eq, value = arg.partition("=")
    return flag.replace("_", "-") + eq + value


def _parse_int(flag: str, value: str) -> int:
    """Parse an integer flag value, naming the flag when it is not one."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{flag} needs an integer, got {value!r}") from None


def _parse_gpu_layers(flag: str, value: str) -> GpuLayers:
    """Parse ``-ngl``: a count, "all" or "auto"."""
    if value == "all":
        return "all"
    if value == "auto":
        return "auto"
    return _parse_int(flag, value)


def _parse_flash_attn(flag: str, value: str) -> FlashAttn:
    """Parse ``-fa``'s value into on, off or auto."""
    try:
        return _FLASH_ATTN_VALUES[value]
    except KeyError:
        raise ValueError(f"{flag} takes on, off or auto, got {value!r}") from None


def parse_llama_args(args: Sequence[str]) -> LlamaArgs:
    """Read the memory-relevant flags from a llama-server argv; the last one given wins.

    Both ``--flag value`` and ``--flag=value`` work, and ``--flag_name`` as ``--flag-name``
    (:func:`llama_spelling`). ``-fa`` alone means on (older servers
    took it without a value); ``-kvu``, ``-no-kvu`` and ``--swa-full`` take none. Other
    flags and positional arguments are ignored. A known flag with a missing or malformed
    value raises ValueError.
    """
    found: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = llama_spelling(args[i])
        i += 1
        if arg in _SWITCHES:
            name, setting = _SWITCHES[arg]
            found[name] = setting
            continue
        flag, eq, inline = arg.partition("=")
        field = _FLAG_FIELDS.get(flag) if flag.startswith("-") else None
        if field is None:
            continue
        if eq:
            value = inline
        elif field == "flash_attn" and (i == len(args) or args[i] not in _FLASH_ATTN_VALUES):
            value = "on"
        elif i < len(args):
            value = args[i]
            i += 1
        else:
            raise ValueError(f"{flag} needs a value")
        if field in {"n_gpu_layers", "draft_gpu_layers"}:
            found[field] = _parse_gpu_layers(flag, value)
        elif field == "flash_attn":
            found[field] = _parse_flash_attn(flag, value)
        elif "cache_type" in field:
            cache_type_block(value)
            found[field] = value
        else:
            found[field] = _parse_int(flag, value)
    return LlamaArgs(**found)


def side_files(args: Sequence[str]) -> SideFiles:
    """The projector and draft model files an argv names; the last one given wins.

    Never raises: a flag without its value names no file (llama-server will refuse it).
    ``--no-mmproj`` is not read: older servers drop a named projector for it, newer ones
    load it (there it stops only a download along with ``-hf``); counting it is the side
    that never runs a card out of memory, and the measure corrects it after a first load.
    """
    projector: str | None = None
    offload = True
    draft: str | None = None
    for i, arg in enumerate(args):
        flag, eq, inline = llama_spelling(arg).partition("=")
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
        if flag in _PROJECTOR_FLAGS:
            projector = value
        elif flag in _DRAFT_FLAGS:
            draft = value
        elif flag in {"--mmproj-offload", "--no-mmproj-offload"}:
            offload = flag == "--mmproj-offload"
    return SideFiles(projector, offload, draft)
