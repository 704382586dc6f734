"""Live reload: what changed between two configs, and what each change needs.

A model restarts only when its effective launch changed: the command line its
kind builds (model path, arguments, name and aliases where the kind passes
them), its environment, its binary, the model's files (size, mtime and inode of
the file, of every shard of a split GGUF, of every file in a folder),
its health path, and the settings that place it (``devices``, ``sleep``,
``stage``, ``sha256``). Everything else (``ttl``, ``aliases`` a kind does not
pass, ``pin``, limits, ``memory``, the request rewriting of ``use_model_name`` and
``filters``, what the model list shows) applies in place. Removed models stop once
their requests finish; new ones appear. Daemon keys that are bound at start
(the listen address, the edge's timers, logging) are reported as needing a
restart; the rest apply at once. :func:`diff` decides; the manager acts.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from swapd._copy import scan
from swapd.backends import BinaryNotFound, Placement, kind_of
from swapd.config import Config
from swapd.presets import Preset

# Daemon keys that only a restart of swapd applies.
AT_START = (
    "host",
    "port",
    "state_dir",
    "devices",
    "cache_dir",
    "cgroups",
    "log_level",
    "backend_log",
    "max_connections",
    "header_timeout",
    "keepalive_timeout",
    "shutdown_timeout",
)
_CONFIG_KEY = {"host": "listen", "port": "listen"}
_PLACING = ("devices", "sleep", "stage", "sha256", "health")
LaunchKey: TypeAlias = tuple[Any, ...]


@dataclass(frozen=True)
class ReloadPlan:
    """Each model's fate in a reload, and the daemon keys that wait for a restart."""

    added: tuple[Preset, ...] = ()
    removed: tuple[str, ...] = ()
    restarted: tuple[Preset, ...] = ()
    in_place: tuple[Preset, ...] = ()
    unchanged: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The body of ``POST /swapd/reload``."""
        return {
            "added": [p.name for p in self.added],
            "removed": list(self.removed),
            "restarted": [p.name for p in self.restarted],
            "in_place": [p.name for p in self.in_place],
            "unchanged": list(self.unchanged),
            "restart_needed": list(self.restart_needed),
        }


def launch_key(preset: Preset) -> LaunchKey:
    """Everything about a preset that shapes the process it runs as.

    Blocking: the binary is looked up on PATH (and llama-server's ``--help`` read once).
    """
    # memory: used at the next start, not a restart (vLLM sizes its KV cache from it).
    preset = dataclasses.replace(preset, memory=None)
    kind = kind_of(preset)
    try:
        binary = kind.binary(preset)
    except BinaryNotFound:
        binary = preset.binary or kind.name
    placement = Placement()
    argv = kind.argv(preset, binary, 0, placement)
    env = {**kind.extra_env(preset, placement), **preset.env}
    files = None
    if preset.model is not None:
        # Every shard of a split GGUF and every file of a folder, as the staging cache sees
        # them: a shard or a folder's file replaced is a changed model too.
        with contextlib.suppress(OSError):
            files = scan(preset.model).fingerprint
    placing = tuple(getattr(preset, key) for key in _PLACING)
    return (kind.name, tuple(argv), tuple(sorted(env.items())), files, placing)


def launch_keys(config: Config) -> dict[str, LaunchKey]:
    """Every preset's launch key now (blocking; see :func:`launch_key`)."""
    return {p.name: launch_key(p) for p in config.presets}


def diff(
    old: Config, new: Config, keys: Mapping[str, LaunchKey] | None = None
) -> tuple[ReloadPlan, dict[str, LaunchKey]]:
    """Compare two configs; and the new config's launch keys, to compare the next one with.

    ``keys`` are the old config's launch keys as they were when it was read, so that a
    model file replaced since then counts as a change. Blocking: run it in a thread.
    """
    keys = launch_keys(old) if keys is None else keys
    fresh = launch_keys(new)
    before = {p.name: p for p in old.presets}
    after = {p.name: p for p in new.presets}
    added = tuple(p for name, p in after.items() if name not in before)
    removed = tuple(name for name in before if name not in after)
    restarted, in_place, unchanged = [], [], []
    for name, preset in after.items():
        previous = before.get(name)
        if previous is None:
            continue
        if keys.get(name) != fresh[name]:
            restarted.append(preset)
        elif previous != preset:
            in_place.append(preset)
        else:
            unchanged.append(name)
    waiting = []
    for key in AT_START:
        if getattr(old, key) != getattr(new, key):
            name = _CONFIG_KEY.get(key, key)
            if name not in waiting:
                waiting.append(name)
    plan = ReloadPlan(
        added, removed, tuple(restarted), tuple(in_place), tuple(unchanged), tuple(waiting)
    )
    return plan, fresh


def keep_at_start(old: Config, new: Config) -> Config:
    """``new`` with the keys bound at start kept as they run now."""
    return dataclasses.replace(new, **{key: getattr(old, key) for key in AT_START})
