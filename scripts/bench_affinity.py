"""Affinity: how often a request through LiteLLM finds its model resident, with the hook or not.

Two swapd nodes on loopback, each with one fake 2 GiB GPU and the same four
fake 1 GiB models (so each node holds two at a time, and both together hold
all four), behind a real LiteLLM proxy whose config ``swapd litellm-config``
wrote: once as it is (LiteLLM's default ``simple-shuffle``), once with
``--affinity`` (``deploy/litellm/swapd_affinity.py``). Both runs send the same
seeded sequence of chat requests, one at a time. A request that made a node
load its model is a miss (swapd's ``model.load.start`` events); every other one
found it on the device: a hit.

Needs scripts/litellm-env. Run: ``.venv/bin/python scripts/bench_affinity.py``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from daemon import Daemon, fake_preset  # noqa: E402
from fakes import probe_file  # noqa: E402
from litellm_proxy import LiteLLM, litellm_binary, litellm_config, node_args  # noqa: E402

GIB = 1 << 30
MODELS = ("m1", "m2", "m3", "m4")


def start_node(root: Path, name: str, start_delay: float) -> Daemon:
    """A swapd with one fake 2 GiB GPU and the four 1 GiB models."""
    probe = root / f"{name}-gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 2 * GIB, "outside": 0}})
    extra = ("--probe-file", str(probe), "--mem-bytes", str(GIB), "--start-delay", f"{start_delay}")
    presets = {m: fake_preset(f"{name}/{m}", *extra, memory=GIB) for m in MODELS}
    settings = {"devices": "auto", "reserve": 0}
    return Daemon(root / name, presets, settings, {"SWAPD_FAKE_PROBE": str(probe)}).start()


def run(mode: str, trace: list[str], start_delay: float) -> dict[str, Any]:
    """Send ``trace`` through LiteLLM in front of two fresh nodes; hits, loads and latency."""
    binary = litellm_binary()
    if binary is None:
        sys.exit("LiteLLM is not prepared: run scripts/litellm-env")
    root = Path(tempfile.mkdtemp(prefix=f"swapd-affinity-{mode}-"))
    nodes = [start_node(root, name, start_delay) for name in ("a", "b")]
    proxy = None
    try:
        extra = ("--affinity",) if mode == "affinity" else ()
        config = litellm_config(*node_args([n.url for n in nodes]), *extra)
        proxy = LiteLLM(binary, root / "litellm", config).start()
        seconds, failed = [], 0
        for model in trace:
            began = time.perf_counter()
            answer = proxy.chat(model)
            seconds.append(time.perf_counter() - began)
            failed += answer.status != 200
        loads = {n.root.name: len(n.events("model.load.start")) for n in nodes}
    finally:
        if proxy is not None:
            proxy.stop()
        for node in nodes:
            node.cleanup()
    misses = sum(loads.values())
    return {
        "mode": mode,
        "requests": len(trace),
        "failed": failed,
        "hits": len(trace) - misses,
        "hit_rate": round((len(trace) - misses) / len(trace), 3),
        "loads_per_node": loads,
        "median_s": round(statistics.median(seconds), 4),
        "mean_s": round(statistics.fmean(seconds), 4),
        "total_s": round(sum(seconds), 2),
    }


def main() -> None:
    """Both modes on one trace; a table, and JSON with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--start-delay", type=float, default=0.2, help="a fake load's seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    trace = [rng.choice(MODELS) for _ in range(args.requests)]
    results = [run(mode, trace, args.start_delay) for mode in ("shuffle", "affinity")]
    print(f"{'mode':<9} {'requests':>8} {'hits':>5} {'hit rate':>8} {'loads a/b':>9} "
          f"{'median':>8} {'mean':>8} {'total':>7}")  # fmt: skip
    for r in results:
        loads = "/".join(str(v) for v in r["loads_per_node"].values())
        print(
            f"{r['mode']:<9} {r['requests']:>8} {r['hits']:>5} {r['hit_rate']:>8.1%} "
            f"{loads:>9} {r['median_s']:>7.3f}s {r['mean_s']:>7.3f}s {r['total_s']:>6.1f}s"
        )
        if r["failed"]:
            print(f"  {r['failed']} request(s) failed")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
