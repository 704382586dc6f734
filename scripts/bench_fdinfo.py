"""What one DRM fdinfo scan costs: the per-process VRAM reader the AMD probes fall back to.

Two scans, each timed over ``--runs`` repetitions (median and p99):

* ``fake``: a /proc tree written to a temporary folder with 8 backend trees of
  3 processes each; every process has 15 non-DRM fds (stdio, pipes, sockets,
  model files, /dev/kfd) and each tree 2 DRM clients, one of them shared by the
  parent and a child, in both key styles, on two GPUs;
* ``real``: the real /proc for this process's own tree, as it is and again
  after opening as many extra fds (on /dev/null) as the fake tree has, so that
  the kernel's own readlink cost shows at the same scale. Without a GPU client
  in the tree nothing past the readlinks is read.

For scale it also times :func:`process_trees`, the process-table pass that every
probe read already makes. The scan runs in the manager's worker thread
(``asyncio.to_thread``), never on the event loop.

    python scripts/bench_fdinfo.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from swapd.probe._fdinfo import scan_vram
from swapd.probe._tree import process_trees

TREES = 8
PROCESSES_PER_TREE = 3
PLAIN_FDS = 15
PLAIN_TARGETS = ("/dev/null", "pipe:[1]", "socket:[2]", "/models/m.gguf", "/dev/kfd")
GPUS = ("0000:03:00.0", "0000:0c:00.0")
NEW_STYLE = (
    "drm-driver:\tamdgpu\ndrm-client-id:\t{client}\ndrm-pdev:\t{pdev}\n"
    "drm-total-gtt:\t9 MiB\ndrm-total-vram:\t{kib} KiB\ndrm-resident-vram:\t{kib} KiB\n"
)
OLD_STYLE = (
    "drm-driver:\tamdgpu\ndrm-pdev:\t{pdev}\ndrm-client-id:\t{client}\n"
    "drm-memory-vram:\t{kib} KiB\ndrm-memory-gtt:\t2048 KiB\n"
)
PLAIN_INFO = "pos:\t0\nflags:\t02100002\nmnt_id:\t26\nino:\t1066\n"


def _fd(proc: Path, pid: int, fd: int, target: str, info: str) -> None:
    """One fd link and its fdinfo record."""
    (proc / str(pid) / "fd" / str(fd)).symlink_to(target)
    (proc / str(pid) / "fdinfo" / str(fd)).write_text(PLAIN_INFO + info, encoding="utf-8")


def build_fake_proc(proc: Path) -> tuple[dict[int, frozenset[int]], int]:
    """Write the fake /proc; return its trees and how many fds it holds."""
    trees: dict[int, frozenset[int]] = {}
    fds = 0
    for tree in range(TREES):
        pids = [1000 + tree * 10 + n for n in range(PROCESSES_PER_TREE)]
        for pid in pids:
            (proc / str(pid) / "fd").mkdir(parents=True)
            (proc / str(pid) / "fdinfo").mkdir()
            for fd in range(PLAIN_FDS):
                _fd(proc, pid, fd, PLAIN_TARGETS[fd % len(PLAIN_TARGETS)], "")
                fds += 1
        style = NEW_STYLE if tree % 2 else OLD_STYLE
        pdev = GPUS[tree % len(GPUS)]
        shared = style.format(client=tree * 2, pdev=pdev, kib=1024 * 1024)
        own = style.format(client=tree * 2 + 1, pdev=pdev, kib=256 * 1024)
        # The parent and its first child share one client (an fd kept across fork).
        _fd(proc, pids[0], PLAIN_FDS, "/dev/dri/renderD128", shared)
        _fd(proc, pids[1], PLAIN_FDS, "/dev/dri/renderD128", shared)
        _fd(proc, pids[1], PLAIN_FDS + 1, "/dev/dri/renderD128", own)
        fds += 3
        trees[pids[0]] = frozenset(pids)
    return trees, fds


def timed(action: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median and p99 of ``action``'s wall time in milliseconds, after one warm-up call."""
    action()
    samples: list[float] = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        action()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def main() -> None:
    """Build the fake tree, time both scans, print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    print(f"Python {platform.python_version()} on {platform.system()} {platform.release()}")
    print(f"{'scan':<28} {'fds':>5} {'median ms':>10} {'p99 ms':>8}")
    with tempfile.TemporaryDirectory() as folder:
        proc = Path(folder)
        trees, fds = build_fake_proc(proc)
        found = scan_vram(trees, proc)
        # A broken fake tree would time a scan that gives up early.
        if found.unreadable is not None or sum(map(len, found.vram.values())) != TREES:
            raise SystemExit(f"fake /proc is not read as built: {found}")
        median, p99 = timed(lambda: scan_vram(trees, proc), args.runs)
        print(f"{'fake /proc, 8 trees':<28} {fds:>5} {median:>10.3f} {p99:>8.3f}")
    own = process_trees([os.getpid()])
    for label, extra in (("real /proc, this tree", 0), ("real /proc, + /dev/null fds", fds)):
        opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(extra)]
        try:
            count = sum(len(list(Path(f"/proc/{pid}/fd").iterdir())) for pid in own[os.getpid()])
            median, p99 = timed(lambda: scan_vram(own), args.runs)
        finally:
            for fd in opened:
                os.close(fd)
        print(f"{label:<28} {count:>5} {median:>10.3f} {p99:>8.3f}")
    median, p99 = timed(lambda: process_trees([os.getpid()]), max(1, args.runs // 10))
    print(f"{'process_trees (for scale)':<28} {'-':>5} {median:>10.3f} {p99:>8.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
