"""What swapd's proxy adds to a request: direct vs through swapd, same backend, same run.

For each backend (the fake OpenAI upstream, and llama-server with Gemma 3 270M)
one swapd is started with the backend as a preset and loaded; the benchmark then
sends the same requests straight to the backend's port ("direct") and to swapd
("through"), alternating in rounds so that drifting background load hits both
alike. Measured:

* latency of a small non-streaming chat completion, sent one after another;
* requests/s at concurrency 1, 8 and 64 (one pooled aiohttp session, a fixed
  number of requests per level), with the CPU each process used per request;
* streaming: time to the first chunk and the mean gap between chunks;
* swapd's footprint with 10 presets: RSS, and CPU used while idle for 5 s.

Processes are pinned to cores (see :func:`layouts`); every ratio is through/direct.

    python scripts/bench_proxy.py [--backends fake,llama] [--layouts shared,spare,free] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import _bench
import aiohttp
import psutil
from _bench import Json, Swapd

CHUNKS = 10
CHUNK_INTERVAL = 0.01
LEVELS = (1, 8, 64)
IDLE_SECONDS = 5.0
EXTRA_PRESETS = 9  # plus the measured one: 10 presets
EVERYWHERE = os.sched_getaffinity(0)  # the cores this script may use, before any pinning


@dataclass(frozen=True)
class Layout:
    """Which cores the client, swapd and the backend may run on."""

    name: str
    client: set[int] | None
    swapd: set[int] | None
    backend: set[int] | None
    note: str


def layouts() -> dict[str, Layout]:
    """The core layouts this machine allows (two cores are needed to pin at all)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"none": Layout("none", None, None, None, "one core: nothing pinned")}
    a, b = {cores[0]}, {cores[1]}
    return {
        "shared": Layout(
            "shared",
            a,
            b,
            b,
            "client alone; swapd shares the backend's core (proxy CPU is taken from the backend)",
        ),
        "spare": Layout(
            "spare", a, b, a, "client and backend share a core; swapd has a spare core of its own"
        ),
        "free": Layout("free", None, None, None, "nothing pinned: the kernel places everything"),
    }


@dataclass(frozen=True)
class Workload:
    """One backend kind: its preset, its request bodies and how many requests to send."""

    name: str
    preset: Json
    body: bytes
    stream_body: bytes
    latency_n: int
    throughput_n: int
    stream_n: int
    reps: int


def chat_body(**extra: Any) -> bytes:
    """A small chat completion for model ``m``."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Say hi."}], **extra}
    return json.dumps(body).encode()


def fake_workload(quick: bool) -> Workload:
    """The fake upstream: answers at once, so the proxy's cost is all that differs."""
    extra = ("--chunks", str(CHUNKS), "--chunk-interval", str(CHUNK_INTERVAL))
    return Workload(
        name="fake",
        preset={"backend": "command", "cmd": _bench.fake_cmd("m", *extra)},
        body=chat_body(),
        stream_body=chat_body(stream=True),
        latency_n=400 if quick else 2000,
        throughput_n=600 if quick else 2000,
        stream_n=40 if quick else 60,
        reps=1 if quick else 3,
    )


def llama_workload(quick: bool, cache_dir: Path, threads: int) -> Workload:
    """llama-server with Gemma 3 270M on the CPU; a few tokens per answer."""
    model = _bench.gemma_model(cache_dir)
    # Enough HTTP threads for every client connection: with its default (a few), idle
    # keep-alive connections hold the threads and other connections stall, direct or not.
    args = ["-c", "2048", "-np", "1", "-t", str(threads), "--threads-http", "80"]
    return Workload(
        name="llama",
        preset={"backend": "llama-server", "model": str(model), "args": args},
        body=chat_body(max_tokens=4, temperature=0),
        stream_body=chat_body(max_tokens=16, temperature=0, stream=True),
        latency_n=30 if quick else 100,
        throughput_n=32 if quick else 64,
        stream_n=10 if quick else 30,
        reps=1,
    )


# ---------------------------------------------------------------- client side


