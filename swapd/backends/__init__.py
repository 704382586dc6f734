"""Backend kinds and how a preset becomes a launch.

One object per kind (:mod:`llama_server`, :mod:`vllm`, :mod:`command`) answers
every kind-specific question through the :class:`BackendKind` protocol; the
rest of swapd asks :func:`kind_of` and never compares kind names.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING

from swapd.backends._kind import (
    ALL_TIERS,
    BackendKind,
    OwnKey,
    Placement,
    RamVia,
    SleepUnsupported,
    Tier,
)
from swapd.backends._launch import (
    LOOPBACK,
    BinaryNotFound,
    Launch,
    child_env,
    flag_as_written,
    free_port,
    has_flag,
    search_path,
)
from swapd.backends.command import COMMAND
from swapd.backends.llama_server import LLAMA_SERVER, llama_server_flags
from swapd.backends.vllm import VLLM, SleepFailed
from swapd.probe import GPU_PICKS

if TYPE_CHECKING:
    from swapd.presets import Preset

KINDS: Mapping[str, BackendKind] = {kind.name: kind for kind in (LLAMA_SERVER, VLLM, COMMAND)}

__all__ = [
    "ALL_TIERS",
    "KINDS",
    "LOOPBACK",
    "BackendKind",
    "BinaryNotFound",
    "Launch",
    "OwnKey",
    "Placement",
    "RamVia",
    "SleepFailed",
    "SleepUnsupported",
    "Tier",
    "build_launch",
    "child_env",
    "find_binary",
    "flag_as_written",
    "free_port",
    "has_flag",
    "kind_of",
    "llama_server_flags",
    "missing_binary",
    "search_path",
]


def kind_of(preset: Preset) -> BackendKind:
    """The kind object of a preset's ``backend:``."""
    return KINDS[preset.backend]


def find_binary(preset: Preset) -> str:
    """The executable for a preset; raises :class:`BinaryNotFound` saying where it looked."""
    return kind_of(preset).binary(preset)


def missing_binary(preset: Preset) -> str | None:
    """Why the preset's executable cannot be found, or None when it can."""
    try:
        find_binary(preset)
    except BinaryNotFound as exc:
        return str(exc)
    return None


def build_launch(preset: Preset, port: int, placement: Placement | None = None) -> Launch:
    """Argv, environment and URLs for one start of ``preset`` on ``port``.

    Blocking (PATH lookups, and ``llama-server --help`` once per binary): run it in a thread.
    """
    placement = placement or Placement()
    kind = kind_of(preset)
    argv = kind.argv(preset, kind.binary(preset), port, placement)
    env = child_env(preset, {**placement.device_env, **kind.extra_env(preset, placement)})
    # The device's variables over the preset's env: a CUDA_VISIBLE_DEVICES of its own would
    # run the backend on a GPU where admission counts nothing of it. One set to nothing
    # hides every GPU (the backend runs on the CPU, as its preset asks): that one stays.
    if not any(preset.env.get(name) == "" for name in GPU_PICKS):
        env.update(placement.device_env)
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if kind.own_key is not None:
        # A new secret per start, set after the preset's env so that nothing overrides it.
        secret = secrets.token_urlsafe(32)
        env[kind.own_key.env] = secret
        headers = ((b"Authorization", f"Bearer {secret}".encode()),)
    return Launch(
        argv=tuple(argv),
        env=env,
        host=LOOPBACK,
        port=port,
        health_path=preset.health,
        headers=headers,
    )
