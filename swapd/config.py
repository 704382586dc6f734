"""The daemon config file: where to listen, where presets live, memory and queue limits."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from swapd._yaml import Document, load_document, nested_entries
from swapd.auth import parse_allowed_hosts, parse_origins
from swapd.errors import ConfigError, ConfigErrors, Location, clip
from swapd.keys import parse_keys, read_keys_file
from swapd.logs import BACKEND_LOG_MODES
from swapd.presets import (
    CONVERTERS,
    INVALID,
    Preset,
    convert_entries,
    home_expanded,
    preset_files,
    read_presets,
)
from swapd.probe import DevicesSpec
from swapd.units import parse_duration, parse_positive_duration, parse_size

DEFAULT_LISTEN = ("127.0.0.1", 8080)
# The fastest ``watch_config`` (see :func:`_watch_every`).
WATCH_MIN_S = 0.1

# Each file's size, mtime and inode (-1s where it could not be read), by path.
Stamps = Mapping[str, tuple[int, int, int]]


def default_state_dir() -> Path:
    """Systemd's ``StateDirectory=`` when set, else ``~/.local/state/swapd``."""
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "swapd"


@dataclass(frozen=True)
class Config:
    """The daemon's settings and its presets, validated."""

    source: str
    host: str = DEFAULT_LISTEN[0]
    port: int = DEFAULT_LISTEN[1]
    presets_dir: Path = Path("presets")
    state_dir: Path = field(default_factory=default_state_dir)
    max_running: int | None = None
    max_body: int = 64 * 1024**2
    devices: DevicesSpec = "auto"
    reserve: int = 512 * 1024**2
    budget: int | None = None
    queue_timeout: float = 120.0
    release_timeout: float = 10.0
    log_level: str = "info"
    # The level of backend output lines on their own (see swapd.logs): info, debug or off.
    backend_log: str = "info"
    # Access control (see swapd.auth): keys, with those of the key files merged in, Host names
    # beyond swapd's own, web origins that may call it, and whether /metrics needs a key.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: Path | None = None
    admin_keys_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    metrics_public: bool = False
    # The edge (see swapd.limits): open client connections and how long a request's headers,
    # its body, and an idle keep-alive connection may take.
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 120.0
    keepalive_timeout: float = 75.0
    # How long a client may take no bytes of a relayed answer before it is cut (nginx's
    # send_timeout): one that stops reading would hold its model's lease for good.
    send_timeout: float = 60.0
    # The ram tier's cap; None: half of host RAM; 0 turns the tier off.
    ram_budget: int | None = None
    # NVMe staging: where copies live and how many bytes they may take (None: no cap but
    # the disk's free space).
    cache_dir: Path | None = None
    cache_budget: int | None = None
    # Supervision: how long a request waits for busy models before they are drained for
    # it, what an unmeasured model with no estimate is assumed to need, the drain at stop.
    max_wait: float = 30.0
    # Holds (see swapd.policy.hold): the longest a load waits rather than evict models in
    # more demand than it (0: never), and the loader's busy share from which it does.
    hold_max: float = 30.0
    hold_busy: float = 0.4
    default_memory: int = 1024**3
    shutdown_timeout: float = 30.0
    # How often the config, preset and key files are checked for a change that reloads
    # them (see swapd.watch); 0: never, only SIGHUP and the reload route do.
    watch_config: float = 0.0
    # A cgroup per backend where swapd may make one (see swapd.cgroups); false: never.
    cgroups: bool = True
    presets: tuple[Preset, ...] = ()
    # The config, preset and key files as they were just before this config read them:
    # a change since, even one made while they were read, differs (see swapd.watch).
    stamps: Stamps = field(default_factory=dict, compare=False, repr=False)
    # The config file set no key at all: as a reload reads a file caught half written.
    empty: bool = field(default=False, compare=False)

    def preset(self, name: str) -> Preset | None:
        """The preset a name or alias refers to.

        Asked on every request: a lookup in an index built once per config, never a walk
        of hundreds of presets.
        """
        return self._by_name.get(name)

    @cached_property
    def _by_name(self) -> dict[str, Preset]:
        """Each name and alias to its preset: the first in file order, as a walk finds it."""
        found: dict[str, Preset] = {}
        for preset in self.presets:
            for name in (preset.name, *preset.aliases):
                found.setdefault(name, preset)
        return found

    @cached_property
    def deepest_name(self) -> int:
        """The most ``/``-separated segments in a name or alias (1 with none)."""
        return max((name.count("/") + 1 for name in self._by_name), default=1)


