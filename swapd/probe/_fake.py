"""Test-only "GPUs" whose memory a JSON file describes, written by fake backends.

Format::

    {"devices": {"gpu0": {"total": <bytes>, "outside": <bytes>, "name": <str, optional>}},
     "processes": {"<pid>": {"device": "gpu0", "bytes": <int>, "released_at": <float|null>}}}

An entry counts while its pid is alive and ``released_at`` is null, or until
``released_at`` passes (memory a dying process frees only after a delay). Used
memory is ``outside`` plus the counted entries. The file is read again on
every read, so writers change what the probe sees at any time.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from swapd.errors import SwapdError
from swapd.probe._select import select_indices
from swapd.probe._tree import attribute, process_trees
from swapd.probe._types import Device, Reading

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Sequence
    from pathlib import Path

# No leading zeros: "gpu07" would not name the device "gpu7" reports.
_GPU = re.compile(r"gpu(0|[1-9][0-9]*)")
# A writer that does not replace the file atomically can be caught mid-write.
_PARSE_ATTEMPTS = 5
_PARSE_RETRY_DELAY = 0.01


@dataclass(frozen=True)
class _Pool:
    """One fake device as the file describes it."""

    total: int
    outside: int
    name: str | None


@dataclass(frozen=True)
class _Entry:
    """Memory one process holds on one fake device."""

    pid: int
    device: str
    nbytes: int
    released_at: float | None


def _index(key: str) -> int:
    """Return the index in a device key already checked to read "gpu<N>"."""
    return int(key.removeprefix("gpu"))


def _integer(value: object, what: str) -> int:
    """Return a non-negative integer from the file; the error names the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _parse(text: str) -> tuple[dict[str, _Pool], list[_Entry]]:
    """Return devices and process entries from the file's text; the error says what is wrong."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        raise TypeError('expected an object with a "devices" object')
    pools: dict[str, _Pool] = {}
    for key, spec in data["devices"].items():
        if not _GPU.fullmatch(key) or not isinstance(spec, dict):
            raise ValueError(f'device {key!r} must be named "gpu<N>" and be an object')
        name = spec.get("name")
        pools[key] = _Pool(
            total=_integer(spec.get("total"), f"devices.{key}.total"),
            outside=_integer(spec.get("outside", 0), f"devices.{key}.outside"),
            name=name if isinstance(name, str) else None,
        )
    processes = data.get("processes") or {}
    if not isinstance(processes, dict):
        raise TypeError('"processes" must be an object')
    entries: list[_Entry] = []
    for key, spec in processes.items():
        if not key.isdigit() or not isinstance(spec, dict):
            raise ValueError(f"process {key!r} must be a pid with an object")
        released_at = spec.get("released_at")
        if released_at is not None and not isinstance(released_at, int | float):
            raise ValueError(f"processes.{key}.released_at must be a number or null")
        entries.append(
            _Entry(
                pid=int(key),
                device=str(spec.get("device")),
                nbytes=_integer(spec.get("bytes"), f"processes.{key}.bytes"),
                released_at=None if released_at is None else float(released_at),
            )
        )
    return pools, entries


def _load(path: Path) -> tuple[dict[str, _Pool], list[_Entry]]:
    """Read and parse the file, retrying briefly over a half-written file."""
    for attempt in range(_PARSE_ATTEMPTS):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise SwapdError(f"fake probe file {path}: {error}") from error
        try:
            return _parse(text)
        except json.JSONDecodeError:
            if attempt + 1 == _PARSE_ATTEMPTS:
                raise SwapdError(f"fake probe file {path}: not valid JSON") from None
            time.sleep(_PARSE_RETRY_DELAY)
        except (TypeError, ValueError) as error:
            raise SwapdError(f"fake probe file {path}: {error}") from error
    raise AssertionError("unreachable")  # pragma: no cover


def _alive(pid: int) -> bool:
    """Tell whether the process runs; a zombie has exited, and drivers free memory at exit."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class FakeFileProbe:
    """Fake GPUs read from a JSON file; raises SwapdError when the file is missing or bad."""

    def __init__(
        self,
        path: Path,
        indices: Collection[int] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._clock = clock
        pools, _ = _load(path)
        found = sorted(_index(key) for key in pools)
        chosen = found if indices is None else [i for i in found if i in set(indices)]
        self.devices: Sequence[Device] = tuple(
            Device(
                id=f"gpu{index}",
                kind="fake",
                index=index,
                name=pools[f"gpu{index}"].name or f"fake GPU {index}",
                visible_env={"CUDA_VISIBLE_DEVICES": str(index)},
            )
            for index in chosen
        )

    def read(self, pids: Collection[int] = ()) -> list[Reading]:
        """Re-read the file and count each entry that still holds memory."""
        pools, entries = _load(self.path)
        now = self._clock()
        held = [
            entry
            for entry in entries
            if (entry.released_at is None and _alive(entry.pid))
            or (entry.released_at is not None and now < entry.released_at)
        ]
        trees = process_trees(pids)
        readings: list[Reading] = []
        for device in self.devices:
            pool = pools.get(device.id)
            if pool is None:
                raise SwapdError(f"fake probe file {self.path}: device {device.id} disappeared")
            usage: dict[int, int] = {}
            for entry in held:
                if entry.device == device.id:
                    usage[entry.pid] = usage.get(entry.pid, 0) + entry.nbytes
            used = pool.outside + sum(usage.values())
            readings.append(
                Reading(
                    device=device.id,
                    total=pool.total,
                    free=max(0, pool.total - used),
                    by_pid=attribute(usage, trees),
                    per_process_supported=True,
                    source="fake",
                )
            )
        return readings

    def close(self) -> None:
        """Hold nothing open, so release nothing."""


def open_fake(path: Path, wanted: Collection[int] | None, warnings: list[str]) -> FakeFileProbe:
    """Open the fake devices that were asked for; raises Unusable when none of them exist."""
    pools, _ = _load(path)
    available = {_index(key) for key in pools}
    return FakeFileProbe(
        path, select_indices(f"fake probe file {path}", available, wanted, warnings)
    )
