"""What the importer could not carry over, each at the line of config.yaml it read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Note:
    """One llama-swap setting swapd does not take as written, and why."""

    line: int
    key: str  # its path in config.yaml, as models.qwen.cmdStop
    why: str

    def render(self, file: str) -> str:
        """``config.yaml:LINE: KEY: why``, as swapd's own config errors read."""
        return f"{file}:{self.line}: {self.key}: {self.why}"
