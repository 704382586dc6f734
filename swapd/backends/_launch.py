"""What every kind shares when launching: ports, flags, environment, binary lookup errors."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swapd.presets import Preset

LOOPBACK = "127.0.0.1"
# Inherited variables that belong to swapd alone: systemd's notify socket and watchdog.
_PRIVATE_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "SWAPD_KEY",  # the CLI's admin key, when the operator exported it
)


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one backend and talk to it."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    host: str
    port: int
    health_path: str | None  # None: ready once its port accepts a connection
    # Headers swapd adds to every request it forwards: the backend's own key, when it has one.
    headers: tuple[tuple[bytes, bytes], ...] = ()


class BinaryNotFound(Exception):
    """No executable for a backend kind; the message says where swapd looked."""


def search_path() -> str:
    """The PATH that executables are looked up in, for error messages."""
    return os.environ.get("PATH", os.defpath)


def why_not_runnable(program: str) -> str:
    """Why ``program``, which ``shutil.which`` did not find, cannot be run: where swapd looked.

    A bare name is looked up on PATH; a path (one with a ``/``) is taken as it is, a relative
    one from swapd's working folder: the file is missing there, or is not executable.
    """
    if os.sep not in program:
        return f"not found or not executable (searched PATH={search_path()})"
    path = Path(program)
    shown = program
    if not path.is_absolute():
        shown += f" (from the working folder: {path.absolute()})"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"not found: no file at {shown}"
    except OSError as exc:  # a folder on the way that is a file, or one it may not enter
        return f"cannot be reached at {shown}: {exc.strerror}"
    if stat.S_ISDIR(mode):
        return f"is a directory, not a program: {shown}"
    return f"is not executable: the file at {shown} may not be run (chmod +x it)"


def free_port() -> int:
    """A TCP port that is free on loopback right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def has_flag(args: Sequence[str], *names: str, argparse: bool = False) -> bool:
    """Whether ``args`` sets any of ``names`` (``--flag value`` or ``--flag=value``)."""
    return flag_as_written(args, *names, argparse=argparse) is not None


def flag_as_written(args: Sequence[str], *names: str, argparse: bool = False) -> str | None:
    """The argument of ``args`` that sets one of ``names``, as written; None if none does.

    With ``argparse``, also the spellings vLLM's parser reads as the same flag: ``_`` for
    ``-`` in a long name (``--api_key``), and a long name cut short (``--api-ke``), which
    argparse takes for the one flag it starts (a cut that starts several is refused there).
    """
    for arg in args:
        written = arg.split("=", 1)[0]
        if written in names:
            return arg
        if argparse and written.startswith("--") and len(written) > 2:
            spelled = "--" + written[2:].replace("_", "-")
            if any(name.startswith(spelled) for name in names if name.startswith("--")):
                return arg
    return None


def flag_value(args: Sequence[str], *names: str, argparse: bool = False) -> str | None:
    """The value the last argument setting one of ``names`` gives it; None if none does.

    The last, as argparse keeps it where a flag is given twice. ``--flag value`` or
    ``--flag=value``; "" where the flag ends the argv without one. Spellings as
    :func:`flag_as_written` reads them.
    """
    for i in reversed(range(len(args))):
        arg = args[i]
        if flag_as_written([arg], *names, argparse=argparse) is None:
            continue
        if "=" in arg:
            return arg.split("=", 1)[1]
        return args[i + 1] if i + 1 < len(args) else ""
    return None


def child_env(preset: Preset, device_env: Mapping[str, str]) -> dict[str, str]:
    """The inherited environment less swapd's own, plus the device and the preset's variables."""
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
    env.update(device_env)
    env.update(preset.env)
    return env


def explicit_binary(preset: Preset) -> str | None:
    """The preset's ``binary:`` resolved on PATH, None when it sets none."""
    import shutil

    if not preset.binary:
        return None
    found = shutil.which(preset.binary)
    if found is None:
        why = why_not_runnable(preset.binary)
        raise BinaryNotFound(f"binary {preset.binary!r} {why}; fix binary: in {preset.file}")
    return found
