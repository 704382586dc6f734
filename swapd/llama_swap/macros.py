"""llama-swap's macros: ``${name}`` replaced in a model's values before they are mapped.

A model's own macros override the global ones, and ``${MODEL_ID}`` is the model's
id. A macro may use another (llama-swap substitutes one macro at a time, last
defined first): here every value is substituted again until nothing changes.
A value that is exactly one macro takes the macro's type (``ctx: ${ctx}`` stays
a number in ``metadata``). ``${PORT}`` is left for swapd, which picks the port at
each start, and ``${env.NAME}`` for swapd's own environment macro.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from swapd._yaml import written

_MACRO = re.compile(r"\$\{([A-Za-z0-9_-]+)\}")
# Past this a value stops being expanded: a macro that uses itself, or a chain of them
# that doubles at each level, would otherwise grow without end (or for minutes).
EXPANDED_LIMIT = 64 * 1024
# Left as written: swapd's ${PORT}; ${PID} is cmdStop's, which is not carried.
KEPT = frozenset({"PORT", "PID"})


def scope(
    global_macros: Mapping[str, Any], own: Mapping[str, Any], model_id: str
) -> dict[str, Any]:
    """The macros one model sees: its own over the global ones, and its id."""
    merged = {**global_macros, **own, "MODEL_ID": model_id}
    return {name: value for name, value in merged.items() if name not in KEPT}


def expand(value: Any, macros: Mapping[str, Any]) -> Any:
    """``value`` (a string, list or mapping of them) with every known macro replaced."""
    for _ in range(len(macros) + 1):  # each pass resolves one more level of nesting
        replaced = _once(value, macros)
        if replaced == value:
            break
        value = replaced
    return value


def unknown(value: Any) -> list[str]:
    """The ``${name}`` macros still in ``value`` that swapd does not read itself."""
    if isinstance(value, str):
        return [name for name in _MACRO.findall(value) if name not in KEPT]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [name for item in items for name in unknown(item)]


def text(value: Any) -> str:
    """A scalar as it reads inside a string: ``true``, ``8192``, ``3.10`` as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return written(value)
    return str(value)


def _once(value: Any, macros: Mapping[str, Any]) -> Any:
    if isinstance(value, list):
        return [_once(item, macros) for item in value]
    if isinstance(value, dict):
        return {key: _once(item, macros) for key, item in value.items()}
    if not isinstance(value, str):
        return value
    whole = _MACRO.fullmatch(value)
    if whole and whole.group(1) in macros:
        return macros[whole.group(1)]

    def one(match: re.Match[str]) -> str:
        found = macros.get(match.group(1))
        # A mapping macro is only ever a whole value: inside text it stays as written.
        return match.group(0) if found is None or isinstance(found, dict | list) else text(found)

    replaced = _MACRO.sub(one, value)
    return value if len(replaced) > EXPANDED_LIMIT else replaced
