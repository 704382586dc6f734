"""SSE through Nginx: do the gaps between chunks survive? Direct, through swapd, through both.

One swapd with the fake upstream (``--chunks N --chunk-interval I``) and a real nginx running
``systemd/nginx-swapd.conf`` (as ``tests/test_nginx.py`` runs it). Each stream's chunks are
timestamped on arrival and compared with the time the fake produced them (``produced_at``):
the *lag* is arrival - production, the *gap* the time between two arrivals.

    python scripts/bench_nginx.py [--streams 20] [--chunks 10] [--interval 0.05]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _bench

sys.path.insert(0, str(_bench.REPO / "tests"))
from daemon import Daemon, fake_preset
from test_nginx import Nginx


def one_stream(port: int, body: bytes) -> tuple[list[float], list[float]]:
    """Arrival and production times of each chunk of one streamed answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    arrived, produced = [], []
    for raw in conn.getresponse():
        if raw.startswith(b"data: {"):
            arrived.append(time.time())
            produced.append(json.loads(raw[6:])["produced_at"])
    conn.close()
    return arrived, produced


def measure(port: int, streams: int, body: bytes) -> dict[str, float]:
    """Median lag and mean gap (ms) over ``streams`` streams."""
    lags, gaps = [], []
    for _ in range(streams):
        arrived, produced = one_stream(port, body)
        lags += [(a - p) * 1000 for a, p in zip(arrived, produced, strict=True)]
        gaps += [(b - a) * 1000 for a, b in itertools.pairwise(arrived)]
    return {
        "lag_p50": statistics.median(lags),
        "lag_max": max(lags),
        "gap_mean": statistics.fmean(gaps),
    }


def main() -> None:
    """Start swapd and nginx, stream through each hop, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.05)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="swapd-bench-nginx-"))
    extra = ("--chunks", str(args.chunks), "--chunk-interval", str(args.interval))
    daemon = Daemon(root / "swapd", {"m": fake_preset("m", *extra)}).start()
    nginx = Nginx(root / "nginx", daemon)
    try:
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user"}]})
        encoded = body.encode()
        one_stream(daemon.port, encoded)  # load the model
        backend = daemon.model("m")["port"]
        hops = {"direct": backend, "swapd": daemon.port, "nginx + swapd": nginx.port}
        print(f"{args.streams} streams of {args.chunks} chunks {args.interval * 1000:g} ms apart")
        print(f"{'path':14} {'lag p50 ms':>10} {'lag max ms':>10} {'mean gap ms':>11}")
        for name, port in hops.items():
            found = measure(port, args.streams, encoded)
            print(
                f"{name:14} {found['lag_p50']:10.2f} {found['lag_max']:10.2f}"
                f" {found['gap_mean']:11.2f}"
            )
    finally:
        nginx.stop()
        daemon.cleanup()


if __name__ == "__main__":
    main()
