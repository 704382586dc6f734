"""A whole llama-swap config.yaml: its models, groups, hooks and global keys.

Models become presets (see :mod:`.model`). Groups are not needed: swapd admits
each load by the memory it measures, so only ``persistent: true`` carries over,
as ``pin: true`` on its members. ``hooks.on_startup.preload`` becomes
``preload: true``, and ``apiKeys`` swapd.yaml's ``api_keys``. The other global
keys configure what swapd does its own way (ports, logs, the UI, peers) and
are noted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swapd._yaml import Entry, entries_of, load_document
from swapd.errors import Location, clip
from swapd.keys import parse_keys
from swapd.llama_swap.model import Draft, Globals, convert, flag
from swapd.llama_swap.notes import Note

_STR = "tag:yaml.org,2002:str"
_BOOL = "tag:yaml.org,2002:bool"
_MAP = "tag:yaml.org,2002:map"
_MIN_HEALTH_CHECK_TIMEOUT = 15  # llama-swap raises a smaller healthCheckTimeout to this

# Global keys read into the presets or swapd.yaml below.
_READ = frozenset(
    {"models", "macros", "globalTTL", "healthCheckTimeout", "unloadTimeout", "groups",
     "routing", "hooks", "apiKeys"}
)  # fmt: skip

_GLOBAL_NOTES = {
    "startPort": "not carried: swapd picks a free port at each start (${PORT})",
    "logLevel": (
        "not carried: swapd's own log_level (debug, info, warning, error) is left at its default"
    ),
    "logTimeFormat": "not carried: swapd's events carry ISO 8601 timestamps",
    "logToStdout": (
        "not carried: swapd logs its events to stdout; backend_log sets how backend lines show"
    ),
    "logRequests": "not carried: swapd logs one event per request",
    "metricsMaxInMemory": "not carried: swapd keeps no activity history; /metrics counts requests",
    "captureBuffer": "not carried: swapd does not capture requests",
    "store": "not carried: swapd keeps no activity history; /metrics counts requests",
    "ui": "not carried: swapd has no web UI; `swapd status` and /swapd/events show the models",
    "performance": "not carried: swapd reads device memory when it admits a load",
    "includeAliasesInList": "not carried: swapd lists each model once, with its aliases",
    "sendLoadingState": (
        "not carried: swapd keeps a waiting stream open with `: loading` comment pings instead"
    ),
    "peers": ("not carried: swapd serves one host; docs/scale-out.md puts several behind LiteLLM"),
    "matrix": "not carried: swapd admits by measured memory; no sets of models are declared",
    "profiles": "not carried: swapd has no runtime model rewrites",
    "selectors": (
        "not carried: swapd has no virtual model ids; LiteLLM spreads requests over replicas "
        "(docs/scale-out.md)"
    ),
    "upstream": ("not carried: swapd's /upstream/{model}/ loads the model unless ?autoload=false"),
}
_NO_KEY_LEFT = (
    "no key carried: swapd serves every client without a key until api_keys or "
    "api_keys_file gives it one"
)
_GROUP_NOT_NEEDED = (
    "not needed: swapd loads models side by side while its measured memory allows and "
    "evicts the least used idle ones (max_running: 1 runs one at a time)"
)
_ONE_AT_A_TIME = (
    "llama-swap runs one model at a time unless groups say otherwise; swapd loads them "
    "side by side while its measured memory allows (max_running: 1 runs one at a time)"
)
_PERSISTENT = (
    "persistent carried as pin: true on {members}: swapd never evicts them, "
    "and never stops them at their ttl either"
)
_PERSISTENT_SWAP = (
    "swap: true (the default) not carried: pinned, no member is stopped to load another, "
    "so {members} run side by side, and one that does not fit beside the others is refused (503)"
)


@dataclass
class Imported:
    """What config.yaml becomes: swapd.yaml's values, one draft per model, the notes."""

    daemon: dict[str, Any] = field(default_factory=dict)
    drafts: list[Draft] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def all_notes(self) -> list[Note]:
        """Every note, the models' too, in the order of config.yaml's lines."""
        return sorted([*self.notes, *(n for d in self.drafts for n in d.notes)])


def read(path: Path) -> Imported:
    """Read llama-swap's config at ``path``; :class:`~swapd.errors.ConfigError` if it cannot be."""
    doc = load_document(path)
    file = doc.file
    entries = _as_llama_swap_reads(file, doc.entries)
    top = {entry.key: entry for entry in entries}
    found = Imported()
    for entry in entries:
        if entry.key not in _READ:
            why = _GLOBAL_NOTES.get(entry.key, "not a llama-swap key swapd knows; not carried")
            found.notes.append(Note(entry.key_where.line, entry.key, why))
    globals_ = _globals(top, path.parent.absolute(), found)
    if "models" in top:
        models = top["models"]
        for model in entries_of(file, models.node, what="models"):
            line = model.key_where.line
            found.drafts.append(convert(model.key, line, model.node, file, globals_))
        if len(found.drafts) > 1:
            found.notes.append(Note(models.key_where.line, "models", _ONE_AT_A_TIME))
    _api_keys(top.get("apiKeys"), found)
    _drop_taken_aliases(found.drafts)
    by_name = _names(found.drafts)
    if "groups" in top:
        _groups(file, top["groups"], "groups", by_name, found)
    if "routing" in top:
        _routing(file, top["routing"], by_name, found)
    if "hooks" in top:
        _hooks(file, top["hooks"], by_name, found)
    return found


