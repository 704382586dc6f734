"""Durations ("10m", "1.5s") and sizes ("6GiB", "512MB") as users write them in YAML."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}


# Beyond any timer a daemon keeps (and finite: status is JSON, timers take floats).
MAX_DURATION_S = 100 * 365 * 86400.0
MAX_SIZE = 2**63 - 1


def _cut(text: str) -> str:
    """Text for an error message, cut short: a config may hold anything."""
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def parse_duration(value: object) -> float:
    """Seconds from ``10m``, ``90s``, ``250ms``, ``2h`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration like "10m", got {value!r}')
    if isinstance(value, int | float):
        seconds = _as_float(value)
        if not 0 <= seconds <= MAX_DURATION_S:
            raise ValueError(f"expected a duration from 0 to 100 years, got {_cut(repr(value))}")
        return seconds
    match = _DURATION.match(str(value))
    if match is None:
        raise ValueError(f'expected a duration like "10m", got "{_cut(str(value))}"')
    seconds = _as_float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if not seconds <= MAX_DURATION_S:
        raise ValueError(f'expected a duration from 0 to 100 years, got "{_cut(str(value))}"')
    return seconds


def _as_float(number: float | str) -> float:
    """A float, or inf where the number is too large for one (never OverflowError)."""
    try:
        return float(number)
    except OverflowError:
        return math.inf


def parse_positive_duration(value: object) -> float:
    """A duration that must be above zero: a timeout, an interval."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, like 10s, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``6GiB``, ``512MB``, ``1.5G`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f'expected a size like "6GiB", got {value!r}')
    if isinstance(value, int):
        if not 0 <= value <= MAX_SIZE:
            raise ValueError(f"expected a size from 0 to 8 EiB, got {_cut(repr(value))}")
        return value
    match = _SIZE.match(str(value))
    if match is None:
        raise ValueError(f'expected a size like "6GiB", got "{_cut(str(value))}"')
    unit = (match.group(2) or "b").lower()
    nbytes = _as_float(match.group(1)) * _SIZE_UNITS[unit]
    if not nbytes <= MAX_SIZE:
        raise ValueError(f'expected a size from 0 to 8 EiB, got "{_cut(str(value))}"')
    # Round, not truncate: 2.01 * 1000 is 2009.999... in binary floating point.
    return round(nbytes)


def format_size(nbytes: float) -> str:
    """Human-readable GiB/MiB for messages: ``7.9 GiB``, ``512.0 MiB``."""
    if abs(nbytes) >= 1024**3:
        return f"{nbytes / 1024**3:.1f} GiB"
    return f"{nbytes / 1024**2:.1f} MiB"
