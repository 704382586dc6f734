"""The kernel's OOM killer: a backend goes before swapd.

The ram tier locks weight pages inside swapd's own process, and they count in swapd's
OOM score: with a tier near its default (half of RAM) the killer would pick swapd over
any one backend, and every backend would go down with it. So each backend's score is
raised by :data:`MARGIN` over swapd's own right after its spawn (raising needs no
privilege; lowering swapd's would). A killed backend is started again on demand.
"""

from __future__ import annotations

from pathlib import Path

from swapd.logs import get_logger

_log = get_logger("swapd.oom")
# Added to swapd's oom_score_adj for its backends: each 100 is 10% of memory in the
# killer's count, so swapd holding half of RAM in pages still outlasts a backend.
MARGIN = 500
_MAX = 1000  # the kernel's range is -1000..1000


def adjustment(pid: int | str) -> int:
    """A process's ``oom_score_adj`` (0, the kernel's default, when it cannot be read)."""
    try:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    except (OSError, ValueError):
        return 0


def expose(model: str, pid: int) -> None:
    """Make a just-spawned backend the OOM killer's choice before swapd."""
    value = min(_MAX, adjustment("self") + MARGIN)
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text(str(value))
    except (FileNotFoundError, ProcessLookupError):
        pass  # it exited already: nothing left to pick
    except OSError as exc:  # /proc read-only here, or a security module says no
        _log.warning("backend.oom_adjust.fail", model=model, pid=pid, error=str(exc))