def _as_llama_swap_reads(file: str, entries: tuple[Entry, ...]) -> tuple[Entry, ...]:
    """The top-level entries again, read as llama-swap's YAML (yaml.v3) reads them.

    Reading them, PyYAML merged each ``<<: *base`` into its mapping: the base's keys
    first, so a key the mapping sets again wins, as in yaml.v3, but it stays twice in
    the node, which swapd's reader refuses as a key given twice. And yaml.v3 reads
    YAML 1.1's yes, no, on and off as text: ``fa: on`` is ``--flash-attn on``.
    """
    seen: set[int] = set()
    for entry in entries:
        _as_yaml_v3(entry.node, seen)
    keys = [yaml.ScalarNode(_STR, e.key, start_mark=_mark(e.key_where)) for e in entries]
    root = yaml.MappingNode(_MAP, list(zip(keys, (e.node for e in entries), strict=True)))
    return entries_of(file, root, what="(top level)")


def _as_yaml_v3(node: yaml.Node, seen: set[int]) -> None:
    """Keep the last of each key in every mapping, and the old booleans as text."""
    if id(node) in seen:  # an anchor used again, or a node that holds itself
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if node.tag == _BOOL and node.value.lower() not in {"true", "false"}:
            node.tag = _STR
        return
    if isinstance(node, yaml.MappingNode):
        last = {_key(key): index for index, (key, _) in enumerate(node.value)}
        node.value = [pair for index, pair in enumerate(node.value) if last[_key(pair[0])] == index]
        children = [child for pair in node.value for child in pair]
    else:
        children = list(node.value)
    for child in children:
        _as_yaml_v3(child, seen)


def _key(node: yaml.Node) -> object:
    """What makes two keys of a mapping the same key: a scalar's text, else the node."""
    return node.value if isinstance(node, yaml.ScalarNode) else id(node)


def _mark(where: Location) -> yaml.Mark:
    """A node's start at ``where`` (1-based), for a node the importer builds."""
    return yaml.Mark(where.file, 0, where.line - 1, where.column - 1, None, 0)


def _seconds(entry: Entry | None, found: Imported) -> int | None:
    if entry is None:
        return None
    value = entry.value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        why = f"expected whole seconds, got {value!r}; not carried"
        found.notes.append(Note(entry.key_where.line, entry.key, why))
        return None
    return int(value)


def _globals(top: dict[str, Entry], base: Path, found: Imported) -> Globals:
    macros_entry = top.get("macros")
    macros = macros_entry.value if macros_entry and isinstance(macros_entry.value, dict) else {}
    start = _seconds(top.get("healthCheckTimeout"), found)
    return Globals(
        macros=macros,
        base=base,
        ttl=_seconds(top.get("globalTTL"), found) or 0,
        start_timeout=None if start is None else max(start, _MIN_HEALTH_CHECK_TIMEOUT),
        stop_timeout=_seconds(top.get("unloadTimeout"), found),
    )


def _api_keys(entry: Entry | None, found: Imported) -> None:
    if entry is None or not entry.value:
        return
    line = entry.key_where.line
    given = entry.value
    if isinstance(given, str):  # dropped, it would leave swapd open to anyone
        why = "expected a list of keys, got one as text (llama-swap refuses it); read as a list"
        found.notes.append(Note(line, "apiKeys", why))
        given = [given]
    elif not isinstance(given, list):
        why = f"expected a list of keys, got {type(given).__name__}; not carried"
        found.notes.append(Note(line, "apiKeys", why))
        return
    keys = []
    for number, key in enumerate(given, 1):
        try:
            parse_keys([key])
        except ValueError:
            why = f"key {number} is not one swapd takes (printable, no spaces); dropped"
            found.notes.append(Note(line, "apiKeys", why))
            continue
        if "${env." in key:
            why = f"key {number} reads the environment, which swapd's api_keys do not; dropped"
            found.notes.append(Note(line, "apiKeys", why + " (api_keys_file holds keys apart)"))
            continue
        keys.append(key)
    if not keys:  # llama-swap asked every client for a key; swapd without one asks none
        found.notes.append(Note(line, "apiKeys", _NO_KEY_LEFT))
        return
    found.daemon["api_keys"] = keys
    why = (
        f"{len(keys)} key(s) written to swapd.yaml's api_keys (mode 0600), as config.yaml "
        "held them (api_keys_file keeps them apart); /swapd/* takes admin_keys only"
    )
    found.notes.append(Note(line, "apiKeys", why))


