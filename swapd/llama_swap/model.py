"""One llama-swap model as a swapd preset: its keys mapped, the rest noted.

llama-swap keys and the preset keys they become: ``cmd`` (see :mod:`.command`),
``aliases``, ``ttl`` (``-1``: ``globalTTL``), ``env`` (``K=V`` items),
``checkEndpoint`` (``health``), ``unloadTimeout`` (``stop_timeout``; ``0``: the
global one), ``useModelName`` (and vLLM's ``--served-model-name``), ``filters``
(setParamsByID's ids become aliases), ``name`` and ``description`` (one
``description``), ``metadata``, ``unlisted`` and ``concurrencyLimit``
(``concurrency``). A preset swapd would refuse as written (no ``${PORT}`` in a
command's argv, a name it cannot use), or a command no request could reach (it
gives its server a key), is kept aside with the reason.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from swapd._yaml import Entry, WrittenFloat, WrittenInt, entries_of, json_value
from swapd.backends import KINDS, BackendKind, has_flag
from swapd.llama_swap import command, macros
from swapd.llama_swap.notes import Note
from swapd.presets import is_usable_name
from swapd.probe import GPU_PICKS

_DEFAULT_HEALTH = "/health"
_DEFAULT_PROXIES = ("http://localhost:${PORT}", "http://127.0.0.1:${PORT}")
_OWN_KEY_ENV = {k.name: k.own_key.env for k in KINDS.values() if k.own_key is not None}
_PROTECTED = ("model", "stream")  # swapd's filters refuse both (README: Request rewriting)
# Keys whose comment lines llama-swap drops before it expands macros: a folded macro ends
# in a newline, and expanded first it would cut its comment line in two.
_COMMANDS = ("cmd", "cmdStop")
# YAML 1.1's words for true and false, text to llama-swap's YAML (yaml.v3) except in a
# key that takes a bool, where it reads them as the bool.
_OLD_BOOLS = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "off", "Off", "OFF"), False),
}
# Preset keys whose values swapd reads ${env.NAME} in; elsewhere it would stay as text.
_ENV_MACRO_KEYS = frozenset({"model", "binary", "args", "cmd", "env"})
# The order keys are written in, launch first.
_ORDER = (
    "name", "backend", "binary", "model", "args", "cmd", "env", "devices", "aliases", "ttl",
    "health",
    "start_timeout", "stop_timeout", "pin", "preload", "concurrency", "use_model_name",
    "filters", "description", "metadata", "unlisted",
)  # fmt: skip

_NOT_CARRIED = {
    "cmdStop": (
        "not carried: swapd stops the backend's process group (SIGTERM, stop_timeout, "
        "SIGKILL); a `docker run` in the foreground passes SIGTERM on to its container"
    ),
    "sendLoadingState": (
        "not carried: swapd keeps a waiting stream open with `: loading` comment pings instead"
    ),
    "timeouts": (
        "not carried: swapd's connections to backends have their own limits; "
        "request_timeout caps a whole request"
    ),
    "compat": "not carried: swapd relays WebSocket upgrades on /upstream/ like any request",
    "capabilities": (
        "not carried: swapd's /v1/models has no capabilities; metadata can say the same"
    ),
}


@dataclass(frozen=True)
class Globals:
    """What every model takes from config.yaml's top level."""

    macros: Mapping[str, Any]
    base: Path  # config.yaml's folder, for relative model paths
    ttl: int = 0  # globalTTL, seconds; 0 never
    start_timeout: int | None = None  # healthCheckTimeout
    stop_timeout: int | None = None  # unloadTimeout


