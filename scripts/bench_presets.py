#!/usr/bin/env python3
"""What swapd's own work costs as the number of presets grows (5, 200, 500 by default).

For each count it starts a swapd whose presets folder holds that many files (all but
a few ``backend: command`` presets of the fake upstream, the rest llama-server presets
of one tiny GGUF; only one model is ever loaded) and measures:

- the time from the start to the ``swapd.ready`` event, ``swapd check``'s time, RSS;
- the wall time and swapd's CPU per call of ``/swapd/status``, ``/v1/models``,
  ``/metrics`` and ``/swapd/plan``;
- a reload with nothing changed, with one preset changed, with 50 presets added;
- a chat request to a ready model: wall time and swapd's CPU per request;
- ``/swapd/events``: swapd's CPU per new subscriber (its first views), and per
  second with 10 subscribers open on an idle swapd (the 0.5 s progress ticks);
- ``swapd status``'s wall time.

It prints one table and writes the numbers as JSON under ``out/``.
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bench as b
import psutil
import yaml

sys.path.insert(0, str(b.REPO / "tests"))
from fakes.tiny_gguf import write_tiny_llama_gguf

Json = dict[str, Any]
LLAMA_EVERY = 20  # one preset in this many is a llama-server one


def presets(count: int, gguf: Path, prefix: str = "m") -> dict[str, Json]:
    """``count`` presets: fake upstreams, and every LLAMA_EVERY-th a llama-server one."""
    out: dict[str, Json] = {}
    for i in range(count):
        name = f"{prefix}{i:03d}"
        if i % LLAMA_EVERY == LLAMA_EVERY - 1:
            out[name] = {"backend": "llama-server", "model": str(gguf), "args": ["-c", "256"]}
        else:
            out[name] = {"backend": "command", "cmd": b.fake_cmd(name)}
    return out


def per_call(daemon: b.Swapd, method: str, path: str, calls: int, body: Any = None) -> Json:
    """Median wall ms of ``calls`` exchanges and swapd's CPU ms per exchange."""
    walls = []
    cpu0 = b.cpu_ns(daemon.pid)
    for _ in range(calls):
        t0 = time.perf_counter()
        status, _ = b.http_json(method, daemon.port, path, body)
        walls.append((time.perf_counter() - t0) * 1e3)
        if status != 200:
            raise RuntimeError(f"{method} {path}: {status}")
    cpu = (b.cpu_ns(daemon.pid) - cpu0) / 1e6 / calls
    return {"wall_ms": b.median(walls), "cpu_ms": cpu}


def raw_get(port: int, path: str) -> float:
    """Wall ms of a GET whose body is not JSON."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(b.LOOPBACK, port, timeout=60)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
    finally:
        conn.close()
    return (time.perf_counter() - t0) * 1e3


def scrape(daemon: b.Swapd, calls: int) -> Json:
    """/metrics: median wall ms and swapd's CPU ms per scrape."""
    cpu0 = b.cpu_ns(daemon.pid)
    walls = [raw_get(daemon.port, "/metrics") for _ in range(calls)]
    return {"wall_ms": b.median(walls), "cpu_ms": (b.cpu_ns(daemon.pid) - cpu0) / 1e6 / calls}


def reload(daemon: b.Swapd) -> Json:
    """One POST /swapd/reload: wall ms and swapd's CPU ms."""
    cpu0 = b.cpu_ns(daemon.pid)
    t0 = time.perf_counter()
    status, body = b.http_json("POST", daemon.port, "/swapd/reload")
    wall = (time.perf_counter() - t0) * 1e3
    if status != 200:
        raise RuntimeError(f"reload: {status} {body}")
    return {"wall_ms": wall, "cpu_ms": (b.cpu_ns(daemon.pid) - cpu0) / 1e6}


def subscribers(daemon: b.Swapd, count: int, seconds: float) -> Json:
    """CPU per new /swapd/events subscriber, and per second with ``count`` of them open."""
    conns = []
    cpu0 = b.cpu_ns(daemon.pid)
    for _ in range(count):
        conn = http.client.HTTPConnection(b.LOOPBACK, daemon.port, timeout=60)
        conn.request("GET", "/swapd/events")
        resp = conn.getresponse()
        resp.read1(1)  # the stream has begun
        conns.append(conn)
    time.sleep(0.5)  # the first views are written
    per_subscriber = (b.cpu_ns(daemon.pid) - cpu0) / 1e6 / count
    cpu1 = b.cpu_ns(daemon.pid)
    time.sleep(seconds)
    per_second = (b.cpu_ns(daemon.pid) - cpu1) / 1e6 / seconds
    for conn in conns:
        conn.close()
    return {"cpu_ms_per_subscriber": per_subscriber, "idle_cpu_ms_per_s": per_second}


