"""Preset files: one YAML file per model, validated key by key with file:line:column errors."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from swapd._yaml import (
    Document,
    Entry,
    NestedValueError,
    NestedValueErrors,
    Problems,
    json_value,
    load_document,
    nested_location,
    node_location,
    written,
    yaml_kind,
)
from swapd.backends import KINDS, flag_as_written
from swapd.errors import ConfigError, ConfigErrors, Location, clip
from swapd.gguf_split import split_parts
from swapd.rewrite import Filters, parse_filters
from swapd.units import parse_duration, parse_positive_duration, parse_size

BackendName = Literal["llama-server", "vllm", "command"]
SleepSetting = Literal["auto", 0, 1, 2]
BACKENDS: tuple[BackendName, ...] = ("llama-server", "vllm", "command")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*\Z")  # \Z: "$" would let a last "\n" in


@dataclass(frozen=True)
class Preset:
    """Everything swapd knows about one model; built only by :func:`load_presets`."""

    name: str
    file: str
    backend: BackendName
    model: Path | None = None
    args: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    binary: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    ttl: float = 0.0
    health: str | None = "/health"  # None: ready once its port accepts, no liveness probe
    start_timeout: float = 300.0
    stop_timeout: float = 10.0
    memory: int | None = None
    pin: bool = False
    preload: bool = False
    devices: tuple[int, ...] | None = None
    # Tiers: vLLM sleep level ("auto": 1 on a GPU, 0 on a CPU-only host; 0 also turns off
    # llama-server's warm pages), how long to stay in the ram tier, NVMe staging.
    sleep: SleepSetting = "auto"
    ram_ttl: float = 0.0
    stage: bool = False
    sha256: str | None = None
    # Supervision: liveness probes and per-model limits.
    health_interval: float = 10.0
    health_failures: int = 3
    concurrency: int | None = None
    max_queue: int | None = None
    request_timeout: float | None = None
    # Request rewriting (see swapd.rewrite): the model the backend receives, body filters.
    use_model_name: str | None = None
    filters: Filters | None = None
    # How GET /v1/models shows it: a description, JSON metadata, or not listed at all.
    description: str | None = None
    metadata: Mapping[str, Any] | None = None
    unlisted: bool = False


def _str(value: Any) -> str:
    if isinstance(value, str) and value:
        if "\0" in value:  # no command line or environment can carry it
            raise ValueError(f"a NUL character in {clip(value)!r}")
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return written(value)  # as the file wrote it: 3.10, not 3.1
    if isinstance(value, bool):  # the file said yes, on, off...: "got True" would puzzle
        raise ValueError(
            f"expected a non-empty string, got {str(value).lower()}: YAML reads yes, no, on"
            " and off unquoted as true or false; quote it"
        )
    raise ValueError(f"expected a non-empty string, got {clip(repr(value))}")


def home_expanded(text: str) -> Path:
    """``text`` as a path, a leading ``~`` or ``~user`` expanded; ValueError for no such home."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~user for a user this host does not have, or no home at all
        user = text.split("/", 1)[0]
        raise ValueError(f"cannot expand {clip(user)}: no such user's home here") from None


def is_usable_name(value: str) -> bool:
    """Whether ``value`` may name a model or alias (letters, digits, ``._:/@+-``).

    No ``/``-separated part may be empty, ``.`` or ``..``: clients (curl, the SDKs) resolve
    those in a URL's path, so ``/v1/models/org/../m`` would ask about another model.
    """
    if not _NAME.match(value):
        return False
    return not any(part in {"", ".", ".."} for part in value.split("/"))


def _name(value: str) -> str:
    """A model name or alias: it goes on command lines (vLLM's --served-model-name) as is."""
    if not is_usable_name(value):
        raise ValueError(f"not a usable model name: {clip(value)!r}")
    return value


def _aliases(value: Any) -> tuple[str, ...]:
    return _str_list(value, _name)


def _at(path: tuple[str | int, ...], convert: Callable[[Any], Any], value: Any) -> Any:
    """``convert(value)``, its error pointed at ``path`` inside the key's value."""
    try:
        return convert(value)
    except ValueError as exc:  # "": the key's own name, from convert_entries
        raise NestedValueError("", path, str(exc)) from exc