@dataclass
class Draft:
    """A preset on its way to a file: its values, notes, and why swapd would refuse it."""

    model_id: str
    line: int
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    refused: str | None = None
    # Where each preset key came from: (line, llama-swap key), for later notes.
    origins: dict[str, tuple[int, str]] = field(default_factory=dict)

    def note(self, line: int, key: str, why: str) -> None:
        """Note a setting of this model that does not carry over as written."""
        self.notes.append(Note(line, f"models.{self.model_id}.{key}", why))

    def set(self, key: str, value: Any, line: int, source: str) -> None:
        """Set a preset key, remembering which llama-swap key at which line gave it."""
        self.values[key] = value
        self.origins[key] = (line, source)

    def ordered(self) -> dict[str, Any]:
        """The preset's values in the order a reader expects them."""
        return {key: self.values[key] for key in _ORDER if key in self.values}


def _note_unexpanded(
    draft: Draft, key: str, value: Any, line: int, scope: Mapping[str, Any]
) -> None:
    """A note for each ``${name}`` still in ``value`` after the expansion."""
    for name in dict.fromkeys(macros.unknown(value)):
        why = "is no macro"
        if name in scope:  # defined, and still there: it grows without end
            why = f"uses itself or expands past {macros.EXPANDED_LIMIT // 1024} KiB"
        draft.note(line, key, f"${{{name}}} {why}: left as written")


def convert(model_id: str, line: int, node: yaml.Node, file: str, top: Globals) -> Draft:
    """The preset for llama-swap model ``model_id`` (its mapping ``node``, at ``line``)."""
    draft = Draft(model_id, line)
    entries = {e.key: e for e in entries_of(file, node, what=f"models.{model_id}")}
    own = entries.pop("macros", None)
    scope = macros.scope(
        top.macros, own.value if own and isinstance(own.value, dict) else {}, model_id
    )
    values = {
        key: _plain(macros.expand(_uncommented(key, e.value), scope)) for key, e in entries.items()
    }
    if "filters" in values:
        values["filters"] = _by_id_keys_expanded(values["filters"], scope)
    for key, value in values.items():
        _note_unexpanded(draft, key, value, _line(entries[key]), scope)
    if "cmd" not in entries:
        draft.refused = "no cmd: llama-swap itself refuses such a model"
        draft.note(line, "cmd", "missing; the model is kept aside")
    else:
        _cmd(draft, values["cmd"], _line(entries["cmd"]), top)
    for key, entry in entries.items():
        if key == "cmd":
            continue
        handler = _HANDLERS.get(key)
        if handler is not None:
            handler(draft, values[key], _line(entry))
        elif key in _READ_TOGETHER:
            continue
        elif key in _NOT_CARRIED:
            draft.note(_line(entry), key, _NOT_CARRIED[key])
        else:
            draft.note(_line(entry), key, "not a llama-swap model key swapd knows; not carried")
    _refuse_keyed_command(draft)
    _timers(draft, values, entries, top)
    _describe(draft, values, entries)
    _serve_use_model_name(draft)
    _env_macros_where_unread(draft)
    if not is_usable_name(model_id):
        draft.refused = f"{model_id!r} is not a usable swapd model name"
        draft.note(line, "(id)", f"{draft.refused}; the model is kept aside")
    return draft


def _line(entry: Entry) -> int:
    return entry.key_where.line


def _uncommented(key: str, value: Any) -> Any:
    """``cmd`` and ``cmdStop`` without their comment lines; other values as they are."""
    return command.strip_comments(value) if key in _COMMANDS and isinstance(value, str) else value


def _by_id_keys_expanded(filters: Any, scope: Mapping[str, Any]) -> Any:
    """``filters`` with macros expanded in setParamsByID's keys, as llama-swap does there."""
    if not isinstance(filters, dict) or not isinstance(filters.get("setParamsByID"), dict):
        return filters
    by_id = {
        macros.text(macros.expand(str(k), scope)): v for k, v in filters["setParamsByID"].items()
    }
    return {**filters, "setParamsByID": by_id}


