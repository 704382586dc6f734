"""Per-preset request rewriting: the model a backend receives, and filtered body keys.

llama-swap's ``useModelName`` and ``filters.stripParams``/``setParams``, as the preset
keys ``use_model_name`` and ``filters: {strip_params, set_params}``. Only the bodies
of the JSON routes are rewritten (of a multipart form, only its ``model`` field is renamed,
by :func:`swapd.proxy.renamed_form`; ``/upstream/`` goes as sent), and
only for a preset that sets one of the keys: any other request's body reaches its
backend as the bytes the client sent, never parsed again. A rewritten body is parsed
once (its nesting is checked already: the model was read from it), changed at its top
level (stripped, then set, then the model), and written back compactly; the upstream
client sizes ``Content-Length`` from the bytes it sends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from swapd import _json as capped_json
from swapd._yaml import NestedValueError, Problems, json_value, yaml_kind
from swapd.errors import BadRequest, clip

_STRIP = "strip_params"
_SET = "set_params"
# llama-swap's spellings, named in the error a migrated preset gets.
_LLAMA_SWAP = {"stripParams": _STRIP, "setParams": _SET}
_INSTEAD = "use_model_name sets the model the backend receives"
# swapd answers a cold stream itself (pings) by the client's "stream": the backend must agree.
_STREAM = "the client chooses whether its answer streams"


@dataclass(frozen=True)
class Filters:
    """Top-level body keys a preset removes (``strip``) and sets, over the client's."""

    strip: tuple[str, ...] = ()
    set: Mapping[str, Any] = field(default_factory=dict)


def parse_filters(value: Any) -> Filters | None:
    """``filters:``; None when it asks for nothing (no rewrite, no cost per request).

    Every problem is raised, each pointed at: an unknown key, each bad item of
    ``strip_params``, each key ``set_params`` may not set.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of {_STRIP} and {_SET}, got {yaml_kind(value)}")
    problems = Problems()
    for key in value:
        if key not in (_STRIP, _SET):
            known = f"known keys: {_SET}, {_STRIP}"
            if key in _LLAMA_SWAP:
                known = f"llama-swap's {key} is {_LLAMA_SWAP[key]} here"
            problems.add(
                NestedValueError(
                    f"filters.{clip(str(key))}", (key,), f"unknown key; {known}", at_key=True
                )
            )
    strip: tuple[str, ...] = ()
    set_: dict[str, Any] = {}
    with problems.part():
        strip = _strip(value.get(_STRIP))
    with problems.part():
        set_ = _set(value.get(_SET))
    problems.raise_any()
    filters = Filters(strip, set_)
    return filters if filters.strip or filters.set else None


def _strip(value: Any) -> tuple[str, ...]:
    key = f"filters.{_STRIP}"
    if value is None:
        return ()
    if not isinstance(value, list):
        got = yaml_kind(value)
        raise NestedValueError(
            key, (_STRIP,), f"expected a list of strings like [top_k], got {got}"
        )
    problems = Problems()
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item:
            reason = f"expected a non-empty string, got {clip(repr(item))}"
            problems.add(NestedValueError(key, (_STRIP, index), reason))
        elif item == "model":
            reason = f"model cannot be stripped; {_INSTEAD}"
            problems.add(NestedValueError(key, (_STRIP, index), reason))
        elif item == "stream":
            reason = f"stream cannot be stripped; {_STREAM}"
            problems.add(NestedValueError(key, (_STRIP, index), reason))
    problems.raise_any()
    return tuple(value)


def _set(value: Any) -> dict[str, Any]:
    key = f"filters.{_SET}"
    if value is None:
        return {}
    if not isinstance(value, dict):
        got = yaml_kind(value)
        raise NestedValueError(key, (_SET,), f"expected a mapping of body keys, got {got}")
    problems = Problems()
    if "model" in value:
        reason = f"model cannot be set here; {_INSTEAD}"
        problems.add(NestedValueError(key, (_SET, "model"), reason, at_key=True))
    if "stream" in value:
        reason = f"stream cannot be set here; {_STREAM}"
        problems.add(NestedValueError(key, (_SET, "stream"), reason, at_key=True))
    converted: dict[str, Any] = {}
    for name, item in value.items():  # each body key on its own: its problems are its own
        with problems.part():
            converted.update(json_value({name: item}, key, (_SET,)))
    problems.raise_any()
    return converted


def rewrite(body: bytes, model: str | None, filters: Filters | None) -> bytes:
    """``body`` with ``filters`` applied and its model renamed ``model`` (if given).

    :class:`~swapd.errors.BadRequest` when it is not valid JSON (the scan that found
    the model does not read all of it), or holds a number that parses as infinity. A
    top level that is not an object is sent as it came: the scan found a model in it,
    so it cannot happen; were it to, the backend would answer it.
    """
    data = capped_json.parse_checked(body)
    if not isinstance(data, dict):
        return body
    if filters is not None:
        for key in filters.strip:
            data.pop(key, None)
        data.update(filters.set)
    if model is not None:
        data["model"] = model
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:
        # 1e400 parses as infinity (NaN as nan): json would write Infinity, not JSON.
        reason = "a number past a double's range, or NaN, cannot be written back as JSON"
        raise BadRequest(f"request body is refused: {reason}") from exc
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (a client's "\ud800") has no UTF-8: escaped, as it came.
        return json.dumps(data, separators=(",", ":")).encode()
