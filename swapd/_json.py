"""JSON request bodies: a nesting cap checked before parsing, and a scan for the model.

Python's parser recurses once per level, so a body nested a few thousand levels
deep raises RecursionError; backends written in C++ may overflow their stack on
it. swapd refuses anything deeper than :data:`MAX_DEPTH` with a 400 before it
parses. The check costs two byte counts for ordinary bodies; only a body with
more brackets than the cap is scanned, at C speed: escapes are dropped so that
every remaining quote opens or closes a string, the strings are dropped by a
split on quotes, ``translate`` keeps the brackets and ``accumulate`` finds the
deepest point.

:func:`top_level_string` finds one key's string value with the same tricks,
without building the document: ``json.loads`` makes an object of every string
and number, 260 us for 40 KB of token ids where the scan takes 57 us, 70 against
28 us for a 29 KB chat full of escapes, 15 against 11 us for 16 KB of plain
text; a small request costs both about 2 us. The key is read from the start of
the body, or from its end: SDKs that write ``messages`` first put ``model`` after
a long prompt, and only the bytes after the member need reading there. It answers
only when the bytes settle the question; anything unusual (an escape in the key
or value, a key not plainly at the top level, or far from both ends) returns
None and the caller parses in full, under the same nesting cap.
"""

from __future__ import annotations

import functools
import json
import re
from itertools import accumulate
from typing import Any

from swapd.errors import BadRequest, TooDeep

# Far deeper than any OpenAI request (tool schemas nest a dozen levels or so).
MAX_DEPTH = 128
# Opening brackets become +1 and closing ones -1 (0xff read as a signed byte).
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NOT_QUOTES_OR_BRACKETS = bytes(b for b in range(256) if b not in b'"[]{}')
_PARENS = bytes.maketrans(b"[{]}", b"(())")  # one kind of bracket: only depth matters
_SIGNS_OF_PARENS = bytes.maketrans(b"()", b"\x01\xff")
_WS = b" \t\n\r"
# How far into the body the key may start: locating strings before it costs about
# three times what json.loads spends on the same bytes, so past this a parse is cheaper.
SCAN_PREFIX = 1024
# After a key: the colon and a plain string (no escapes, no control characters) that
# ends the member.
_STRING_MEMBER = re.compile(rb'[ \t\n\r]*:[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*[,}]')


def depth(body: bytes) -> int:
    """How deep arrays and objects nest in ``body`` (brackets inside strings do not count).

    Only quotes and brackets matter once the escapes are gone, so the rest is dropped
    first; then every ``""`` pair, which leaves what lies outside the strings as it was
    (an empty string, or one string's end next to the next one's start). What is left
    to split is the few strings that hold brackets: a chat of a thousand messages
    splits into a handful of pieces instead of eight thousand.
    """
    quotes_and_brackets = _unescaped(body).translate(None, _NOT_QUOTES_OR_BRACKETS)
    walk = _outside_strings(quotes_and_brackets.replace(b'""', b"")).translate(_PARENS)
    # Each round drops every innermost pair, so a balanced nest one level shallower;
    # while rounds halve the walk this costs less than a step-by-step sum over it.
    rounds = 0
    while (shorter := walk.replace(b"()", b"")) and len(shorter) * 2 <= len(walk):
        walk, rounds = shorter, rounds + 1
    if not shorter:
        return rounds + (walk != b"")  # one more round empties it
    signs = walk.translate(_SIGNS_OF_PARENS)
    return rounds + max(accumulate(memoryview(signs).cast("b")), default=0)


def _unescaped(body: bytes) -> bytes:
    # Left to right, as a JSON reader sees them: an escaped backslash, then an escaped quote.
    return body.replace(b"\\\\", b"").replace(b'\\"', b"")


def _outside_strings(body: bytes) -> bytes:
    return b"".join(_unescaped(body).split(b'"')[::2])  # the pieces between strings