def cli(daemon: b.Swapd, *argv: str) -> float:
    """Wall ms of one ``swapd VERB`` run against this daemon's config."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "swapd", *argv, "--config", str(daemon.root / "swapd.yaml")],
        check=True,
        capture_output=True,
    )
    return (time.perf_counter() - t0) * 1e3


def one_count(count: int, gguf: Path, calls: int) -> Json:
    """Every measurement for a swapd with ``count`` presets."""
    configured = presets(count, gguf)
    daemon = b.Swapd(configured)
    row: Json = {"presets": count}
    # The last fake in file order: a lookup that walks the presets walks them all.
    last = max(n for n, p in configured.items() if p["backend"] == "command")
    t0 = time.perf_counter()
    with b.running(daemon):
        b.wait_until(lambda: bool(daemon.events("swapd.ready")), timeout=120, interval=0.01)
        row["ready_ms"] = (time.perf_counter() - t0) * 1e3
        row["check_ms"] = cli(daemon, "check")
        row["rss_mib_idle"] = psutil.Process(daemon.pid).memory_info().rss / 2**20
        for path in ("/swapd/status", "/v1/models", "/swapd/plan"):
            row[path] = per_call(daemon, "GET", path, calls)
        row["/metrics"] = scrape(daemon, calls)
        row["status_cli_ms"] = b.median([cli(daemon, "status") for _ in range(3)])
        daemon.load(last)
        chat = {"model": last, "messages": [{"role": "user", "content": "hi"}]}
        per_call(daemon, "POST", "/v1/chat/completions", 20, chat)  # warm
        row["chat"] = per_call(daemon, "POST", "/v1/chat/completions", calls * 4, chat)
        row["events"] = subscribers(daemon, 10, 5.0)
        row["reload_same"] = reload(daemon)
        folder = daemon.root / "presets"
        first = folder / "m001.yaml"
        first.write_text(yaml.safe_dump({**yaml.safe_load(first.read_text()), "ttl": "5m"}))
        row["reload_one_changed"] = reload(daemon)
        for name, preset in presets(50, gguf, prefix="n").items():
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(preset))
        row["reload_50_added"] = reload(daemon)
        row["rss_mib_end"] = psutil.Process(daemon.pid).memory_info().rss / 2**20
    return row


def main() -> None:
    """Measure each count, print the table, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--counts", default="5,200,500", help="preset counts, comma-separated")
    p.add_argument("--calls", type=int, default=50, help="calls per route")
    p.add_argument("--out", type=Path, default=b.REPO / "out" / "bench_presets.json")
    args = p.parse_args()
    info = b.machine_info()
    b.print_machine(info)
    gguf = write_tiny_llama_gguf(Path(tempfile.mkdtemp(prefix="swapd-bench-")) / "tiny.gguf")
    rows = [one_count(int(c), gguf, args.calls) for c in args.counts.split(",")]
    routes = ("/swapd/status", "/v1/models", "/swapd/plan", "/metrics", "chat")
    reloads = ("reload_same", "reload_one_changed", "reload_50_added")
    table = [
        ["ready ms", *(f"{r['ready_ms']:.0f}" for r in rows)],
        ["swapd check ms", *(f"{r['check_ms']:.0f}" for r in rows)],
        ["swapd status ms", *(f"{r['status_cli_ms']:.0f}" for r in rows)],
        ["RSS MiB idle / end", *(_rss(r) for r in rows)],
        *([f"{key} ms (wall / cpu)", *(_pair(r[key]) for r in rows)] for key in routes + reloads),
        ["events cpu ms / subscriber", *(_cell(r, "cpu_ms_per_subscriber") for r in rows)],
        ["events idle cpu ms/s, 10 open", *(_cell(r, "idle_cpu_ms_per_s") for r in rows)],
    ]
    b.print_table(["", *(f"{r['presets']} presets" for r in rows)], table)
    b.write_json(args.out, {"machine": b.finish_info(info), "rows": rows})


def _pair(cell: Json) -> str:
    return f"{cell['wall_ms']:.2f} / {cell['cpu_ms']:.2f}"


def _rss(row: Json) -> str:
    return f"{row['rss_mib_idle']:.0f} / {row['rss_mib_end']:.0f}"


def _cell(row: Json, key: str) -> str:
    return f"{row['events'][key]:.1f}"


if __name__ == "__main__":
    main()
