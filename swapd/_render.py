"""How the CLI prints what swapd answers: plain tables for people, sizes and times in words."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
# C0 but tab and newline, DEL, and C1: what a terminal would act on rather than show.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    r"""Text for a terminal, its control characters written out (``\x1b``).

    A backend prints what clients send it (llama-server's ``--verbose`` logs prompts): an
    escape sequence passed on raw could set the operator's clipboard or hide lines.
    """
    return _CONTROLS.sub(lambda found: f"\\x{ord(found.group()):02x}", str(text))


def size(nbytes: int | None) -> str:
    """``6.2 GiB``; ``-`` for none."""
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def duration(seconds: float | None) -> str:
    """``45s``, ``4m10s``, ``2h05m``; ``-`` for none."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def ago(wall: float | None, now: float | None = None) -> str:
    """``3m20s ago``; ``never`` for none."""
    if wall is None:
        return "never"
    return f"{duration(max(0.0, (now or time.time()) - wall))} ago"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell; numbers read as well left-aligned here."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def status(body: dict[str, Any]) -> str:
    """``swapd status``: one row per model, then the errors of those that have one."""
    rows = []
    errors = []
    for m in body["models"]:
        memory = m["memory"]
        shown = memory.get("measured") or memory.get("need")
        rows.append(
            [
                m["name"],
                m["state"],
                m["tier"],
                m["pid"] or "-",
                m["port"] or "-",
                m["device"] or "-",
                m["in_flight"],
                m["waiting"],
                size(shown),
                duration(m.get("ttl_left")),
                duration(max(0.0, time.time() - m["since"])),  # a time in it, not "ago"
                ago(m["last_used"]),
            ]
        )
        if m.get("error"):
            errors.append(f"{m['name']}: {printable(m['error'])}")
    header = (
        "MODEL",
        "STATE",
        "TIER",
        "PID",
        "PORT",
        "DEVICE",
        "IN-FLIGHT",
        "WAITING",
        "MEMORY",
        "TTL LEFT",
        "IN STATE FOR",
        "LAST USED",
    )
    out = table(header, rows) if rows else "no models configured"
    if errors:
        out += "\n\nerrors:\n" + "\n".join(f"  {e}" for e in errors)
    return out


def plan(body: dict[str, Any]) -> str:
    """``swapd plan``: each device's room and what fits there together, then every model."""
    devices = [
        [
            d["device"],
            size(d["total"]),
            size(d["outside"]),
            size(d["capacity"]),
            size(d["used"]),
            ", ".join(d["together"]) or "-",
        ]
        for d in body["devices"]
    ]
    out = table(("DEVICE", "TOTAL", "OTHERS USE", "ROOM", "PACKED", "FIT TOGETHER"), devices)
    models = [
        [m["name"], size(m["need"]), m["source"], m["fit"], m["device"] or "-", m["reason"] or ""]
        for m in body["models"]
    ]
    if models:
        out += "\n\n" + table(("MODEL", "NEED", "FROM", "FITS", "DEVICE", "NOTE"), models)
    return out


def progress(view: dict[str, Any], started: float, now: float | None = None) -> str:
    """One line of ``swapd load``: the model, its state, bytes staged, time since ``started``."""
    parts = [view["name"], view["state"]]
    staging = view.get("staging")
    if staging and staging.get("waiting"):
        parts.append(f"staging waits for room in the cache ({size(staging['total'])})")
    elif staging:
        parts.append(f"staging {size(staging['done'])} of {size(staging['total'])}")
    parts.append(duration(max(0.0, (now or time.time()) - started)))
    return "  ".join(parts)
