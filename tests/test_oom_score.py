"""Under memory pressure the kernel's OOM killer picks a backend before swapd."""

from __future__ import annotations

from pathlib import Path

from conftest import StartDaemon
from daemon import fake_preset

from swapd import oom


def test_a_backend_is_the_oom_killers_choice_before_swapd(start_daemon: StartDaemon) -> None:
    """Each backend's ``oom_score_adj`` is swapd's plus the margin, set at its spawn.

    The ram tier's locked pages count in swapd's own score: without this the killer
    picked swapd (a backend inherits its value), and every backend went down with it.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.proc is not None
    Path(f"/proc/{d.proc.pid}/oom_score_adj").write_text("100")  # raising needs no privilege
    assert d.chat("a")[0] == 200
    backend = d.model("a")["pid"]
    assert oom.adjustment(backend) == 100 + oom.MARGIN
    assert oom.adjustment(d.proc.pid) == 100
