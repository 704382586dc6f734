"""JSON request bodies with a nesting cap, checked before the parser recurses.

Python's parser recurses once per level, so a body nested a few thousand levels
deep raises RecursionError; backends written in C++ may overflow their stack on
it. swapd refuses anything deeper than :data:`MAX_DEPTH` with a 400 before it
parses. The check costs two byte counts for ordinary bodies; only a body with
more brackets than the cap is scanned, at C speed: escapes are dropped so that
every remaining quote opens or closes a string, the strings are dropped by a
split on quotes, ``translate`` keeps the brackets and ``accumulate`` finds the
deepest point.
"""

from __future__ import annotations

import json
from itertools import accumulate
from typing import Any

from swapd.errors import BadRequest, TooDeep

# Far deeper than any OpenAI request (tool schemas nest a dozen levels or so).
MAX_DEPTH = 128
# Opening brackets become +1 and closing ones -1 (0xff read as a signed byte).
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def depth(body: bytes) -> int:
    """How deep arrays and objects nest in ``body`` (brackets inside strings do not count)."""
    # Left to right, as a JSON reader sees them: an escaped backslash, then an escaped quote.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    stripped = b"".join(unescaped.split(b'"')[::2])  # the pieces between strings
    signs = stripped.translate(_SIGNS, _NOT_BRACKETS)
    return max(accumulate(memoryview(signs).cast("b")), default=0)


def check_depth(body: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`TooDeep` when ``body`` nests deeper than ``limit``."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return  # not enough brackets to nest that deep
    if depth(body) > limit:
        raise TooDeep(limit)


def loads(body: bytes, limit: int = MAX_DEPTH) -> Any:
    """Parse a JSON body, or raise :class:`BadRequest` (:class:`TooDeep` for deep nesting)."""
    check_depth(body, limit)
    try:
        return json.loads(body)
    except RecursionError as exc:  # the scan above makes this unreachable; kept as a net
        raise TooDeep(limit) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
