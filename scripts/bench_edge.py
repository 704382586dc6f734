"""Slow clients against a real swapd on loopback: how long they hold it, and what it costs.

``scripts/.venv/bin/python scripts/bench_edge.py [--connections 300] [--header-timeout 10s]``
opens N connections that send a request's headers at one byte a second (slowloris),
and meanwhile asks ``/health`` on fresh connections. It prints when swapd cut the
slow connections, swapd's descriptors and CPU time before, during and after, and the
``/health`` latency under the attack. Every connection is to 127.0.0.1, and the
clients stop after ``--bound`` seconds whatever happens.
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import Daemon, fake_preset

REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow" + b"w" * 200


def health_ms(d: Daemon) -> float:
    """One /health on a fresh connection, in milliseconds."""
    started = time.perf_counter()
    status, _ = d.get("/health")
    if status != 200:
        raise RuntimeError(f"/health answered {status} under the attack")
    return (time.perf_counter() - started) * 1000


@dataclass
class Result:
    """What one attack measured."""

    cut: list[float]
    bytes_max: int
    fds: tuple[int, int, int]
    cpu_s: float
    health_ms: list[float]


def attack(d: Daemon, connections: int, bound: float) -> Result:
    """Run the slow clients; the measurements."""
    proc = psutil.Process(d.proc.pid if d.proc else 0)
    fds_before, cpu_before = proc.num_fds(), sum(proc.cpu_times()[:2])
    socks = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(connections)]
    opened = time.monotonic()
    sent = [0] * connections
    cut: dict[int, float] = {}
    latencies: list[float] = []
    fds_peak = proc.num_fds()
    next_byte = opened
    while len(cut) < connections and time.monotonic() - opened < bound:
        readable, _, _ = select.select(
            [s for i, s in enumerate(socks) if i not in cut], [], [], 0.05
        )
        now = time.monotonic()
        for sock in readable:
            cut[socks.index(sock)] = now - opened  # EOF or reset: swapd let go
        if now >= next_byte:
            for i, sock in enumerate(socks):
                if i not in cut:
                    try:
                        sock.send(REQUEST[sent[i] : sent[i] + 1])
                        sent[i] += 1
                    except OSError:
                        cut[i] = now - opened
            latencies.append(health_ms(d))
            fds_peak = max(fds_peak, proc.num_fds())
            next_byte += 1.0
    for sock in socks:
        sock.close()
    time.sleep(0.5)
    return Result(
        cut=sorted(cut.values()),
        bytes_max=max(sent),
        fds=(fds_before, fds_peak, proc.num_fds()),
        cpu_s=sum(proc.cpu_times()[:2]) - cpu_before,
        health_ms=latencies,
    )


def main() -> None:
    """Start swapd, run the slow clients, print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--header-timeout", default="10s")
    parser.add_argument("--bound", type=float, default=60.0, help="stop after this many seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"header_timeout": args.header_timeout}
        d = Daemon(Path(tmp), {"a": fake_preset("A")}, settings).start()
        try:
            got = attack(d, args.connections, args.bound)
        finally:
            left = d.cleanup()
    cut = got.cut
    print("| connections | header_timeout | cut | first / median / last cut (s) | bytes sent |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.connections} | {args.header_timeout} | {len(cut)} | "
        f"{cut[0]:.2f} / {statistics.median(cut):.2f} / {cut[-1]:.2f} | "
        f"at most {got.bytes_max} of {len(REQUEST)} |"
    )
    print("\nswapd descriptors before / peak / after: {} / {} / {}".format(*got.fds))
    print(f"swapd CPU during the attack: {got.cpu_s:.2f} s")
    print(
        f"/health under the attack: median {statistics.median(got.health_ms):.1f} ms, "
        f"max {max(got.health_ms):.1f} ms"
    )
    if left:
        print(f"processes outlived swapd: {left}")


if __name__ == "__main__":
    main()