def _drop_taken_aliases(drafts: list[Draft]) -> None:
    """Drop each alias that names another model, or that an earlier model has.

    swapd refuses a name used twice, and with it the whole layout. llama-swap sends a
    model id to that model whatever aliases say, and refuses an alias given twice.
    """
    ids = {draft.model_id for draft in drafts}
    owner: dict[str, str] = {}
    for draft in drafts:
        if "aliases" not in draft.values:
            continue
        line, _ = draft.origins["aliases"]
        kept = []
        for alias in draft.values["aliases"]:
            if alias in ids and alias != draft.model_id:
                draft.note(line, "aliases", f"{alias} is the id of model {alias}; dropped")
            elif alias in owner:
                why = f"{alias} is already an alias of {owner[alias]}; dropped"
                draft.note(line, "aliases", why)
            else:
                owner[alias] = draft.model_id
                kept.append(alias)
        if kept:
            draft.values["aliases"] = kept
        else:
            del draft.values["aliases"]


def _names(drafts: list[Draft]) -> dict[str, Draft]:
    """Each model id and alias, and the draft it names."""
    names: dict[str, Draft] = {}
    for draft in drafts:
        names[draft.model_id] = draft
        for alias in draft.values.get("aliases", ()):
            names.setdefault(alias, draft)
    return names


def _groups(file: str, entry: Entry, path: str, by_name: dict[str, Draft], found: Imported) -> None:
    for group in entries_of(file, entry.node, what=path):
        settings = {e.key: e.value for e in entries_of(file, group.node, what=group.key)}
        line, key = group.key_where.line, f"{path}.{group.key}"
        members = _members(settings.get("members"), line, key, found)
        for member in members:
            if member not in by_name:
                found.notes.append(Note(line, key, f"member {member} is no model; ignored"))
        known = [by_name[m] for m in members if m in by_name]
        if flag(settings.get("persistent")) and known:
            for draft in known:
                draft.set("pin", value=True, line=line, source=key)
            names = ", ".join(d.model_id for d in known)
            found.notes.append(Note(line, key, _PERSISTENT.format(members=names)))
            if len(known) > 1 and flag(settings.get("swap", True)) is not False:
                found.notes.append(Note(line, key, _PERSISTENT_SWAP.format(members=names)))
        else:
            found.notes.append(Note(line, key, _GROUP_NOT_NEEDED))


def _members(value: Any, line: int, key: str, found: Imported) -> list[str]:
    """A group's model ids; none (and a note) unless they are a list."""
    if value is None or isinstance(value, list):
        return [str(m) for m in value or []]
    why = f"members: expected a list of model ids, got {clip(repr(value))}; ignored"
    found.notes.append(Note(line, key, why))
    return []


def _routing(file: str, entry: Entry, by_name: dict[str, Draft], found: Imported) -> None:
    for part in entries_of(file, entry.node, what="routing"):
        line, key = part.key_where.line, f"routing.{part.key}"
        if part.key != "router":
            why = "not carried: swapd serves requests for a model in order, with no priorities"
            found.notes.append(Note(line, key, why))
            continue
        for router in entries_of(file, part.node, what=key):
            sub = f"{key}.{router.key}"
            if router.key == "settings":
                for setting in entries_of(file, router.node, what=sub):
                    if setting.key == "groups":
                        _groups(file, setting, f"{sub}.groups", by_name, found)
                    else:
                        found.notes.append(
                            Note(setting.key_where.line, f"{sub}.{setting.key}", _GROUP_NOT_NEEDED)
                        )
            elif router.value != "group":
                found.notes.append(Note(router.key_where.line, sub, _GROUP_NOT_NEEDED))


def _hooks(file: str, entry: Entry, by_name: dict[str, Draft], found: Imported) -> None:
    for hook in entries_of(file, entry.node, what="hooks"):
        key = f"hooks.{hook.key}"
        if hook.key != "on_startup":
            found.notes.append(Note(hook.key_where.line, key, "not a hook swapd knows"))
            continue
        for action in entries_of(file, hook.node, what=key):
            line, sub = action.key_where.line, f"{key}.{action.key}"
            if action.key != "preload" or not isinstance(action.value, list):
                found.notes.append(Note(line, sub, "not a hook swapd knows"))
                continue
            for name in map(str, action.value):
                if name in by_name:
                    by_name[name].set("preload", value=True, line=line, source=sub)
                else:
                    found.notes.append(Note(line, sub, f"{name} is no model; ignored"))


def render_yaml(values: dict[str, Any]) -> str:
    """Values as YAML: short lists on one line, keys in the order given."""
    return yaml.safe_dump(
        values, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100
    )