def _str_list(value: Any, check: Callable[[str], str] = lambda text: text) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {yaml_kind(value)}")
    problems = Problems()
    items = []
    for i, item in enumerate(value):  # every bad item, each pointed at
        with problems.part():
            items.append(_at((i,), lambda v: check(_str(v)), item))
    problems.raise_any()
    return tuple(items)


# What YAML would read as a boolean, were it not quoted.
_QUOTED_BOOLEANS = frozenset({"true", "false", "yes", "no", "on", "off"})


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        spelled = isinstance(value, str) and value.lower() in _QUOTED_BOOLEANS
        quoted = " (a quoted string: write it without quotes)" if spelled else ""
        raise ValueError(f"expected true or false, got {clip(repr(value))}{quoted}")
    return value


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of NAME: value, got {yaml_kind(value)}")
    env = {}
    problems = Problems()
    for key, item in value.items():  # every bad variable, each pointed at
        with problems.part():
            name = _key_str(key)
            if "=" in name:  # the environment's own separator: exec would refuse it
                raise NestedValueError(
                    "", (key,), f"not a usable variable name: {clip(name)!r}", at_key=True
                )
            env[name] = "" if item is None else _at((key,), _str, item)
    problems.raise_any()
    return env


def _key_str(key: Any) -> str:
    """A mapping's key as text, its error pointed at the key."""
    try:
        return _str(key)
    except ValueError as exc:
        raise NestedValueError("", (key,), str(exc), at_key=True) from exc


def _backend(value: Any) -> BackendName:
    for kind in BACKENDS:
        if value == kind:
            return kind
    raise ValueError(f"expected one of {', '.join(BACKENDS)}, got {value!r}")


# What a request line can carry as is: a space, a non-ASCII letter or a line break in it
# makes the probe a request no server answers 200 (or a header of its own).
_URL_PATH = re.compile(r"/[\x21-\x7e]*")


def _health(value: Any) -> str | None:
    path = _str(value)
    if path == "none":
        return None
    if not path.startswith("/"):
        raise ValueError(f'expected a URL path starting with "/" or none, got "{path}"')
    if not _URL_PATH.fullmatch(path):
        raise ValueError(
            f"expected a URL path of visible ASCII characters, no spaces (percent-encode"
            f" others), got {clip(path)!r}"
        )
    return path


