r"""A backend's output cut into lines, each bounded, as a terminal would show them.

Backends print what they like: a line of megabytes without a newline, a progress
bar redrawn with carriage returns thousands of times. Each line keeps at most
:data:`MAX_LINE_BYTES` (the rest is counted and said), a carriage return starts
the line over (``\r\n`` still ends one), and every read is split on its own, so
a long line costs time in proportion to its length, not its square.
"""

from __future__ import annotations

MAX_LINE_BYTES = 8 * 1024


class OutputLines:
    """Feed reads of output; take back the lines they complete."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._cut = 0  # bytes of the current line past MAX_LINE_BYTES, dropped
        self._cr_pending = False  # the last read ended in "\r": a "\n" or more text decides

    def feed(self, chunk: bytes) -> list[str]:
        r"""The lines this read completes (ended by ``\n``), decoded and bounded."""
        *ended, rest = chunk.split(b"\n")
        lines = []
        for piece in ended:
            self._add(piece)
            lines.append(self._take())
        self._add(rest)
        return lines

    def finish(self) -> str | None:
        """The last line, if the output ended without a newline."""
        if not self._parts and not self._cut:
            return None
        return self._take()

    def _add(self, piece: bytes) -> None:
        if not piece:
            return
        if self._cr_pending:
            self._restart()  # a carriage return, not half of "\r\n": the line starts over
        redrawn = piece.rfind(b"\r", 0, len(piece) - 1)
        if redrawn >= 0:
            self._restart()
            piece = piece[redrawn + 1 :]
        ends_with_cr = piece.endswith(b"\r")  # noted before a cut could drop it
        room = MAX_LINE_BYTES - self._size
        if len(piece) > room:
            self._cut += len(piece) - room
            piece = piece[:room]
        if piece:
            self._parts.append(piece)
            self._size += len(piece)
        self._cr_pending = ends_with_cr

    def _take(self) -> str:
        line = b"".join(self._parts).decode("utf-8", "replace").rstrip("\r")
        if self._cut:
            line += f" ...[{self._cut} bytes cut]"
        self._restart()
        return line

    def _restart(self) -> None:
        self._parts.clear()
        self._size = 0
        self._cut = 0
        self._cr_pending = False