class Client:
    """Two pooled sessions, one per target, reused for every phase."""

    def __init__(self, direct_port: int, swapd_port: int) -> None:
        self.urls = {
            "direct": f"http://{_bench.LOOPBACK}:{direct_port}/v1/chat/completions",
            "through": f"http://{_bench.LOOPBACK}:{swapd_port}/v1/chat/completions",
        }
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        # Streams use a connection each: llama-server closes a connection after a streamed
        # answer while announcing keep-alive, so a pooled one can be dead when reused.
        self.streams: dict[str, aiohttp.ClientSession] = {}

    async def __aenter__(self) -> Self:
        await self.reset()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close both sessions and their pooled connections."""
        for session in [*self.sessions.values(), *self.streams.values()]:
            await session.close()
        self.sessions.clear()
        self.streams.clear()

    async def reset(self) -> None:
        """Fresh sessions: a backend may have closed idle pooled connections between phases."""
        await self.close()
        for mode in self.urls:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
            timeout = aiohttp.ClientTimeout(total=600)
            self.sessions[mode] = aiohttp.ClientSession(connector=connector, timeout=timeout)
            once = aiohttp.TCPConnector(force_close=True)
            self.streams[mode] = aiohttp.ClientSession(connector=once, timeout=timeout)

    async def one(self, mode: str, body: bytes) -> float:
        """Send one request and read the whole answer; return seconds."""
        started = time.perf_counter()
        async with self.sessions[mode].post(
            self.urls[mode], data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{mode}: HTTP {resp.status}")
        return time.perf_counter() - started

    async def stream(self, mode: str, body: bytes) -> tuple[float, float]:
        """Send one streaming request; return (time to first chunk, mean gap between chunks)."""
        started = time.perf_counter()
        async with self.streams[mode].post(
            self.urls[mode], data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            stamps = [
                time.perf_counter()
                async for line in resp.content
                if line.startswith(b"data:") and b"[DONE]" not in line
            ]
        if not stamps:
            raise RuntimeError(f"{mode}: no chunks")
        gap = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
        return stamps[0] - started, gap

    async def burst(self, mode: str, body: bytes, concurrency: int, total: int) -> float:
        """``total`` requests from ``concurrency`` workers; return seconds for all."""
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await self.one(mode, body)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


async def alternate(
    rounds: int, run: Callable[[str, int], Awaitable[None]], *, per_round: int
) -> None:
    """Run ``run(mode, count)`` for both modes in ``rounds`` rounds, swapping who goes first."""
    for r in range(rounds):
        order = ("direct", "through") if r % 2 == 0 else ("through", "direct")
        for mode in order:
            await run(mode, per_round)


# ---------------------------------------------------------------- phases


async def latency_phase(client: Client, work: Workload) -> Json:
    """Sequential small requests, alternating direct/through in rounds."""
    samples: dict[str, list[float]] = {"direct": [], "through": []}

    async def run(mode: str, count: int) -> None:
        for _ in range(count):
            samples[mode].append(await client.one(mode, work.body))

    rounds = 10
    await alternate(rounds, run, per_round=max(1, work.latency_n // rounds))
    direct, through = (_bench.summarize([s * 1000 for s in samples[m]]) for m in samples)
    return {
        "direct_ms": direct,
        "through_ms": through,
        "added_p50_ms": through["p50"] - direct["p50"],
        "added_p99_ms": through["p99"] - direct["p99"],
        "ratio_p50": through["p50"] / direct["p50"],
    }


async def throughput_phase(client: Client, work: Workload, pids: dict[str, int]) -> list[Json]:
    """Requests/s at each concurrency level, with CPU seconds per request for each process."""
    results = []
    for level in LEVELS:
        runs: dict[str, list[Json]] = {"direct": [], "through": []}

        async def run(mode: str, _count: int, level: int = level, runs: Any = runs) -> None:
            before = {k: _bench.cpu_seconds(p) for k, p in pids.items()}
            elapsed = await client.burst(mode, work.body, level, work.throughput_n)
            used = {k: _bench.cpu_seconds(p) - before[k] for k, p in pids.items()}
            runs[mode].append(
                {
                    "rps": work.throughput_n / elapsed,
                    "cpu_ms_per_request": {
                        k: 1000 * v / work.throughput_n for k, v in used.items()
                    },
                    "cpu_busy": {k: v / elapsed for k, v in used.items()},
                }
            )

        await alternate(work.reps, run, per_round=work.throughput_n)
        results.append(_level_result(level, runs))
    return results


def _level_result(level: int, runs: dict[str, list[Json]]) -> Json:
    rps = {m: _bench.median([r["rps"] for r in runs[m]]) for m in runs}
    return {
        "concurrency": level,
        "direct_rps": rps["direct"],
        "through_rps": rps["through"],
        "ratio": rps["through"] / rps["direct"],
        "runs": runs,
    }


async def stream_phase(client: Client, work: Workload) -> Json:
    """Time to first chunk and mean gap between chunks, alternating direct/through."""
    ttfc: dict[str, list[float]] = {"direct": [], "through": []}
    gaps: dict[str, list[float]] = {"direct": [], "through": []}

    async def run(mode: str, count: int) -> None:
        for _ in range(count):
            first, gap = await client.stream(mode, work.stream_body)
            ttfc[mode].append(first * 1000)
            gaps[mode].append(gap * 1000)

    rounds = 10
    await alternate(rounds, run, per_round=max(1, work.stream_n // rounds))
    out: Json = {
        m: {"ttfc_ms": _bench.summarize(ttfc[m]), "gap_ms": _bench.summarize(gaps[m])} for m in ttfc
    }
    out["added_ttfc_p50_ms"] = out["through"]["ttfc_ms"]["p50"] - out["direct"]["ttfc_ms"]["p50"]
    out["added_gap_mean_ms"] = out["through"]["gap_ms"]["mean"] - out["direct"]["gap_ms"]["mean"]
    return out


async def measure(work: Workload, layout: Layout, daemon: Swapd) -> Json:
    """Load the model, pin everything, and run every phase against one backend."""
    entry = daemon.load("m")
    backend_pid, backend_port = int(entry["pid"]), int(entry["port"])
    _bench.pin_tree(backend_pid, layout.backend)
    _bench.pin_self(layout.client or EVERYWHERE)
    pids = {"client": os.getpid(), "swapd": daemon.pid, "backend": backend_pid}
    async with Client(backend_port, daemon.port) as client:
        warm = max(20, work.latency_n // 10)
        await alternate(1, lambda mode, n: _warm(client, mode, work.body, n), per_round=warm)
        latency = await latency_phase(client, work)
        await client.reset()
        throughput = await throughput_phase(client, work, pids)
        await client.reset()
        streaming = await stream_phase(client, work)
    return {
        "backend": work.name,
        "layout": layout.name,
        "layout_note": layout.note,
        "cores": {k: _bench.affinity(p) for k, p in pids.items()},
        "latency": latency,
        "throughput": throughput,
        "streaming": streaming,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


async def _warm(client: Client, mode: str, body: bytes, count: int) -> None:
    for _ in range(count):
        await client.one(mode, body)


def extra_presets() -> dict[str, Json]:
    """Nine more fake presets that are never loaded, so swapd has 10 configured."""
    return {
        f"idle{i}": {"backend": "command", "cmd": _bench.fake_cmd(f"idle{i}")}
        for i in range(EXTRA_PRESETS)
    }


def run_workload(work: Workload, layout: Layout) -> Json:
    """One swapd for one backend and layout; always stopped."""
    presets = {"m": work.preset, **extra_presets()}
    _bench.pin_self(EVERYWHERE)  # swapd inherits our cores when it is not pinned itself
    daemon = Swapd(presets, cores=layout.swapd)
    with _bench.running(daemon):
        return _bench.run_async(measure(work, layout, daemon))


# ---------------------------------------------------------------- footprint


def idle_cpu(pids: dict[str, int], seconds: float) -> Json:
    """CPU time each process used over ``seconds`` of idling, as a percentage of one core."""
    before = {k: _bench.cpu_seconds(p) for k, p in pids.items()}
    time.sleep(seconds)
    return {k: 100 * (_bench.cpu_seconds(p) - before[k]) / seconds for k, p in pids.items()}


def rss_mib(pid: int | None) -> float:
    """Resident memory of one process in MiB (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        return float(psutil.Process(pid).memory_info().rss) / 1024**2
    except psutil.Error:
        return 0.0


def footprint(idle_seconds: float, requests: int) -> Json:
    """Swapd with 10 fake presets: RSS and idle CPU before and after serving a model."""
    work = fake_workload(quick=True)
    daemon = Swapd({"m": work.preset, **extra_presets()})
    with _bench.running(daemon):
        reaper = daemon.reaper_pid()
        pids = {"swapd": daemon.pid} | ({"reaper": reaper} if reaper else {})
        time.sleep(1.0)  # let start-up settle
        out: Json = {
            "presets": 1 + EXTRA_PRESETS,
            "rss_mib_start": {k: rss_mib(p) for k, p in pids.items()},
            "idle_cpu_pct_nothing_loaded": idle_cpu(pids, idle_seconds),
        }
        entry = daemon.load("m")

        async def serve() -> None:
            async with Client(int(entry["port"]), daemon.port) as client:
                await client.burst("through", work.body, 8, requests)

        _bench.run_async(serve())
        out["rss_mib_after_requests"] = {k: rss_mib(p) for k, p in pids.items()}
        out["requests_served"] = requests
        out["idle_cpu_pct_one_ready"] = idle_cpu(pids, idle_seconds)
    return out


# ---------------------------------------------------------------- report


def print_report(results: list[Json], foot: Json | None) -> None:
    """The tables: latency, throughput, streaming, footprint."""
    print("\nsmall request latency, sequential (ms)")
    _bench.print_table(
        [
            "backend/layout",
            "direct p50",
            "through p50",
            "added p50",
            "ratio",
            "direct p99",
            "through p99",
            "added p99",
        ],
        [
            [
                f"{r['backend']}/{r['layout']}",
                lat["direct_ms"]["p50"],
                lat["through_ms"]["p50"],
                lat["added_p50_ms"],
                lat["ratio_p50"],
                lat["direct_ms"]["p99"],
                lat["through_ms"]["p99"],
                lat["added_p99_ms"],
            ]
            for r in results
            for lat in [r["latency"]]
        ],
    )
    print("\nthroughput (requests/s) and swapd CPU per proxied request")
    _bench.print_table(
        ["backend/layout", "concurrency", "direct", "through", "ratio", "swapd cpu ms/req"],
        [
            [
                f"{r['backend']}/{r['layout']}",
                lv["concurrency"],
                lv["direct_rps"],
                lv["through_rps"],
                lv["ratio"],
                _bench.median([x["cpu_ms_per_request"]["swapd"] for x in lv["runs"]["through"]]),
            ]
            for r in results
            for lv in r["throughput"]
        ],
    )
    print("\nstreaming (ms): time to first chunk p50, mean gap between chunks")
    _bench.print_table(
        ["backend/layout", "direct ttfc", "through ttfc", "added", "direct gap", "through gap"],
        [
            [
                f"{r['backend']}/{r['layout']}",
                s["direct"]["ttfc_ms"]["p50"],
                s["through"]["ttfc_ms"]["p50"],
                s["added_ttfc_p50_ms"],
                s["direct"]["gap_ms"]["mean"],
                s["through"]["gap_ms"]["mean"],
            ]
            for r in results
            for s in [r["streaming"]]
        ],
    )
    for r in results:
        print(f"cores {r['backend']}/{r['layout']}: {r['cores']} ({r['layout_note']})")
    if foot is not None:
        print_footprint(foot)


def print_footprint(foot: Json) -> None:
    """RSS and idle CPU with 10 presets."""
    print(f"\nswapd footprint with {foot['presets']} presets")
    rows = [
        [
            key,
            foot["rss_mib_start"][key],
            foot["rss_mib_after_requests"][key],
            foot["idle_cpu_pct_nothing_loaded"][key],
            foot["idle_cpu_pct_one_ready"][key],
        ]
        for key in foot["rss_mib_start"]
    ]
    _bench.print_table(
        [
            "process",
            "RSS MiB start",
            f"RSS after {foot['requests_served']} req",
            "idle CPU % (none loaded)",
            "idle CPU % (one ready)",
        ],
        rows,
    )


def parse_args() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backends", default="fake,llama", help="comma list of fake, llama")
    p.add_argument(
        "--layouts", default="shared,spare,free", help="fake: comma list of shared, spare, free"
    )
    p.add_argument("--llama-layouts", default="shared", help="llama: comma list of layouts")
    p.add_argument("--quick", action="store_true", help="fewer requests (about a minute)")
    p.add_argument("--no-footprint", action="store_true", help="skip the RSS/idle CPU step")
    p.add_argument("--cache-dir", type=Path, default=_bench.default_cache_dir())
    p.add_argument("--out", type=Path, default=Path("out/bench_proxy.json"))
    return p.parse_args()


def main() -> None:
    """Run the chosen backends and layouts, print the tables, write the JSON."""
    args = parse_args()
    info = _bench.machine_info()
    info["cpu_capacity_start"] = _bench.parallel_capacity()
    _bench.print_machine(info)
    known = layouts()
    results = []
    for backend in args.backends.split(","):
        names = args.layouts if backend == "fake" else args.llama_layouts
        chosen = [known[n] for n in names.split(",") if n in known] or list(known.values())
        for layout in chosen:
            threads = len(layout.backend) if layout.backend else os.cpu_count() or 1
            work = (
                fake_workload(args.quick)
                if backend == "fake"
                else llama_workload(args.quick, args.cache_dir, threads)
            )
            print(f"running {backend} / {layout.name} ...", flush=True)
            results.append(run_workload(work, layout))
    _bench.pin_self(EVERYWHERE)
    foot = None if args.no_footprint else footprint(IDLE_SECONDS, 400 if args.quick else 2000)
    print_report(results, foot)
    _bench.write_json(
        args.out,
        {"machine": _bench.finish_info(info), "results": results, "footprint": foot},
    )


if __name__ == "__main__":
    main()
