"""A bounded buffer of a backend's most recent output lines."""

from __future__ import annotations

from collections import deque


class RingLog:
    """Keeps the last ``capacity`` lines a backend printed, for errors and ``/swapd/logs``."""

    def __init__(self, capacity: int = 500) -> None:
        self._lines: deque[str] = deque(maxlen=capacity)
        self.total = 0  # lines ever appended: a follower's cursor (``swapd logs -f``)

    def append(self, line: str) -> None:
        """Remember one line (without its newline)."""
        self._lines.append(line)
        self.total += 1

    def since(self, cursor: int) -> tuple[list[str], int]:
        """Lines appended after ``cursor`` (those still kept), and the new cursor."""
        return self.tail(self.total - cursor), self.total

    def tail(self, count: int = 20) -> list[str]:
        """The last ``count`` lines, oldest first."""
        if count <= 0:
            return []
        return list(self._lines)[-count:]

    def clear(self) -> None:
        """Forget everything, as at a fresh start of the backend."""
        self._lines.clear()
