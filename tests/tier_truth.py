"""Compare what swapd reports of its tiers with what the system says, at quiet moments.

:class:`TierTruth` reads ``/swapd/status`` and ``/metrics`` of a test daemon and checks
them against ground truth:

- processes: a model on the device, or asleep (vLLM), has a live pid; a model in disk or
  store, or whose pages alone are in ram, has none; every process the daemon started is one
  of those pids or below one; a pid changes only with a ``backend.spawn`` of its model (an
  asleep vLLM wakes in the same process);
- locked pages: the model files swapd maps (``/proc/PID/maps``, by inode) are those of the
  models reported with ``pages``, and ``VmLck`` is what locking them takes (at most that
  where the lock limit cut a hold short);
- bytes: a model's ``memory.ram`` is 0 outside the ram tier, a held file counts once, and
  the ram tier's bytes are the models' sum, within its budget;
- the cache directory: what its entries hold on disk (apparent sizes, as ``du -b``) is the
  disk tier's bytes, within its budget, with no leftover of a copy or an eviction at rest;
  a staged model in ``disk`` or ``ram`` has a copy of its file as it is now, one in
  ``store`` has none;
- metrics: ``swapd_model_state`` says each model's state and tier as status does.

A look that finds a mismatch is taken again until ``timeout`` (swapd settles: an unlock
runs after a delay, a stop reaps its group); then every mismatch of the last look fails.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from daemon import Daemon

from swapd._copy import scan
from swapd.gguf_split import split_parts

PAGE = os.sysconf("SC_PAGE_SIZE")
# States a model rests in: nothing moves until a request, a timer or an operator acts.
QUIET_STATES = frozenset({"ready", "asleep", "stopped", "failed", "backoff"})

FileKey = tuple[int, int]  # (device, inode)
Model = Mapping[str, Any]  # a model's entry in /swapd/status


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _below(proc: psutil.Process, pids: set[int]) -> bool:
    """Whether ``proc`` is one of ``pids`` or a descendant of one."""
    try:
        chain = [proc, *proc.parents()]
    except psutil.Error:
        return False
    return any(p.pid in pids for p in chain)


def _absolute(path: Path) -> str:
    # The cache keys a copy by the name the preset gives, normalised, links not followed.
    return os.path.abspath(path)  # noqa: PTH100 - Path has no normalise-without-resolve


def vmlck(pid: int) -> int:
    """Bytes locked by ``pid`` (``VmLck``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def mapped_files(pid: int) -> dict[FileKey, str]:
    """(device, inode) of every file ``pid`` maps, with the path the kernel shows."""
    found: dict[FileKey, str] = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[4] == "0":  # a file has a path (six fields)
            continue
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        found[(os.makedev(major, minor), int(parts[4]))] = parts[5]
    return found


def file_keys(path: Path) -> dict[FileKey, int]:
    """(device, inode) -> size of a model's files: every shard, every file of a folder."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else split_parts(path)
    keys = {}
    for file in files:
        try:
            info = file.stat()
        except OSError:
            continue
        keys[(info.st_dev, info.st_ino)] = info.st_size
    return keys


def metric_states(text: str) -> dict[str, tuple[str, str]]:
    """Each model's (state, tier) in ``swapd_model_state``."""
    found = {}
    for line in text.splitlines():
        if line.startswith("swapd_model_state{") and line.endswith(" 1.0"):
            inside = line[line.index("{") + 1 : line.index("}")]
            labels = dict(item.split("=", 1) for item in inside.split(","))
            found[labels["model"].strip('"')] = (
                labels["state"].strip('"'),
                labels["tier"].strip('"'),
            )
    return found


@dataclass
class Cache:
    """What the cache directory holds, read from the disk."""

    entries: dict[str, dict[str, Any]]  # key -> manifest
    on_disk: dict[str, int]  # key -> bytes of its data files (apparent sizes)
    leftovers: list[str]

    @classmethod
    def read(cls, cache_dir: Path) -> Cache:
        """The directory's complete entries, their sizes on disk and any leftover."""
        cache = cls({}, {}, [])
        if not cache_dir.is_dir():
            return cache
        for child in sorted(cache_dir.iterdir()):
            if child.name == ".lock":
                continue
            manifest = child / "entry.json"
            if child.name.startswith(".") or not manifest.is_file():
                cache.leftovers.append(child.name)
                continue
            cache.entries[child.name] = json.loads(manifest.read_text())
            files = (p for p in (child / "data").rglob("*") if p.is_file())
            cache.on_disk[child.name] = sum(p.stat().st_size for p in files)
        return cache

    def copy_of(self, model: Path) -> str | None:
        """The key of a whole copy of ``model`` as it is now, or None."""
        try:
            fingerprint = scan(model).fingerprint
        except OSError:
            return None
        source = _absolute(model)
        return next(
            (
                key
                for key, m in self.entries.items()
                if m["source"] == source and m["fingerprint"] == fingerprint and self.on_disk[key]
            ),
            None,
        )


@dataclass
class TierTruth:
    """Checks one daemon's tiers against the system; remembers pids between looks."""

    daemon: Daemon
    cache_dir: Path | None = None
    pids: dict[str, tuple[int, int]] = field(default_factory=dict)  # model -> (pid, spawns)

    def check(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for a quiet moment where everything matches; fail with every mismatch."""
        deadline = time.monotonic() + timeout
        while True:
            status, problems = self.look()
            if not problems:
                self._remember(status)
                return status
            if time.monotonic() > deadline:
                raise AssertionError(
                    "swapd's tiers disagree with the system:\n- " + "\n- ".join(problems)
                )
            time.sleep(0.1)

    def look(self) -> tuple[dict[str, Any], list[str]]:
        """One look: the status, and every way it disagrees with the system."""
        _, status = self.daemon.get("/swapd/status")
        models = {m["name"]: m for m in status["models"]}
        moving = [
            f"{n} is not quiet: {m['state']}, {m['in_flight']} in flight, staging {m['staging']}"
            for n, m in models.items()
            if m["state"] not in QUIET_STATES or m["in_flight"] or m["staging"]
        ]
        if moving:
            return status, moving
        cache = None if self.cache_dir is None else Cache.read(self.cache_dir)
        problems = [
            *self._processes(models),
            *self._pages(models, cache),
            *self._ram_bytes(models, status["tiers"]["ram"], cache),
            *self._metrics(models),
        ]
        if cache is not None:
            problems += self._cache(models, status["tiers"]["disk"], cache)
        return status, problems

    # ------------------------------------------------------------------ processes

    def _spawns(self, name: str) -> int:
        return sum(1 for e in self.daemon.events("backend.spawn") if e["model"] == name)

    def _processes(self, models: Mapping[str, Model]) -> list[str]:
        problems = []
        for name, m in models.items():
            pid, tier = m["pid"], m["tier"]
            wants = tier == "device" or m["state"] == "asleep"
            if m["state"] == "asleep" and tier != "ram":
                problems.append(f"{name}: asleep in tier {tier}")
            if wants and (pid is None or not _alive(pid)):
                problems.append(f"{name}: tier {tier} ({m['state']}) with pid {pid} not alive")
            if not wants and pid is not None:
                problems.append(f"{name}: tier {tier} ({m['state']}) yet pid {pid}")
            before = self.pids.get(name)
            moved = pid is not None and before is not None and before[0] != pid
            if moved and before is not None and self._spawns(name) == before[1]:
                problems.append(f"{name}: pid {before[0]} became {pid} with no spawn")
        listed = {m["pid"] for m in models.values() if m["pid"] is not None}
        stray = [p.pid for p in self.daemon.leftovers() if not _below(p, listed)]
        if stray:
            problems.append(f"processes of the daemon that no model reports: {stray}")
        return problems

    def _remember(self, status: Mapping[str, Any]) -> None:
        for m in status["models"]:
            if m["pid"] is not None:
                self.pids[m["name"]] = (m["pid"], self._spawns(m["name"]))

    # ------------------------------------------------------------------ locked pages

    def _model_file(self, name: str) -> Path | None:
        model = self.daemon.presets[name].get("model")
        return Path(model) if model else None

    def _candidates(self) -> set[FileKey]:
        """Every file a model of the daemon could hold: the presets' and the cache's."""
        keys: set[FileKey] = set()
        for name in self.daemon.presets:
            model = self._model_file(name)
            if model is not None and model.exists():
                keys |= set(file_keys(model))
        if self.cache_dir is not None and self.cache_dir.is_dir():
            for entry in self.cache_dir.iterdir():
                if (entry / "data").is_dir():
                    keys |= set(file_keys(entry / "data"))
        return keys

    def _held_files(self, name: str, cache: Cache | None) -> dict[FileKey, int]:
        """The files a model whose pages are held holds: its staged copy, else its file."""
        model = self._model_file(name)
        if model is None:
            return {}
        if self.daemon.presets[name].get("stage") and cache is not None:
            source = _absolute(model)
            for key, manifest in cache.entries.items():
                if manifest["source"] == source and self.cache_dir is not None:
                    return file_keys(self.cache_dir / key / "data")
        return file_keys(model) if model.exists() else {}

    def _pages(self, models: Mapping[str, Model], cache: Cache | None) -> list[str]:
        pid = self.daemon.proc.pid if self.daemon.proc else 0
        candidates = self._candidates()
        held = {
            key: path
            for key, path in mapped_files(pid).items()
            if key in candidates or path.endswith("(deleted)")
        }
        problems, expected, locked, partly = self._reported_holds(models, cache)
        if missing := sorted(str(k) for k in expected if k not in held):
            problems.append(f"models report held pages of files swapd does not map: {missing}")
        if extra := sorted(path for k, path in held.items() if k not in expected):
            problems.append(f"swapd maps model files that no model reports held: {extra}")
        actual = vmlck(pid)
        if actual > locked or (actual != locked and not partly):
            problems.append(f"VmLck is {actual} bytes, the held files take {locked}")
        return problems

    def _reported_holds(
        self, models: Mapping[str, Model], cache: Cache | None
    ) -> tuple[list[str], set[FileKey], int, bool]:
        """What status says is held: problems, the files, bytes to lock, whether cut short."""
        problems = []
        expected: set[FileKey] = set()
        locked = 0
        partly = False
        for name, m in models.items():
            if m["pages"] is None:
                if m["tier"] == "ram" and m["state"] != "asleep":
                    problems.append(f"{name}: tier ram, neither asleep nor holding pages")
                continue
            if m["tier"] != "ram":
                problems.append(f"{name}: pages held in tier {m['tier']}")
            files = self._held_files(name, cache)
            if not files:
                problems.append(f"{name}: pages held of a file that is gone")
            for key, size in files.items():
                if key not in expected:
                    locked += _pages(size)
                    partly |= not m["pages"]["locked"]  # the lock limit cut it short
                expected.add(key)
        return problems, expected, locked, partly

    # ------------------------------------------------------------------ bytes

    def _ram_bytes(
        self, models: Mapping[str, Model], ram: Mapping[str, Any], cache: Cache | None
    ) -> list[str]:
        problems = []
        total = sum(m["memory"]["ram"] or 0 for m in models.values())
        if ram["bytes"] != total:
            problems.append(f"the ram tier says {ram['bytes']} bytes, its models {total}")
        if ram["bytes"] > ram["budget"]:
            problems.append(f"the ram tier holds {ram['bytes']}, over its budget {ram['budget']}")
        for name, m in models.items():
            if m["tier"] != "ram" and m["memory"]["ram"]:
                problems.append(f"{name}: tier {m['tier']} yet {m['memory']['ram']} bytes in ram")
        # Held files count once, with one of the models that hold them.
        holders: dict[frozenset[FileKey], list[str]] = {}
        sizes: dict[frozenset[FileKey], int] = {}
        for name, m in models.items():
            if m["pages"] is not None:
                files = self._held_files(name, cache)
                holders.setdefault(frozenset(files), []).append(name)
                sizes[frozenset(files)] = sum(files.values())
        for held, names in holders.items():
            counted = sum(models[n]["memory"]["ram"] or 0 for n in names)
            if counted != sizes[held]:
                problems.append(f"{names}: held files of {sizes[held]} bytes counted {counted}")
        return problems

    # ------------------------------------------------------------------ the cache

    def _cache(
        self, models: Mapping[str, Model], disk: Mapping[str, Any], cache: Cache
    ) -> list[str]:
        problems = []
        if cache.leftovers:
            problems.append(f"the cache holds leftovers at rest: {cache.leftovers}")
        held = sum(cache.on_disk.values())
        if disk["bytes"] != held:
            problems.append(f"the disk tier says {disk['bytes']} bytes, the cache holds {held}")
        if disk["bytes"] > disk["budget"]:
            problems.append(f"the cache holds {disk['bytes']}, over its budget {disk['budget']}")
        for key, manifest in cache.entries.items():
            # An entry whose data was deleted by hand holds nothing: swapd no longer counts it.
            if cache.on_disk[key] and manifest["size"] != cache.on_disk[key]:
                problems.append(
                    f"entry {key}: {manifest['size']} bytes, {cache.on_disk[key]} there"
                )
        for name, m in models.items():
            model = self._model_file(name)
            if model is None or not self.daemon.presets[name].get("stage"):
                continue
            copy = cache.copy_of(model)
            if m["tier"] == "store" and copy is not None:
                problems.append(f"{name}: tier store, yet the cache holds a copy ({copy})")
            if m["tier"] in ("disk", "ram") and copy is None:
                problems.append(f"{name}: tier {m['tier']}, yet the cache holds no copy")
        return problems

    # ------------------------------------------------------------------ metrics

    def _metrics(self, models: Mapping[str, Model]) -> list[str]:
        with urllib.request.urlopen(self.daemon.url + "/metrics", timeout=30) as resp:  # noqa: S310 - loopback
            states = metric_states(resp.read().decode())
        reported = {n: (m["state"], m["tier"]) for n, m in models.items()}
        return [] if states == reported else [f"metrics say {states}, status {reported}"]
