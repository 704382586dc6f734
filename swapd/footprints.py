"""What each model really used after its last load, kept in ``state_dir`` for the next admission.

A footprint is only trusted for the same launch: it is keyed by a fingerprint
of backend, model file and arguments, so editing a preset re-learns it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from swapd.logs import get_logger
from swapd.presets import Preset
from swapd.weights import file_stamp, side_paths, weight_bytes


@dataclass(frozen=True)
class Footprint:
    """Bytes a model used on a kind of device, measured once it was ready."""

    bytes: int
    device_kind: str
    measured_at: float


_log = get_logger("swapd.footprints")


def fingerprint(preset: Preset) -> str:
    """A stable hash of everything that changes how much a launch uses."""
    model = preset.model
    # Every shard of a split GGUF, the weights of a vLLM folder: a changed one is another
    # launch. So is a changed draft or projector file, or an env that sizes the backend
    # (LLAMA_ARG_CTX_SIZE).
    size = weight_bytes(model) if model and model.exists() else 0
    sides = [f"{p}:{file_stamp(p)[0]}" for p in side_paths([*preset.args, *preset.cmd])]
    env = sorted(f"{k}={v}" for k, v in preset.env.items())
    parts = [preset.backend, str(model), str(size), *preset.args, *preset.cmd, *sides, *env]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _entry_problem(entry: object) -> str | None:
    """Why a footprints.json entry cannot be used, or None when it can."""
    if not isinstance(entry, dict):
        return f"not an object: {entry!r:.80}"
    nbytes, at = entry.get("bytes"), entry.get("measured_at")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        return f"bytes is not a whole number of 0 or more: {nbytes!r:.80}"
    if isinstance(at, bool) or not isinstance(at, int | float):
        return f"measured_at is not a time: {at!r:.80}"
    for key in ("fingerprint", "device_kind"):
        if not isinstance(entry.get(key), str):
            return f"{key} is not a string: {entry.get(key)!r:.80}"
    return None


class Footprints:
    """A small JSON file of footprints by model name."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "footprints.json"
        self._data: dict[str, dict[str, object]] = self._read()

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            _log.warning("footprints.drop", path=str(self.path), reason=f"unreadable: {exc}")
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:  # torn or hand-edited: every load is measured afresh
            _log.warning("footprints.drop", path=str(self.path), reason=f"not JSON: {exc}")
            return {}
        if not isinstance(data, dict):
            _log.warning("footprints.drop", path=str(self.path), reason="not a JSON object")
            return {}
        kept: dict[str, dict[str, object]] = {}
        for name, entry in data.items():
            # A hand-edited or foreign entry must never break loads, nor size one (a
            # negative size would admit anything beside it): drop it, say so.
            if (problem := _entry_problem(entry)) is None:
                kept[name] = entry
            else:
                _log.warning("footprints.drop", model=name, reason=problem)
        return kept

    def get(self, preset: Preset, device_kind: str) -> Footprint | None:
        """The footprint learned for this exact launch on this kind of device, if any."""
        entry = self._data.get(preset.name)
        if not entry or entry.get("fingerprint") != fingerprint(preset):
            return None
        if entry.get("device_kind") != device_kind:
            return None
        nbytes, at = entry.get("bytes"), entry.get("measured_at")
        if not isinstance(nbytes, int) or not isinstance(at, int | float):
            return None
        return Footprint(nbytes, device_kind, float(at))

    def put(self, preset: Preset, device_kind: str, nbytes: int) -> Footprint:
        """Remember a measurement and write the file atomically."""
        now = time.time()
        self._data[preset.name] = {
            "fingerprint": fingerprint(preset),
            "device_kind": device_kind,
            "bytes": nbytes,
            "measured_at": now,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._data, indent=1, sort_keys=True))
        tmp.replace(self.path)
        return Footprint(nbytes, device_kind, now)