def _metadata(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {yaml_kind(value)}")
    converted: dict[str, Any] = json_value(value, "metadata", ())
    return converted


def _devices(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise ValueError(f"expected a device index or a list of them, like [0, 1], got {value!r}")
    return tuple(items)


def _sleep(value: Any) -> SleepSetting:
    for setting in ("auto", 0, 1, 2):
        if value == setting and not isinstance(value, bool):
            return setting
    raise ValueError(f"expected auto, 0, 1 or 2, got {value!r}")


def _count(value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"expected a whole number of {minimum} or more, got {value!r}")
    return value


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _sha256(value: Any) -> str:
    text = _str(value)
    # A block scalar (``sha256: |``, or pasted from ``sha256sum``) ends in a newline.
    digits = text.strip()
    if not _SHA256.fullmatch(digits):
        raise ValueError(f"expected 64 hexadecimal digits, got {text!r}")
    return digits.lower()


# ``${env.NAME}``: swapd's own environment variable NAME (a unit's Environment=), read
# when the preset is (at start and at each reload).
_ENV_MACRO = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, path: tuple[str | int, ...] = ()) -> Any:
    """``value`` with each ``${env.NAME}`` in its text replaced; unset NAME is an error.

    The error points at the text that names it (``path``: where it is in ``value``).
    """
    if isinstance(value, list):
        return [_expand_env(item, (*path, i)) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {name: _expand_env(item, (*path, name)) for name, item in value.items()}
    if not isinstance(value, str) or "${env." not in value:
        return value

    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise NestedValueError("", path, f"${{env.{name}}}: swapd's environment has no {name}")
        return os.environ[name]

    return _ENV_MACRO.sub(variable, value)


def _expanding(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert`` of the value with its ``${env.NAME}`` macros replaced first."""
    return lambda value: convert(_expand_env(value))


# Each preset key and the converter that validates it; unknown keys are rejected.
CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "name": _str,
    "backend": _backend,
    "model": _expanding(lambda v: home_expanded(_str(v))),
    "args": _expanding(_str_list),
    "cmd": _expanding(_str_list),
    "binary": _expanding(_str),
    "env": _expanding(_env),
    "aliases": _aliases,
    "ttl": parse_duration,
    "health": _health,
    "start_timeout": parse_positive_duration,
    "stop_timeout": parse_positive_duration,
    "memory": parse_size,
    "pin": _bool,
    "preload": _bool,
    "devices": _devices,
    "sleep": _sleep,
    "ram_ttl": parse_duration,
    "stage": _bool,
    "sha256": _sha256,
    "health_interval": parse_positive_duration,
    "health_failures": _count,
    "concurrency": lambda v: None if v is None else _count(v),
    "max_queue": lambda v: None if v is None else _count(v, minimum=0),
    "request_timeout": lambda v: None if v is None else parse_positive_duration(v),
    "use_model_name": lambda v: None if v is None else _str(v),
    "filters": parse_filters,
    "description": lambda v: None if v is None else _str(v),
    "metadata": lambda v: None if v is None else _metadata(v),
    "unlisted": _bool,
}


# The value of a key that did not convert (its error is reported already): a check that
# needs the key is skipped, not run on the default in its place ("model: missing").
INVALID: Final = object()


def convert_entries(
    entries: Iterable[Entry], *, allowed: Iterable[str], errors: list[ConfigError]
) -> dict[str, tuple[Any, Location]]:
    """Convert each entry with its converter, collecting every error rather than the first.

    A key whose value does not convert maps to :data:`INVALID`.
    """
    allowed = set(allowed)
    values: dict[str, tuple[Any, Location]] = {}
    for entry in entries:
        if entry.key not in allowed:
            hint = ", ".join(sorted(allowed))
            errors.append(
                ConfigError(entry.key_where, entry.key, f"unknown key; known keys: {hint}")
            )
            continue
        try:
            values[entry.key] = (CONVERTERS[entry.key](entry.value), entry.where)
            continue
        except NestedValueErrors as exc:  # about several parts of the value: each pointed at
            nested = list(exc.errors)
        except NestedValueError as exc:  # about one part of the value: pointed at
            nested = [exc]
        except ValueError as exc:
            nested = []
            errors.append(ConfigError(entry.where, entry.key, str(exc)))
        for part in nested:
            where = nested_location(entry.where.file, entry.node, part.path, at_key=part.at_key)
            errors.append(ConfigError(where, part.key or entry.key, str(part)))
        values[entry.key] = (INVALID, entry.where)
    return values


def _resolve_model(path: Path, preset_dir: Path) -> Path:
    if path.is_absolute():
        return path
    try:
        return (preset_dir / path).resolve()
    except (OSError, RuntimeError):  # a symlink loop: the model check names the path
        return preset_dir / path


def _flag_in_args(
    values: Mapping[str, tuple[Any, Location]], flags: tuple[str, ...], *, argparse: bool
) -> tuple[str, str, Location] | None:
    """The first of ``flags`` the preset's args set: the flag, as written, and where."""
    args, args_at = values.get("args", ((), None))
    if args_at is None:
        return None
    for flag in flags:
        if (arg := flag_as_written(args, flag, argparse=argparse)) is not None:
            return flag, arg.split("=", 1)[0], args_at
    return None


Values = Mapping[str, tuple[Any, Location]]


def _unused_keys(backend: BackendName, doc: Document, failed: frozenset[str]) -> list[ConfigError]:
    """Each key the preset's own file sets that its backend never reads (defaults may set any).

    An empty one (``args: []``) asks for nothing that would be ignored. The error points
    at the key, as an unknown key's does; a key whose value did not convert has its error.
    """
    unused = KINDS[backend].unused_keys
    return [
        ConfigError(entry.key_where, entry.key, f"a {backend} backend never reads it: {why}")
        for entry in doc.entries
        if (why := unused.get(entry.key)) is not None and entry.value and entry.key not in failed
    ]


def _health_none_problem(backend: BackendName, values: Values) -> ConfigError | None:
    """``health: none`` on an engine with a health route of its own, which says when it loaded.

    llama-server and vLLM accept connections while they load, and answer 503 meanwhile.
    """
    if not KINDS[backend].health_says_loaded:
        return None
    if "health" not in values or values["health"][0] is not None:
        return None
    reason = f"{backend} answers /health once it has loaded; none is for command backends"
    return ConfigError(values["health"][1], "health", reason)


def _own_key_clashes(backend: BackendName, values: Values) -> list[ConfigError]:
    """Where the preset sets the backend's own key, which is swapd's to set (a new one per start).

    Its args and its env each, where both do.
    """
    own = KINDS[backend].own_key
    if own is None:
        return []
    why = f"is swapd's to set: each start of {backend} gets a new key only swapd knows"
    clashes = []
    if found := _flag_in_args(values, own.flags, argparse=own.argparse):
        flag, written, args_at = found
        shown = flag if written == flag else f"{written} (read as {flag})"
        clashes.append(ConfigError(args_at, "args", f"{shown} {why}; remove it"))
    env, env_at = values.get("env", ({}, None))
    if env_at is not None and own.env in env:
        clashes.append(ConfigError(env_at, "env", f"{own.env} {why}; remove it"))
    return clashes


def _model_flag_clash(backend: BackendName, values: Values) -> ConfigError | None:
    """A preset that names the model in its args, which swapd passes itself from ``model:``."""
    kind = KINDS[backend]
    argparse = kind.own_key is not None and kind.own_key.argparse
    if found := _flag_in_args(values, kind.model_flags, argparse=argparse):
        _, written, args_at = found
        reason = f"{written} is swapd's to pass, from model: (or its staged copy)"
        return ConfigError(args_at, "args", reason)
    return None


def _pinned_outside(values: Values, offered: tuple[int, ...] | None) -> ConfigError | None:
    """A preset pinned only to devices the daemon's ``devices`` never offers: no load fits."""
    if offered is None or "devices" not in values:
        return None
    wanted, devices_at = values["devices"]
    if set(wanted) & set(offered):
        return None
    shown = f"[{', '.join(map(str, offered))}]" if offered else "cpu"
    reason = f"none of {list(wanted)} is among the daemon's devices: {shown}"
    return ConfigError(devices_at, "devices", reason)


def _build(
    file: Path,
    label: str,
    defaults: Values,
    errors: list[ConfigError],
    offered: tuple[int, ...] | None = None,
) -> tuple[Preset, dict[str, Location]] | None:
    """The preset of ``file`` and where its name and aliases were written; None on errors.

    Every independent problem is reported, not the first: each check runs unless a key
    it needs did not convert (that key's own error says why, once).
    """
    doc = load_document(file, label=label)
    found: list[ConfigError] = []
    converted = {**defaults, **convert_entries(doc.entries, allowed=CONVERTERS, errors=found)}
    failed = frozenset(key for key, (value, _) in converted.items() if value is INVALID)
    values = {key: item for key, item in converted.items() if item[0] is not INVALID}
    plain = {key: value for key, (value, _) in values.items()}
    if "model" in values:
        plain["model"] = _resolve_model(values["model"][0], file.parent)
    name, name_at = values.get("name", (file.stem, doc.where))
    if "name" not in failed and not is_usable_name(name):
        reason = f"not a usable model name: {name!r}"
        if "name" not in values:  # nothing in the file says name: it is the file's own
            reason += "; it is the file's name: rename the file or set name:"
        found.append(ConfigError(name_at, "name", reason))
    if (backend_found := _backend_of(values, failed, doc.where, found)) is not None:
        backend, backend_at = backend_found
        # A key missing from this file is reported in it, also where backend came from defaults.
        missing_at = backend_at if backend_at.file == label else doc.where
        found += _own_key_clashes(backend, values)
        found += _model_or_cmd_problems(backend, values, failed, missing_at, plain)
        found += _unused_keys(backend, doc, failed)
        checks = (_model_flag_clash(backend, values), _health_none_problem(backend, values))
        found += [problem for problem in checks if problem is not None]
    for problem in (_pinned_outside(values, offered), _stage_problem(values, failed, plain, label)):
        if problem is not None:
            found.append(problem)
    errors += found
    if found or backend_found is None:  # no backend: a bad one in defaults, said there
        return None
    plain["name"] = name
    return Preset(file=label, **plain), _name_places(doc, values, name, name_at)


def _model_or_cmd_problems(
    backend: BackendName,
    values: Values,
    failed: frozenset[str],
    missing_at: Location,
    plain: Mapping[str, Any],
) -> list[ConfigError]:
    """What is wrong with the model (``plain["model"]``, resolved) and a command's cmd."""
    problems: list[ConfigError] = []
    model_at = values["model"][1] if "model" in values else missing_at
    if KINDS[backend].needs_model:
        if "model" in values:
            problems += _optional(_model_problem(values, plain["model"], model_at))
        elif "model" not in failed:
            problems.append(ConfigError(missing_at, "model", f"missing; {backend} needs a model"))
        return problems
    # Passed on as ${MODEL}, it may be a name; a copy needs the file (or folder).
    staged = "model" in values and plain.get("stage")
    if staged and (problem := _model_problem(values, plain["model"], model_at)):
        reason = f"{problem.reason} (stage: true copies it into the cache)"
        problems.append(ConfigError(problem.where, problem.key, reason))
    if "cmd" not in failed:
        problems += _optional(_command_problem(values, missing_at))
    return problems


def _optional(problem: ConfigError | None) -> list[ConfigError]:
    return [] if problem is None else [problem]


def _name_places(
    doc: Document, values: Mapping[str, tuple[Any, Location]], name: str, name_at: Location
) -> dict[str, Location]:
    """Where the preset's name and each of its aliases were written, for a clash to point at."""
    places: dict[str, Location] = {}
    if "aliases" in values:
        aliases, aliases_at = values["aliases"]
        places.update(dict.fromkeys(aliases, aliases_at))
        # An alias in this file's own list: the item itself, not the start of the list.
        entry = next((e for e in doc.entries if e.key == "aliases"), None)
        if entry is not None and isinstance(entry.node, yaml.SequenceNode):
            for item in entry.node.value:
                if isinstance(item, yaml.ScalarNode) and item.value in places:
                    places[item.value] = node_location(doc.file, item)
    places[name] = name_at
    return places


def _backend_of(
    values: Values, failed: frozenset[str], where: Location, errors: list[ConfigError]
) -> tuple[BackendName, Location] | None:
    """The preset's backend and where it was set; None when missing (an error) or invalid."""
    if "backend" in failed:
        return None  # its error is reported where it was written (in defaults: once)
    if "backend" not in values:
        errors.append(ConfigError(where, "backend", f"missing; one of {', '.join(BACKENDS)}"))
        return None
    backend: BackendName
    backend, backend_at = values["backend"]
    return backend, backend_at


def _model_problem(
    values: Mapping[str, tuple[Any, Location]], model: Path, model_at: Location
) -> ConfigError | None:
    """A model that is not there, or a ``sha256`` that could vouch for part of it only."""
    if not model.exists():
        return ConfigError(model_at, "model", f"not found: {model}")
    if not model.is_file() and not model.is_dir():
        # A FIFO or a device: a backend would block reading it until start_timeout.
        return ConfigError(model_at, "model", f"neither a file nor a directory: {model}")
    parts = split_parts(model)
    if missing := [part.name for part in parts if not part.exists()]:
        reason = f"a split GGUF of {len(parts)} files lacks {', '.join(missing)} beside {model}"
        return ConfigError(model_at, "model", reason)
    if "sha256" not in values:  # one digest checks one file
        return None
    if model.is_dir():
        what = "a directory"
    elif len(parts) > 1:
        what = f"the first of {len(parts)} files of a split GGUF"
    else:
        return None
    reason = f"is checked for a single file, and {model} is {what}; remove it"
    return ConfigError(values["sha256"][1], "sha256", reason)


def _command_problem(
    values: Mapping[str, tuple[Any, Location]], backend_at: Location
) -> ConfigError | None:
    """What keeps a command backend's ``cmd`` from ever starting a server swapd can reach."""
    if "cmd" not in values:
        return ConfigError(backend_at, "cmd", "missing; a command backend needs cmd")
    cmd, cmd_at = values["cmd"]
    if not any("${PORT}" in arg for arg in cmd):
        # swapd picks the port at each start: a server that is not told it is never ready.
        reason = "no argument holds ${PORT}, the port swapd picks at each start (--port ${PORT})"
        return ConfigError(cmd_at, "cmd", reason)
    return None


def _stage_problem(
    values: Values, failed: frozenset[str], plain: dict[str, Any], label: str
) -> ConfigError | None:
    """``stage: true`` on a preset with nothing to copy (a command backend without model:).

    Set in ``defaults:``, it is for the presets that have a model: this one is not staged.
    """
    stage, stage_at = values.get("stage", (False, None))
    if not stage or stage_at is None or "model" in values or "model" in failed:
        return None
    if stage_at.file != label:
        plain["stage"] = False
        return None
    return ConfigError(
        stage_at, "stage", "true needs model:, the file or folder to copy into the cache"
    )


def _check_names(
    presets: list[Preset], places: Mapping[str, Mapping[str, Location]], errors: list[ConfigError]
) -> None:
    owner: dict[str, Preset] = {}
    for preset in presets:
        for name in (preset.name, *preset.aliases):
            if name in owner and owner[name] is not preset:
                # Where the clashing name or alias was written (line 1 only as a last resort).
                where = places.get(preset.file, {}).get(name, Location(preset.file, 1, 1))
                reason = f"{name!r} is already used by {owner[name].file}"
                errors.append(
                    ConfigError(where, "name" if name == preset.name else "aliases", reason)
                )
            owner.setdefault(name, preset)


def preset_files(directory: Path) -> list[Path]:
    """The preset files of a directory, in name order (``*.yaml`` and ``*.yml``).

    Hidden names are not presets: an editor's lock (Emacs' ``.#qwen.yaml``, a link to
    nowhere), the ``._qwen.yaml`` a copy from a Mac leaves beside each file. A folder
    that cannot be listed raises OSError (``glob`` would find nothing in it).
    """
    with os.scandir(directory) as found:
        names = [entry.name for entry in found]
    return sorted(
        directory / name
        for name in names
        if Path(name).suffix in (".yaml", ".yml") and not name.startswith(".")
    )


def load_presets(
    directory: Path,
    defaults: Mapping[str, tuple[Any, Location]],
    *,
    label_root: Path | None = None,
    config_file: Path | None = None,
    offered: tuple[int, ...] | None = None,
) -> list[Preset]:
    """Load every preset of ``directory``; raise :class:`ConfigErrors` listing all problems.

    The arguments are :func:`read_presets`'.
    """
    presets, errors = read_presets(
        directory, defaults, label_root=label_root, config_file=config_file, offered=offered
    )
    if errors:
        raise ConfigErrors(errors)
    return presets


def read_presets(
    directory: Path,
    defaults: Mapping[str, tuple[Any, Location]],
    *,
    label_root: Path | None = None,
    config_file: Path | None = None,
    offered: tuple[int, ...] | None = None,
) -> tuple[list[Preset], list[ConfigError]]:
    """The presets of ``directory`` that are good, and every problem of the others.

    ``config_file`` is skipped where the presets folder holds it (``presets: .``).
    ``offered``: the GPU indices the daemon's ``devices`` names (``()`` for cpu; None: auto).
    A folder that cannot be listed raises OSError.
    """
    errors: list[ConfigError] = []
    presets: list[Preset] = []
    places: dict[str, dict[str, Location]] = {}
    for file in preset_files(directory):
        if config_file is not None and _same_file(file, config_file):
            continue
        label = _label(file, label_root)
        try:
            built = _build(file, label, defaults, errors, offered)
        except ConfigError as exc:
            errors.append(exc)
            continue
        if built is not None:
            presets.append(built[0])
            places[label] = built[1]
    _check_names(presets, places, errors)
    return presets, errors


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _label(file: Path, root: Path | None) -> str:
    # Errors read best relative to where the user keeps the config; under systemd the
    # working folder is /, where a relative name would only lose its leading slash. The
    # file's own name stays: a preset that is a link (a ConfigMap's, one to a shared
    # file, one to nowhere) is named as the presets folder lists it, not as its target.
    if root is not None and root != Path(root.anchor):
        try:
            return str((file.parent.resolve() / file.name).relative_to(root.resolve()))
        except (ValueError, OSError, RuntimeError):  # elsewhere, or a symlink loop
            pass
    return str(file)