def parse_listen(value: Any) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[::1]:port``; the host is "" for every address."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    # An IPv6 address goes in brackets: "::1" alone would read as host ":" and port 1.
    if (
        not sep
        or not (port.isascii() and port.isdigit())
        or not 0 < int(port) < 65536
        or (":" in host) != bracketed
    ):
        raise ValueError(
            f'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080", got "{text}"'
        )
    # ":8080" keeps an empty host: every address, IPv4 and IPv6 (0.0.0.0 is IPv4 only).
    return host[1:-1] if bracketed else host, int(port)


def _devices(value: Any) -> DevicesSpec:
    if value in ("auto", "cpu"):
        return "auto" if value == "auto" else "cpu"
    if (
        isinstance(value, list)
        and value
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    ):
        return tuple(value)
    raise ValueError(f"expected auto, cpu or a list of device indices like [0, 1], got {value!r}")


def _optional_count(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of 1 or more (or null), got {value!r}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of 1 or more, got {value!r}")
    return value


def _watch_every(value: Any) -> float:
    """``watch_config``: 0 (off), or a pace of at least :data:`WATCH_MIN_S`.

    Faster, the watch would stat every file in a busy loop; and ``1ms`` is more likely
    ``1m`` mistyped than a wish. Refused, with the value, rather than rounded up.
    """
    seconds = parse_duration(value)
    if 0 < seconds < WATCH_MIN_S:
        raise ValueError(f'expected 0 (off) or a duration of at least 100ms, got "{value}"')
    return seconds


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _share(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"expected a share of the time from 0 to 1, like 0.4, got {value!r}")
    return float(value)


def _path(value: Any) -> Path:
    """A path; ``~`` alone is YAML's null, not the home folder, so it is refused."""
    if value is None or isinstance(value, bool | dict | list) or not str(value).strip():
        shown = (
            "null (in YAML, ~ alone is null: write ~/ or the full path)"
            if value is None
            else repr(value)
        )
        raise ValueError(f"expected a path, got {shown}")
    if "\0" in str(value):  # no file name can hold it
        raise ValueError(f"a NUL character in {clip(str(value))!r}")
    return home_expanded(str(value))


def _one_of(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return convert


def _backend_log(value: Any) -> str:
    # Unquoted, off is YAML 1.1's false: as the README writes it, it is the mode off.
    return "off" if value is False else _one_of(*BACKEND_LOG_MODES)(value)


_DAEMON_KEYS: dict[str, Callable[[Any], Any]] = {
    "listen": parse_listen,
    "presets": _path,
    "state_dir": _path,
    "max_running": _optional_count,
    "max_body": parse_size,
    "devices": _devices,
    "reserve": parse_size,
    "budget": lambda v: None if v is None else parse_size(v),
    "queue_timeout": parse_duration,
    "release_timeout": parse_duration,
    "log_level": _one_of("debug", "info", "warning", "error"),
    "backend_log": _backend_log,
    "api_keys": parse_keys,
    "admin_keys": parse_keys,
    "api_keys_file": _path,
    "admin_keys_file": _path,
    "allowed_hosts": parse_allowed_hosts,
    "cors_origins": parse_origins,
    "metrics_public": _flag,
    "max_connections": _count,
    "header_timeout": parse_positive_duration,
    "body_timeout": parse_positive_duration,
    "send_timeout": parse_positive_duration,
    "keepalive_timeout": parse_positive_duration,
    "ram_budget": lambda v: None if v is None else parse_size(v),
    "cache_dir": _path,
    "cache_budget": lambda v: None if v is None else parse_size(v),
    "max_wait": parse_duration,
    "hold_max": parse_duration,
    "hold_busy": _share,
    "default_memory": parse_size,
    "shutdown_timeout": parse_duration,
    "watch_config": _watch_every,
    "cgroups": _flag,
    "defaults": lambda v: v,
}


def _daemon_values(doc: Document, errors: list[ConfigError]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for entry in doc.entries:
        if entry.key not in _DAEMON_KEYS:
            known = ", ".join(sorted(_DAEMON_KEYS))
            errors.append(
                ConfigError(entry.key_where, entry.key, f"unknown key; known keys: {known}")
            )
            continue
        try:
            values[entry.key] = _DAEMON_KEYS[entry.key](entry.value)
        except ValueError as exc:
            errors.append(ConfigError(entry.where, entry.key, str(exc)))
    return values


def _defaults(
    doc: Document, base: Path, errors: list[ConfigError]
) -> dict[str, tuple[Any, Location]]:
    defaults: dict[str, tuple[Any, Location]] = {}
    for entry in doc.entries:
        if entry.key == "defaults":
            try:
                children = nested_entries(doc.file, entry)
            except ConfigError as exc:
                errors.append(exc)
                continue
            # A key that did not convert is INVALID, and said so here: the presets that
            # take it say nothing more of it.
            defaults = convert_entries(children, allowed=CONVERTERS, errors=errors)
            model, model_at = defaults.get("model", (INVALID, doc.where))
            if model is not INVALID:  # relative to the config file, where it is written
                defaults["model"] = ((base / model).absolute(), model_at)
    return defaults


def _check_staging(
    presets: list[Preset],
    values: dict[str, Any],
    failed: set[str],
    doc: Document,
    errors: list[ConfigError],
) -> None:
    staged = [p.name for p in presets if p.stage]
    if staged and "cache_dir" not in values and "cache_dir" not in failed:
        reason = f"missing; presets with stage: true need a cache directory: {', '.join(staged)}"
        errors.append(ConfigError(doc.where, "cache_dir", reason))


def _read_key_files(
    values: dict[str, Any], doc: Document, base: Path, errors: list[ConfigError]
) -> None:
    # Keys from files join those written inline; the paths are relative to the config file.
    for kind in ("api", "admin"):
        name = f"{kind}_keys_file"
        if name not in values:
            continue
        values[name] = base / values[name]
        where = next(e.where for e in doc.entries if e.key == name)
        try:
            keys = read_keys_file(values[name], name, where)
        except ConfigError as exc:
            errors.append(exc)
            continue
        values[f"{kind}_keys"] = values.get(f"{kind}_keys", ()) + keys


@dataclass(frozen=True)
class Endpoint:
    """Where a config's swapd listens, and its admin keys: all a client needs."""

    host: str
    port: int
    admin_keys: tuple[str, ...]
    key_problem: str | None = None  # why admin_keys_file could not be read here


_ENDPOINT_KEYS = ("listen", "admin_keys", "admin_keys_file")


def load_endpoint(path: Path) -> Endpoint:
    """The listen address and admin keys of a config, from its own document alone.

    A client asks a running swapd, which may have started from an older, good
    version: a preset broken since must not keep the CLI from it. An admin keys
    file this user may not read (0600, swapd's own) is said in ``key_problem``.
    """
    try:
        doc = load_document(path)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from exc
    errors: list[ConfigError] = []
    values: dict[str, Any] = {}
    for entry in doc.entries:
        if entry.key in _ENDPOINT_KEYS:
            try:
                values[entry.key] = _DAEMON_KEYS[entry.key](entry.value)
            except ValueError as exc:
                errors.append(ConfigError(entry.where, entry.key, str(exc)))
    if errors:
        raise ConfigErrors(errors)
    key_errors: list[ConfigError] = []
    _read_key_files(values, doc, path.parent, key_errors)
    host, port = values.get("listen", DEFAULT_LISTEN)
    problem = "\n".join(str(e) for e in key_errors) or None
    return Endpoint(host, port, values.get("admin_keys", ()), problem)


_FILE_KEYS = ("presets", "api_keys_file", "admin_keys_file")


def named_files(path: Path) -> tuple[Path, list[Path]]:
    """The presets folder and key files the config at ``path`` names, as far as it reads.

    For the watch of a config a reload refused: a fix may land in a file only it names
    (a folder it moved the presets to, a key file not written yet). Values that do not
    read are left out; the reload says why.
    """
    try:
        doc = load_document(path)
    except (ConfigError, OSError):
        return path.parent / "presets", []
    return _named_in(doc, path.parent)


def _named_in(doc: Document, base: Path) -> tuple[Path, list[Path]]:
    """The presets folder and key files ``doc`` names; values that do not read are left out."""
    named: dict[str, Path] = {}
    for entry in doc.entries:
        if entry.key in _FILE_KEYS:
            with contextlib.suppress(ValueError):
                named[entry.key] = base / _DAEMON_KEYS[entry.key](entry.value)
    presets = named.pop("presets", base / "presets")
    return presets, list(named.values())


def stamp_files(files: Iterable[Path]) -> dict[str, tuple[int, int, int]]:
    """Size, mtime and inode of each file, links followed; -1s for one that cannot be read."""
    found = {}
    for file in files:
        try:
            st = file.stat()
        except (OSError, ValueError):  # ValueError: a NUL in a path a broken config named
            found[str(file)] = (-1, -1, -1)
            continue
        found[str(file)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def read_files(source: Path, presets: Path, keys: list[Path]) -> list[Path]:
    """The files a load of the config at ``source`` reads: it, its preset files, its keys."""
    files = [source]
    with contextlib.suppress(OSError):  # gone or unreadable: the load says so
        files += preset_files(presets)
    return files + keys


def _read_presets(
    presets_dir: Path,
    values: Mapping[str, Any],
    defaults: Mapping[str, tuple[Any, Location]],
    doc: Document,
    errors: list[ConfigError],
) -> tuple[list[Preset], list[ConfigError]]:
    """The good presets of ``presets_dir`` and the problems of the others.

    A folder that is not there, or cannot be listed, is an error of the config's own.
    """
    presets_at = next((e.where for e in doc.entries if e.key == "presets"), doc.where)
    if not presets_dir.is_dir():
        errors.append(ConfigError(presets_at, "presets", f"not a directory: {presets_dir}"))
        return [], []
    spec = values.get("devices", "auto")
    offered = None if spec == "auto" else () if spec == "cpu" else tuple(spec)
    try:
        presets, problems = read_presets(
            presets_dir,
            defaults,
            label_root=Path.cwd(),
            config_file=Path(doc.file),
            offered=offered,
        )
    except OSError as exc:  # a folder this user may not list: not one without presets
        reason = f"cannot read {presets_dir}: {exc.strerror}"
        errors.append(ConfigError(presets_at, "presets", reason))
        return [], []
    return presets, problems


def load_config(path: Path) -> Config:
    """Load a daemon config and its presets; raise :class:`ConfigErrors` listing every problem."""
    first = stamp_files([path])  # before the read: a write after it shows in this stamp
    try:
        doc = load_document(path)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from exc
    # The other files' stamps are taken before they are read, below.
    stamps = stamp_files(read_files(path, *_named_in(doc, path.parent))) | first
    errors: list[ConfigError] = []
    values = _daemon_values(doc, errors)
    # Keys whose values did not convert: their errors are said; nothing is checked by them.
    failed = {e.key for e in doc.entries if e.key in _DAEMON_KEYS and e.key not in values}
    base = path.parent
    defaults = _defaults(doc, base, errors)
    presets_dir = base / values.get("presets", Path("presets"))
    presets: list[Preset] = []
    preset_errors: list[ConfigError] = []  # said after the config's own, in file order
    if "presets" not in failed:
        presets, preset_errors = _read_presets(presets_dir, values, defaults, doc, errors)
    _check_staging(presets, values, failed, doc, errors)
    _read_key_files(values, doc, base, errors)
    if errors or preset_errors:
        raise ConfigErrors(errors + preset_errors)
    host, port = values.pop("listen", DEFAULT_LISTEN)
    values.pop("defaults", None)
    values.pop("presets", None)
    for key in ("state_dir", "cache_dir"):  # relative to the config file
        if key in values:
            values[key] = base / values[key]
    return Config(
        source=str(path),
        host=host,
        port=port,
        presets_dir=presets_dir,
        presets=tuple(presets),
        stamps=stamps,
        empty=not doc.entries,
        **values,
    )
