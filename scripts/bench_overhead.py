"""swapd's CPU per request over a fixed number of requests: this tree against a baseline.

``bench_proxy.py`` measures CPU per request over 2,000 requests a round, where the kernel's
10 ms accounting tick is 5 us a request; a change of a few percent drowns in it. This
script sends many more (8,000 by default) through one swapd at a time, alternating the
baseline and this tree round by round, so that background load hits both alike. swapd is
pinned to its own core; the client and the fake backend share the other (the ``spare``
layout of ``bench_proxy.py``).

    git worktree add /tmp/base REV
    python scripts/bench_overhead.py --baseline /tmp/base [--requests 8000] [--rounds 3]

The baseline's swapd runs with ``PYTHONPATH`` set to its checkout. Then, for this tree
alone: swapd's CPU per ``GET /metrics`` scrape with ten presets (one loaded), and how long
``POST /swapd/reload`` takes when one of the ten changed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import Daemon, fake_preset

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Say hi."}]}).encode()
WARM_UP = 1000


def cpu(pid: int) -> float:
    """User plus system CPU seconds of one process."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def send(url: str, count: int, concurrency: int) -> float:
    """``count`` chat completions from ``concurrency`` workers; requests per second."""
    left = count

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=BODY) as resp:
                await resp.read()

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


def one_round(tree: str | None, requests: int, concurrency: int) -> tuple[float, float]:
    """Microseconds of swapd CPU per request, and requests per second, for one swapd."""
    env = {"PYTHONPATH": tree} if tree else {}
    root = Path(tempfile.mkdtemp(prefix="swapd-bench-overhead-"))
    daemon = Daemon(root, {"m": fake_preset("m")}, env=env).start()
    try:
        if daemon.proc is None or daemon.chat("m")[0] != 200:
            sys.exit("bench_overhead: swapd did not serve the fake model")
        pid = daemon.proc.pid
        os.sched_setaffinity(pid, {1})
        for child in psutil.Process(pid).children(recursive=True):
            child.cpu_affinity([0])  # the backend and the reaper share the client's core
        url = f"{daemon.url}/v1/chat/completions"
        asyncio.run(send(url, WARM_UP, concurrency))
        before = cpu(pid)
        rate = asyncio.run(send(url, requests, concurrency))
        return (cpu(pid) - before) / requests * 1e6, rate
    finally:
        daemon.cleanup()


def operations(scrapes: int = 200) -> tuple[float, float]:
    """CPU ms per scrape with ten presets, and wall ms of a reload that changes one."""
    root = Path(tempfile.mkdtemp(prefix="swapd-bench-ops-"))
    presets = {f"m{i}": fake_preset(f"m{i}") for i in range(10)}
    daemon = Daemon(root, presets).start()
    try:
        if daemon.proc is None or daemon.chat("m0")[0] != 200:
            sys.exit("bench_overhead: swapd did not serve the fake model")
        before = cpu(daemon.proc.pid)
        for _ in range(scrapes):
            daemon.get("/metrics")
        scrape = (cpu(daemon.proc.pid) - before) / scrapes * 1000
        daemon.presets = {**presets, "m9": fake_preset("m9", "--chunks", "3")}
        daemon.write()
        started = time.perf_counter()
        status, _ = daemon.request("POST", "/swapd/reload")
        reload_ms = (time.perf_counter() - started) * 1000
        if status != 200:
            sys.exit(f"bench_overhead: reload answered {status}")
        return scrape, reload_ms
    finally:
        daemon.cleanup()


def main() -> None:
    """Alternate baseline and this tree; print the medians and the difference."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", type=Path, help="a checkout of the baseline revision")
    p.add_argument("--requests", type=int, default=8000)
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench_overhead: needs two cores to pin swapd apart")
    os.sched_setaffinity(0, {0})
    trees: dict[str, str | None] = {"this tree": None}
    if args.baseline is not None:
        trees = {"baseline": str(args.baseline.resolve()), **trees}
    print(f"{'concurrency':>11} {'tree':>10} {'swapd us/request (each round)':>44} {'median':>7}")
    for level in (int(c) for c in args.concurrency.split(",")):
        found: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                found[name].append(one_round(tree, args.requests, level)[0])
        for name, values in found.items():
            rounds = " ".join(f"{v:6.1f}" for v in values)
            print(f"{level:>11} {name:>10} {rounds:>44} {statistics.median(values):7.1f}")
        if args.baseline is not None:
            base, ours = (statistics.median(found[n]) for n in ("baseline", "this tree"))
            print(f"{level:>11} {'change':>10} {'':>44} {100 * (ours / base - 1):+6.1f}%")
    scrape, reload_ms = operations()
    print(f"GET /metrics, 10 presets: {scrape:.2f} ms of swapd CPU a scrape")
    print(f"POST /swapd/reload, 10 presets, one changed: {reload_ms:.1f} ms")


if __name__ == "__main__":
    main()