def flag(value: Any) -> bool | None:
    """A bool as llama-swap reads one: true, false, or YAML 1.1's yes, no, on, off; else None."""
    if isinstance(value, bool):
        return value
    return _OLD_BOOLS.get(value) if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """YAML values as plain Python: swapd's loader keeps how numbers were written."""
    if isinstance(value, bool):
        return value
    if isinstance(value, WrittenInt):
        return int(value)
    if isinstance(value, WrittenFloat):
        return float(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _cmd(draft: Draft, value: Any, line: int, top: Globals) -> None:
    if not isinstance(value, str):
        draft.refused = "cmd is not a string"
        draft.note(line, "cmd", f"expected a command line, got {type(value).__name__}")
        return
    try:
        argv = command.split(value)
    except ValueError as exc:
        draft.refused = f"cmd cannot be split: {exc}"
        draft.note(line, "cmd", f"{draft.refused}; the model is kept aside")
        return
    launch = command.read(argv, lambda path: (top.base / path).exists())
    draft.set("backend", launch.backend, line, "cmd")
    for why in launch.notes:
        draft.note(line, "cmd", why)
    if launch.binary is not None:
        draft.set("binary", launch.binary, line, "cmd")
    if launch.model is not None:
        draft.set("model", _model_path(draft, launch.model, line, top.base), line, "cmd")
    if launch.args:
        draft.set("args", list(launch.args), line, "cmd")
    for arg in (a for a in launch.args if "${PORT}" in a):  # --port itself is swapd's
        why = f"swapd replaces ${{PORT}} in a command's cmd only; {launch.backend} gets the text"
        draft.note(line, "cmd", f"{arg}: {why}")
    if launch.cmd:
        draft.set("cmd", list(launch.cmd), line, "cmd")
        _refuse_unstartable(draft, launch.cmd, line)


def _refuse_unstartable(draft: Draft, argv: tuple[str, ...], line: int) -> None:
    """Keep aside a command that swapd would refuse, and with it the whole layout."""
    if not any("${PORT}" in arg for arg in argv):
        draft.refused = "its cmd holds no ${PORT}: swapd picks the port at each start"
    elif "" in argv:
        draft.refused = "its cmd holds an empty argument (''), which swapd refuses"
    if draft.refused:
        draft.note(line, "cmd", f"{draft.refused}; the model is kept aside")


def _refuse_keyed_command(draft: Draft) -> None:
    """Keep aside a command that gives its server a key: no request would bring it one.

    llama-swap passed the client's key on; swapd removes it before forwarding, and a
    command backend gets no key of swapd's, so the server would answer 401 to each request.
    """
    kind = _kind(draft)
    if kind is None or kind.own_key is not None or draft.refused:
        return  # a kind with a key of its own gets swapd's
    flag = command.key_flag(draft.values.get("cmd", []))
    env = [name for name in draft.values.get("env", {}) if name in _OWN_KEY_ENV.values()]
    given = flag or (env[0] if env else None)
    if given is None:
        return
    line, source = draft.origins["cmd" if flag else "env"]
    draft.refused = (
        f"its {source} gives the server a key ({given}) that swapd never sends: "
        "each request would get 401"
    )
    why = "remove it, and keep the server on --host 127.0.0.1; the model is kept aside"
    draft.note(line, source, f"{draft.refused}; {why}")


def _model_path(draft: Draft, path: str, line: int, base: Path) -> str:
    if path.startswith(("/", "~", "${")):
        return path
    absolute = str(base / path)
    why = (
        f"the relative path {path} is read against config.yaml's folder: {absolute} "
        "(llama-swap read it against its working directory)"
    )
    draft.note(line, "cmd", why)
    return absolute


def _aliases(draft: Draft, value: Any, line: int) -> None:
    if not isinstance(value, list):
        draft.note(line, "aliases", f"expected a list, got {type(value).__name__}; not carried")
        return
    # A list of text to llama-swap: a number or bool is its text, null is empty.
    _add_aliases(draft, ["" if a is None else macros.text(a) for a in value], line, "aliases")


def _add_aliases(draft: Draft, names: list[str], line: int, source: str) -> None:
    """Add ``names`` to the model's aliases, each once; a name swapd cannot use is noted."""
    kept: list[str] = draft.values.get("aliases", [])
    for name in names:
        if not is_usable_name(name):
            draft.note(line, source, f"{name!r} is not a usable swapd name; dropped")
        elif name not in kept:
            kept.append(name)
    if kept:
        draft.values["aliases"] = kept
        draft.origins.setdefault("aliases", (line, source))


def _env(draft: Draft, value: Any, line: int) -> None:
    if not isinstance(value, list):
        draft.note(line, "env", f"expected a list of K=V, got {type(value).__name__}")
        return
    env: dict[str, str | None] = {}
    own = _OWN_KEY_ENV.get(draft.values.get("backend", ""))
    for item in value:
        name, eq, setting = str(item).partition("=")
        if not eq or not name:
            draft.note(line, "env", f"{item!r} is not K=V; dropped")
        elif name == own:
            draft.note(line, "env", f"{name} {command.KEY_WHY}")
        elif name in GPU_PICKS and setting:  # set to nothing, it hides every GPU: kept
            _gpu_pick(draft, name, setting, line)
        else:
            if "${PORT}" in setting:
                why = f"{name}: swapd replaces ${{PORT}} in cmd only; the backend gets the text"
                draft.note(line, "env", why)
            env[name] = setting or None  # swapd reads null as set to nothing, and refuses ''
    if env:
        draft.set("env", env, line, "env")


def _gpu_pick(draft: Draft, name: str, setting: str, line: int) -> None:
    """A model pinned to GPUs through its env: carried as ``devices``, which swapd reads.

    swapd sets these variables itself to the GPU it places a model on (where it counts
    its memory), over a preset's own.
    """
    indices = [part.strip() for part in setting.split(",")]
    if all(part.isascii() and part.isdigit() for part in indices):
        draft.set("devices", [int(part) for part in indices], line, "env")
        why = (
            f"{name}={setting} is carried as devices: {[int(p) for p in indices]} (swapd sets "
            f"{name} to the GPU it places the model on); swapd numbers GPUs in PCI bus "
            "order, as nvidia-smi does"
        )
    else:
        why = (
            f"{name}={setting} dropped: swapd sets {name} to the GPU it places the model on; "
            "pin the preset with devices: [index]"
        )
    draft.note(line, "env", why)


def _kind(draft: Draft) -> BackendKind | None:
    """The kind of backend the preset will run, once ``cmd`` was read; None before."""
    return KINDS.get(draft.values.get("backend", ""))


def _health(draft: Draft, value: Any, line: int) -> None:
    if value is None:  # ``checkEndpoint:`` left empty: llama-swap keeps /health, not none
        return
    path = str(value).strip()
    if path.lower() == "none":
        kind = _kind(draft)
        if kind is not None and not kind.health_says_loaded:
            draft.set("health", "none", line, "checkEndpoint")  # ready once its port accepts
        else:
            why = "none is not carried: swapd polls the engine's /health, which says when it loaded"
            draft.note(line, "checkEndpoint", why)
        return
    path = path if path.startswith("/") else "/" + path
    if path != _DEFAULT_HEALTH:
        draft.set("health", path, line, "checkEndpoint")


def _use_model_name(draft: Draft, value: Any, line: int) -> None:
    if isinstance(value, dict | list):
        why = f"expected a model name, got a {type(value).__name__}; not carried"
        draft.note(line, "useModelName", why)
    elif value is not None and value != "":  # a number is its text to llama-swap
        draft.set("use_model_name", macros.text(value), line, "useModelName")


def _serve_use_model_name(draft: Draft) -> None:
    """Have vLLM serve the name useModelName sends: it answers 404 for any other.

    swapd's vLLM backend adds ``--served-model-name`` with swapd's names unless args
    have one; llama-swap left vLLM serving what cmd said (its model path by default).
    """
    name = draft.values.get("use_model_name")
    args = draft.values.get("args", [])
    kind = _kind(draft)
    if kind is None or kind.served_name_flag is None or name is None:
        return
    flag = kind.served_name_flag
    if has_flag(args, flag, argparse=True):
        return
    line, _ = draft.origins["use_model_name"]
    at, source = draft.origins.get("args", (line, "useModelName"))
    draft.set("args", [*args, flag, name], at, source)
    why = f"{kind.name} serves only the names it is given: {flag} {name} added to args"
    draft.note(line, "useModelName", why)


def _filters(draft: Draft, value: Any, line: int) -> None:
    if not isinstance(value, dict):
        draft.note(line, "filters", f"expected a mapping, got {type(value).__name__}")
        return
    filters: dict[str, Any] = {}
    for key, setting in value.items():
        if key in ("stripParams", "strip_params"):
            if strip := _strip_params(draft, setting, line, key):
                filters["strip_params"] = strip
        elif key == "setParams" and isinstance(setting, dict):
            if kept := _set_params(draft, setting, line):
                filters["set_params"] = kept
        elif key == "setParamsByID":
            _set_params_by_id(draft, setting, line)
        else:
            draft.note(line, f"filters.{key}", "not a filter swapd knows; not carried")
    if filters:
        draft.set("filters", filters, line, "filters")


def _strip_params(draft: Draft, setting: Any, line: int, key: str) -> list[str]:
    """llama-swap's comma-separated list, each name once, less what swapd never strips."""
    if isinstance(setting, list):
        why = 'a list: read as its names (llama-swap takes them as one text, "a, b")'
        draft.note(line, f"filters.{key}", why)
    items = setting if isinstance(setting, list) else str(setting or "").split(",")
    strip = list(dict.fromkeys(name for name in (str(item).strip() for item in items) if name))
    for name in [p for p in strip if p in _PROTECTED]:
        draft.note(line, f"filters.{key}", f"{name} is never stripped in swapd; dropped")
    return [name for name in strip if name not in _PROTECTED]


def _set_params(draft: Draft, setting: dict[str, Any], line: int) -> dict[str, Any]:
    for name in [p for p in setting if p in _PROTECTED]:
        why = f"{name} is never set by swapd's filters (use_model_name renames the model)"
        draft.note(line, "filters.setParams", f"{why}; dropped")
    kept = _dates_as_text({name: v for name, v in setting.items() if name not in _PROTECTED})
    try:
        json_value(kept, "filters.setParams", ())
    except ValueError as exc:
        draft.note(line, "filters.setParams", f"{exc}; dropped")
        return {}
    return dict(kept)


def _set_params_by_id(draft: Draft, setting: Any, line: int) -> None:
    """llama-swap makes each id an alias: kept as one, so requests for it still reach us."""
    ids = [str(key) for key in setting] if isinstance(setting, dict) else []
    routed = [model_id for model_id in ids if model_id != draft.model_id]
    why = "not carried: swapd has no per-alias parameters; a preset per variant does that"
    if routed:
        why += f" ({', '.join(routed)}: aliases here, without those parameters)"
    draft.note(line, "filters.setParamsByID", why)
    _add_aliases(draft, routed, line, "filters.setParamsByID")


def _metadata(draft: Draft, value: Any, line: int) -> None:
    if not isinstance(value, dict) or not value:
        if value:
            draft.note(line, "metadata", f"expected a mapping, got {type(value).__name__}")
        return
    value = _dates_as_text(value)
    try:
        json_value(value, "metadata", ())
    except ValueError as exc:
        draft.note(line, "metadata", f"{exc}; dropped")
        return
    draft.set("metadata", value, line, "metadata")


def _dates_as_text(value: Any) -> Any:
    """``value`` with YAML's dates and times as ISO text, as JSON can carry them."""
    if isinstance(value, dict):
        return {k: _dates_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_dates_as_text(v) for v in value]
    if isinstance(value, dt.date):  # a datetime is a date too
        return value.isoformat()
    return value


def _unlisted(draft: Draft, value: Any, line: int) -> None:
    unlisted = flag(value)
    if unlisted is None and value is not None:  # null: llama-swap's default, false
        draft.note(line, "unlisted", f"expected true or false, got {value!r}; not carried")
    elif unlisted:
        draft.set("unlisted", value=True, line=line, source="unlisted")


def _concurrency(draft: Draft, value: Any, line: int) -> None:
    if value is None:
        return  # llama-swap's default
    if not _whole(value):
        why = f"expected a whole number, got {value!r}; not carried"
        draft.note(line, "concurrencyLimit", why)
        return
    if value < 1:
        return  # 0: llama-swap's internal default, no limit of the user's
    draft.set("concurrency", value, line, "concurrencyLimit")
    why = (
        f"carried as concurrency: {value}, requests at the backend at once; llama-swap "
        "counted queued requests too and answered 429 past it (max_queue: 0 comes closest)"
    )
    draft.note(line, "concurrencyLimit", why)


# Read with each other once every key has been seen (see _timers and _describe).
_READ_TOGETHER = frozenset({"ttl", "unloadTimeout", "proxy", "name", "description"})

_HANDLERS: dict[str, Callable[[Draft, Any, int], None]] = {
    "aliases": _aliases,
    "env": _env,
    "checkEndpoint": _health,
    "useModelName": _use_model_name,
    "filters": _filters,
    "metadata": _metadata,
    "unlisted": _unlisted,
    "concurrencyLimit": _concurrency,
}


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def duration(seconds: int) -> str:
    """Seconds as a swapd duration: ``10m`` reads better than ``600s``."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _timers(draft: Draft, values: dict[str, Any], entries: dict[str, Entry], top: Globals) -> None:
    """ttl (or globalTTL), healthCheckTimeout as start_timeout, unloadTimeout as stop_timeout."""
    ttl = values.get("ttl", -1)
    at = _line(entries["ttl"]) if "ttl" in entries else draft.line
    if not _whole(ttl) or ttl < -1:
        draft.note(at, "ttl", f"expected whole seconds, got {ttl!r}; not carried")
        ttl = -1
    seconds = top.ttl if ttl == -1 else ttl
    if seconds > 0:
        draft.set("ttl", duration(seconds), at, "ttl" if ttl != -1 else "globalTTL")
    if top.start_timeout:
        draft.set("start_timeout", duration(top.start_timeout), draft.line, "healthCheckTimeout")
    stop = values.get("unloadTimeout", top.stop_timeout)
    if _whole(stop) and stop == 0:  # llama-swap's default for a model: the global one
        stop = top.stop_timeout
    stop_at = _line(entries["unloadTimeout"]) if "unloadTimeout" in entries else draft.line
    if stop is not None and not (_whole(stop) and stop >= 0):
        draft.note(stop_at, "unloadTimeout", f"expected whole seconds, got {stop!r}; not carried")
    elif stop:
        draft.set("stop_timeout", duration(stop), stop_at, "unloadTimeout")
    proxy = values.get("proxy")
    if proxy is not None and proxy not in _DEFAULT_PROXIES:
        why = (
            "not carried: swapd reaches the backend at 127.0.0.1 on the port it picks "
            "(${PORT} in cmd)"
        )
        draft.note(_line(entries["proxy"]), "proxy", why)


def _describe(draft: Draft, values: dict[str, Any], entries: dict[str, Entry]) -> None:
    """llama-swap's display name and description as one description: the name first."""
    name, text = values.get("name"), values.get("description")
    if name and text:
        draft.set("description", f"{name}: {text}", _line(entries["description"]), "description")
        why = "swapd has no display name: it leads the description"
        draft.note(_line(entries["name"]), "name", why)
    elif name or text:
        key = "name" if name else "description"
        draft.set("description", str(name or text), _line(entries[key]), key)


def _env_macros_where_unread(draft: Draft) -> None:
    for key, value in draft.values.items():
        if key not in _ENV_MACRO_KEYS and "${env." in yaml.safe_dump(value):
            line, source = draft.origins[key]
            why = (
                "${env.NAME} is read by swapd in model, binary, args, cmd and env only: "
                f"{key} keeps it as text"
            )
            draft.note(line, source, why)