def check_depth(body: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`TooDeep` when ``body`` nests deeper than ``limit``."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return  # not enough brackets to nest that deep
    if depth(body) > limit:
        raise TooDeep(limit)


def loads(body: bytes, limit: int = MAX_DEPTH) -> Any:
    """Parse a JSON body, or raise :class:`BadRequest` (:class:`TooDeep` for deep nesting)."""
    check_depth(body, limit)
    return parse_checked(body, limit)


def parse_checked(body: bytes, limit: int = MAX_DEPTH) -> Any:
    """Parse a JSON body whose depth :func:`check_depth` has passed; :class:`BadRequest`."""
    try:
        return json.loads(body)
    except RecursionError as exc:  # the scan above makes this unreachable; kept as a net
        raise TooDeep(limit) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc


def top_level_string(body: bytes, key: str) -> str | None:
    r"""The string ``json.loads(body)[key]`` would give, when a byte scan can tell; else None.

    None is no verdict: the body may still be valid, hold the key, or be broken. A
    verdict needs the key's last occurrence (the parser keeps the last of duplicates)
    to be a member of the top-level object, outside every string, with a plain string
    value, and to start within the first :data:`SCAN_PREFIX` bytes or end near the
    body's end (:func:`_near_the_end`); and no ``\u`` escape may spell one of the key's
    letters (an escaped duplicate would be invisible to the byte search). The rest of
    the body is not validated. Linear in the body's length, in C.
    """
    quoted = f'"{key}"'.encode()
    at = body.rfind(quoted)
    if at < 0:
        return None
    member = _STRING_MEMBER.match(body, at + len(quoted))
    if member is None or _escapes_a_letter(body, key):
        return None
    if at <= SCAN_PREFIX:
        placed = _member_of_top(body[: at + 1])
    elif _near_the_end(len(body), member.end()):
        placed = _last_member_of_top(body, at, member.end() - 1)
    else:
        return None  # far from both ends: reading the strings around it costs more
    if not placed:
        return None
    try:
        return member.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _near_the_end(size: int, end: int) -> bool:
    """Whether reading from ``end`` to the end of the body costs less than a parse."""
    return size - end <= max(SCAN_PREFIX, size // 4)


# A run of backslashes longer than this before the key's quote: left to the parser.
_MAX_BACKSLASHES = 64


def _last_member_of_top(body: bytes, at: int, after: int) -> bool:
    """Whether the member whose name opens at ``at`` is in the object the body's end closes.

    Read from the end, without the bytes before it: a quote not escaped by a backslash
    is where a string opens or closes, and ``"model"`` cannot be a string's closing
    quote followed by more letters in a valid body, so the name is a string of its
    own. ``after`` is the separator after its value (``,`` or ``}``), outside every
    string; from there the brackets, strings left out, must close exactly one object,
    with the body's last byte. A body that is not valid JSON can still be read here;
    its backend answers it.
    """
    before = body[max(0, at - _MAX_BACKSLASHES - 1) : at]
    slashes = len(before) - len(before.rstrip(b"\\"))
    if slashes % 2 or slashes > _MAX_BACKSLASHES:
        return False  # escaped (inside a string), or a run too long to judge here
    opener = body[max(0, at - 256) : at].rstrip(_WS)[-1:]
    if opener not in {b"{", b","}:
        return False  # not where a member starts
    rest = body[after:].rstrip(_WS)
    if not rest.endswith(b"}"):
        return False
    running = list(
        accumulate(memoryview(_outside_strings(rest).translate(_SIGNS, _NOT_BRACKETS)).cast("b"))
    )
    if not running:
        return False  # the closing brace lies inside a string: not JSON, the parser says why
    # Never below the member's own object until the last byte, which closes it.
    return running[-1] == -1 and min(running[:-1], default=0) >= 0


def _member_of_top(head: bytes) -> bool:
    """Whether the quote that ends ``head`` opens a member name of the top-level object."""
    before = head[:-1]
    if (len(before) - len(before.rstrip(b"\\"))) % 2:
        return False  # an odd run of backslashes escapes it: inside a string ("\\"model")
    head = _unescaped(head)
    if not head.endswith(b'"'):
        return False  # the quote is escaped: inside a string
    pieces = head.split(b'"')
    if len(pieces) % 2:
        return False  # an odd number of quotes before it: it closes a string
    outside = b"".join(pieces[:-1:2])
    stripped = outside.strip(_WS)
    if stripped[:1] != b"{" or stripped[-1:] not in {b"{", b","}:
        return False  # the body is not an object, or this is not where a member starts
    running = list(accumulate(memoryview(outside.translate(_SIGNS, _NOT_BRACKETS)).cast("b")))
    # At depth one, and never back to zero (that would be after the object closed).
    return running[-1] == 1 and min(running) >= 1


def _escapes_a_letter(body: bytes, key: str) -> bool:
    # A one-byte test runs at memchr speed; most bodies without a backslash stop here.
    return b"\\" in body and _escapes_of(key).search(body) is not None


@functools.cache
def _escapes_of(key: str) -> re.Pattern[bytes]:
    r"""``\uXXXX`` escapes of the key's characters, hex digits in either case."""
    hex_digits = (f"{ord(c):04x}" for c in sorted(set(key)))
    spelled = ("".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in h) for h in hex_digits)
    return re.compile(rb"\\u(?:" + "|".join(spelled).encode() + rb")")
