"""Which boot of the machine this is: what an earlier boot recorded names no live process."""

from __future__ import annotations

from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def kernel_boot_id() -> str | None:
    """The kernel's random id of this boot; None where it gives none."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None
