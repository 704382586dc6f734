r"""A llama-swap ``cmd`` read as one of swapd's backends.

llama-swap drops the lines that start with ``#`` before it expands macros (a
folded macro ends in a newline), then splits ``cmd`` into words as a POSIX shell
would (no shell runs it), joining lines that end with ``\``. ``llama-server -m MODEL
...`` (or a build named ``llama-server-*``) becomes a llama-server preset and
``vllm serve MODEL ...`` a vLLM one: swapd then passes the model, ``--host``
and ``--port`` itself, estimates the model's memory and may stage it. Anything else, or either
of them without a local model (``-hf`` downloads one), runs as a ``command``
preset: its argv as written, ``${PORT}`` included.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePath

from swapd.backends import KINDS

_LLAMA_SERVER = "llama-server"  # also a build named for its version: llama-server-ec9e0301
_PLAIN_LLAMA_SERVER = frozenset({_LLAMA_SERVER, f"{_LLAMA_SERVER}.exe"})
_LISTEN_FLAGS = ("--host", "--port")
# The backend's own key is swapd's to set (a new one at each start); clients send swapd's keys.
_KEY_FLAGS = {k.name: k.own_key.flags for k in KINDS.values() if k.own_key is not None}
_ANY_KEY_FLAG = frozenset(flag for flags in _KEY_FLAGS.values() for flag in flags)
KEY_WHY = (
    "dropped: swapd gives the backend a key of its own at each start; "
    "clients send one of swapd's api_keys"
)
_AS_COMMAND = "run as a command backend, whose memory swapd measures but cannot estimate or stage"
# What vLLM would fetch from the Hugging Face Hub: org/name, not a path.
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Where llama-swap's splitter (golib's shlex.Posix) ends a word, and what a backslash
# escapes inside double quotes (as in a shell: ``sh -c "... \$VAR"`` passes ``$VAR`` on).
_SPACE = " \t\n"
_ESCAPED_IN_DOUBLE = ("$", "`", '"', "\\", "\n", "")


@dataclass(frozen=True)
class Launch:
    """How swapd starts the model, and what of ``cmd`` it left out or read its own way."""

    backend: str  # llama-server, vllm or command
    binary: str | None = None
    model: str | None = None
    args: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())


def strip_comments(cmd: str) -> str:
    """``cmd`` without its comment lines, as llama-swap drops them before expanding macros."""
    return "\n".join(line for line in cmd.split("\n") if not line.strip().startswith("#"))


def split(cmd: str) -> list[str]:
    """``cmd`` as llama-swap splits it; ValueError on an unclosed quote or an empty command."""
    lines = []
    for line in strip_comments(cmd).split("\n"):
        trimmed = line.strip()
        lines.append(trimmed[:-1] + " " if trimmed.endswith("\\") else line)
    argv = _words("\n".join(lines))
    if not argv:
        raise ValueError("an empty command")
    return argv


def _words(text: str) -> list[str]:
    r"""``text`` split into words as llama-swap splits it; ValueError on an unclosed quote.

    Python's shlex keeps the backslash of ``\$`` inside double quotes, where a shell
    and llama-swap drop it.
    """
    argv: list[str] = []
    word: str | None = None  # None between words; "" for a quoted empty one
    quote = ""  # the quote open, if any
    at = 0
    while at < len(text):
        char, after = text[at], text[at + 1 : at + 2]
        at += 1
        if char == "\\" and quote != "'" and (not quote or after in _ESCAPED_IN_DOUBLE):
            at += 1
            if after not in ("\n", ""):  # a backslash before a line break joins the lines
                word = (word or "") + after
        elif char == quote:
            quote = ""
        elif quote:
            word = (word or "") + char
        elif char in "'\"":
            quote, word = char, word or ""
        elif char in _SPACE:
            if word is not None:
                argv.append(word)
            word = None
        else:
            word = (word or "") + char
    if quote:
        raise ValueError("No closing quotation")
    return argv if word is None else [*argv, word]


def read(argv: Sequence[str], local: Callable[[str], bool]) -> Launch:
    """The backend ``argv`` starts, as a swapd preset runs it; ``local``: a path that exists."""
    program = PurePath(argv[0]).name
    if program.startswith(_LLAMA_SERVER):
        return _llama_server(argv)
    if program == "vllm" and argv[1:2] == ["serve"]:
        return _vllm(argv, local)
    return Launch("command", cmd=tuple(argv))


def _llama_server(argv: Sequence[str]) -> Launch:
    model, rest = _take(argv[1:], ("-m", "--model"))
    if not model:
        why = (
            "no -m/--model (a model llama-server downloads, as -hf does)"
            if model is None
            else "-m/--model names no model file"
        )
        return Launch("command", cmd=tuple(argv), notes=(f"{why}: {_AS_COMMAND}",))
    launch = _served(_LLAMA_SERVER, argv[0], model, rest)
    program = PurePath(argv[0]).name
    if program in _PLAIN_LLAMA_SERVER:
        return launch
    why = f"{program} is read as llama-server, by its name (binary: {argv[0]})"
    return replace(launch, notes=(why, *launch.notes))


def _vllm(argv: Sequence[str], local: Callable[[str], bool]) -> Launch:
    rest = list(argv[2:])
    model, rest = _take(rest, ("--model",))
    if rest and not rest[0].startswith("-"):
        model, rest = rest[0], rest[1:]
    if not model or _hub_id(model, local):
        why = f"{model or 'no model'} is not a local path (vLLM downloads a Hub id)"
        return Launch("command", cmd=tuple(argv), notes=(f"{why}: {_AS_COMMAND}",))
    return _served("vllm", argv[0], model, rest)


def _hub_id(model: str, local: Callable[[str], bool]) -> bool:
    """``org/name`` that is no path here: what vLLM would fetch from the Hub."""
    return bool(_HUB_ID.fullmatch(model)) and not model.startswith(".") and not local(model)


def _served(backend: str, program: str, model: str, rest: list[str]) -> Launch:
    """A llama-server or vLLM preset: the listen flags and the backend's key taken out."""
    for flag in _LISTEN_FLAGS:
        _, rest = _take(rest, (flag,))
    notes: list[str] = []
    for flag in _KEY_FLAGS[backend]:
        key, rest = _take(rest, (flag,))
        if key is not None:
            notes.append(f"{flag} {KEY_WHY}")
    binary = None if program == backend else program
    return Launch(backend, binary, model, tuple(rest), notes=tuple(notes))


def key_flag(argv: Sequence[str]) -> str | None:
    """The first flag of ``argv`` that gives llama-server or vLLM a key, as written."""
    for arg in argv:
        flag = arg.partition("=")[0]
        if flag in _ANY_KEY_FLAG:
            return flag
    return None


def _take(args: Sequence[str], flags: Sequence[str]) -> tuple[str | None, list[str]]:
    """The value of the first of ``flags`` set, and ``args`` without any of them or their values."""
    value: str | None = None
    rest: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        name, eq, inline = arg.partition("=")
        if arg in flags or (eq and name in flags and name.startswith("--")):
            found = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            value = found if value is None else value
            skip = not eq
            continue
        rest.append(arg)
    return value, rest
