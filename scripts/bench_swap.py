"""swapd's own share of a model load and of a swap, against the backend's own costs.

Definitions (the same for every backend kind):

* backend start  -- spawn to the first 200 from its health URL, the backend run
  directly (same argv and environment as swapd would use), its health polled on
  swapd's schedule: at once on each line it prints, else after 5 ms growing 1.5x
  to 50 ms. (A poll every 1 ms made llama-server's own start 25 ms slower on a
  shared core, which would count as swapd's gain.);
* backend first request -- the first chat request's latency on that fresh backend;
* backend stop   -- SIGTERM to its process group until the leader is reaped;
* cold TTFB      -- through swapd, a chat request for a model that is not running
  until its response headers arrive;
* swapd's share of a first load = cold TTFB - (start + first request);
* swapd's share of a swap (``max_running: 1``, alternating two presets)
  = cold TTFB - (stop + start + first request).

The backend's costs are medians of direct runs interleaved with the swapd runs in
the same process, on the same cores (direct, through, direct, ...). Each figure is
measured in ``--rounds`` rounds (3 by default), each with fresh swapd instances; the
report gives the median over the rounds and their range, and the percentiles of
all runs pooled. By default the client is pinned to one core and swapd and the
backends to the other (the report says so); ``--free`` pins nothing. Also
measured, without swapd: llama-server's start with the GGUF evicted from the page
cache vs with it cached.

    python scripts/bench_swap.py [--backends fake,llama] [--rounds 3] [--runs N] [--quick] [--free]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import http.client
import json
import mmap
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import _bench
from _bench import Json, Swapd

from swapd import process
from swapd.backends import build_launch
from swapd.presets import Preset, load_presets

BODY = {"model": "", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1}


@dataclass(frozen=True)
class Cores:
    """The benchmark (client and health poller) on one core, swapd and backends on another."""

    client: set[int] | None
    server: set[int] | None


def choose_cores(*, free: bool = False) -> Cores:
    """Split two cores between the client and the servers; pin nothing on one core."""
    cores = sorted(os.sched_getaffinity(0))
    if free or len(cores) < 2:
        return Cores(None, None)
    return Cores({cores[0]}, {cores[1]})


# ---------------------------------------------------------------- requests


def chat(port: int, model: str, headers: Mapping[str, str] | None = None) -> tuple[float, float]:
    """One small chat request; return (seconds to response headers, seconds to the end)."""
    body = json.dumps({**BODY, "model": model})
    conn = http.client.HTTPConnection(_bench.LOOPBACK, port, timeout=600)
    try:
        started = time.perf_counter()
        sent = {"Content-Type": "application/json", **(headers or {})}
        conn.request("POST", "/v1/chat/completions", body, sent)
        resp = conn.getresponse()
        ttfb = time.perf_counter() - started
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} for {model}")
        return ttfb, time.perf_counter() - started
    finally:
        conn.close()


# ---------------------------------------------------------------- direct runs


@dataclass
class Direct:
    """A backend started directly: its process, port, the headers swapd would send it."""

    proc: subprocess.Popen[bytes]
    port: int
    headers: dict[str, str]
    output: threading.Event  # set on each line it prints


def _drain(stream: IO[bytes], output: threading.Event) -> None:
    for _ in iter(stream.readline, b""):
        output.set()


@contextlib.contextmanager
def spawned(preset: Preset, cores: set[int] | None) -> Iterator[Direct]:
    """Start the backend directly with swapd's argv on a free port; always stop it.

    Its output is read (and dropped) as swapd reads it; each line sets ``output``.
    """
    port = _bench.free_port()
    launch = build_launch(preset, port)
    proc = subprocess.Popen(
        list(launch.argv),
        env=dict(launch.env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_bench.pinner(cores),  # noqa: PLW1509 - pin before exec; no threads here
    )
    assert proc.stdout is not None  # noqa: S101 - piped above
    output = threading.Event()
    reader = threading.Thread(target=_drain, args=(proc.stdout, output), daemon=True)
    reader.start()
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in launch.headers}
    try:
        yield Direct(proc, port, headers, output)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()


def wait_healthy(direct: Direct, path: str, timeout: float) -> None:
    """Poll the health URL on swapd's schedule until it answers 200."""
    deadline = time.monotonic() + timeout
    wait = process.READY_POLL_FIRST
    while True:
        direct.output.clear()
        if _bench.http_status(direct.port, path, timeout=5) == 200:
            return
        if direct.proc.poll() is not None:
            raise RuntimeError(f"backend exited with {direct.proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"backend not healthy after {timeout:g}s")
        direct.output.wait(wait)
        wait = min(process.READY_POLL_MAX, wait * process.READY_POLL_GROWTH)


def direct_run(preset: Preset, cores: set[int] | None) -> Json:
    """One start, first request and stop of the backend on its own, timed."""
    started = time.perf_counter()
    with spawned(preset, cores) as direct:
        wait_healthy(direct, preset.health or "/health", preset.start_timeout)  # all have one
        start_s = time.perf_counter() - started
        _, request_s = chat(direct.port, preset.name, direct.headers)
        stopping = time.perf_counter()
        os.killpg(direct.proc.pid, signal.SIGTERM)
        direct.proc.wait()
        stop_s = time.perf_counter() - stopping
    return {"start_s": start_s, "first_request_s": request_s, "stop_s": stop_s}


# ---------------------------------------------------------------- through swapd


def cold_request(daemon: Swapd, model: str) -> Json:
    """A request for a model that is not running: TTFB, and swapd's CPU time meanwhile."""
    cpu = _bench.cpu_seconds(daemon.pid)
    sent = time.time()
    ttfb, total = chat(daemon.port, model)
    return {
        "sent": sent,
        "ttfb_s": ttfb,
        "total_s": total,
        "swapd_cpu_s": _bench.cpu_seconds(daemon.pid) - cpu,
    }


# Phases of a cold request, each from one of swapd's log events to the next.
PHASES = (
    ("admit", "sent", "model.evict"),
    ("stop", "model.evict", "backend.exit"),
    ("replan", "backend.exit", "model.load.start"),
    ("spawn", "model.load.start", "backend.spawn"),
    ("ready", "backend.spawn", "model.load.done"),
    ("forward", "model.load.done", "ttfb"),
)


Event = tuple[float, str, Json]


def event_times(daemon: Swapd) -> list[Event]:
    """Every event in swapd's log as (wall-clock time, name, the event), in order."""
    out = []
    for line in daemon.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event = json.loads(line)
            stamp = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
            out.append((stamp, str(event["event"]), event))
    return out


def during(run: Json, events: list[Event]) -> list[Event]:
    """The events logged while one cold request was under way (2 ms of slack each side)."""
    start, end = run["sent"], run["sent"] + run["ttfb_s"]
    return [e for e in events if start - 0.002 <= e[0] <= end + 0.002]


def backend_own(run: Json, events: list[Event]) -> float:
    """Seconds of one cold request that the backends spent on their own, from swapd's log.

    The victim's stop (``backend.exit``'s ``stop_s``: its signal until it was reaped)
    and the new backend's start: its spawn until the last line it printed before swapd
    saw it ready ("listening on ..."), so swapd's noticing is swapd's.
    """
    window = during(run, events)
    stop = sum(float(e.get("stop_s", 0.0)) for _, n, e in window if n == "backend.exit")
    spawned = next(t for t, n, _ in window if n == "backend.spawn")
    ready = next(t for t, n, _ in window if n == "model.load.done")
    printed = [t for t, n, _ in window if n == "backend.output" and spawned <= t <= ready]
    return stop + (max(printed) if printed else ready) - spawned


def timeline(run: Json, events: list[Event]) -> Json:
    """Milliseconds spent in each phase of one cold request, from swapd's own log."""
    end = run["sent"] + run["ttfb_s"]
    marks: dict[str, float] = {"sent": run["sent"], "ttfb": end}
    for stamp, name, _ in during(run, events):
        marks.setdefault(name, stamp)
    if "model.evict" not in marks:  # first load: admission runs until the load starts
        marks["model.evict"] = marks["backend.exit"] = marks.get("model.load.start", end)
    return {
        phase: 1000 * (marks[b] - marks[a]) for phase, a, b in PHASES if a in marks and b in marks
    }


def phases_summary(runs: list[Json], events: list[Event]) -> Json:
    """Median milliseconds per phase over the runs, plus swapd's CPU per cold request.

    Also notes in each run what its backends spent on their own (:func:`backend_own`).
    """
    for r in runs:
        r["backend_own_s"] = backend_own(r, events)
    lines = [timeline(r, events) for r in runs]
    medians = {
        phase: _bench.median([line[phase] for line in lines if phase in line])
        for phase, _, _ in PHASES
    }
    medians["swapd_cpu_ms_mean"] = 1000 * sum(r["swapd_cpu_s"] for r in runs) / len(runs)
    return medians


def measure_backend(kind: str, preset: Json, runs: int, cores: Cores) -> Json:
    """Interleave direct runs with first loads and swaps through swapd for one backend kind."""
    direct: list[Json] = []
    firsts: list[Json] = []
    swaps: list[Json] = []
    phases: dict[str, Json] = {}
    _bench.pin_self(cores.client)
    one = Swapd({"a": preset}, cores=cores.server)
    with _bench.running(one):
        parsed = load_presets(one.root / "presets", {})[0]
        chat(one.port, "a")  # first spawn of anything pays for cold imports: not counted
        _bench.http_json("POST", one.port, "/swapd/models/a/unload")
        for _ in range(runs):
            direct.append(direct_run(parsed, cores.server))
            firsts.append(cold_request(one, "a"))
            _bench.http_json("POST", one.port, "/swapd/models/a/unload")
        phases["first_load"] = phases_summary(firsts, event_times(one))
    two = Swapd({"a": preset, "b": preset}, settings={"max_running": 1}, cores=cores.server)
    with _bench.running(two):
        chat(two.port, "b")
        for i in range(runs):
            direct.append(direct_run(parsed, cores.server))
            swaps.append(cold_request(two, "ab"[i % 2]))
        phases["swap"] = phases_summary(swaps, event_times(two))
    return summarize_backend(kind, direct, firsts, swaps, phases)


def summarize_backend(
    kind: str, direct: list[Json], firsts: list[Json], swaps: list[Json], phases: dict[str, Json]
) -> Json:
    """Medians of the backend's own costs and swapd's share for both scenarios."""
    start = _bench.median([d["start_s"] for d in direct])
    request = _bench.median([d["first_request_s"] for d in direct])
    stop = _bench.median([d["stop_s"] for d in direct])
    first_share = [1000 * (f["ttfb_s"] - start - request) for f in firsts]
    swap_share = [1000 * (s["ttfb_s"] - stop - start - request) for s in swaps]
    first_own = [1000 * (f["ttfb_s"] - f["backend_own_s"] - request) for f in firsts]
    swap_own = [1000 * (s["ttfb_s"] - s["backend_own_s"] - request) for s in swaps]
    return {
        "backend": kind,
        "direct": {
            "start_ms": _bench.summarize([1000 * d["start_s"] for d in direct]),
            "first_request_ms": _bench.summarize([1000 * d["first_request_s"] for d in direct]),
            "stop_ms": _bench.summarize([1000 * d["stop_s"] for d in direct]),
        },
        "first_load": {
            "ttfb_ms": _bench.summarize([1000 * f["ttfb_s"] for f in firsts]),
            "swapd_share_ms": _bench.summarize(first_share),
            "swapd_share_samples_ms": first_share,
            "swapd_own_ms": _bench.summarize(first_own),
            "swapd_own_samples_ms": first_own,
            "over_backend_start_ms": _bench.median([1000 * f["ttfb_s"] for f in firsts])
            - 1000 * start,
        },
        "swap": {
            "ttfb_ms": _bench.summarize([1000 * s["ttfb_s"] for s in swaps]),
            "swapd_share_ms": _bench.summarize(swap_share),
            "swapd_share_samples_ms": swap_share,
            "swapd_own_ms": _bench.summarize(swap_own),
            "swapd_own_samples_ms": swap_own,
            "over_backend_start_ms": _bench.median([1000 * s["ttfb_s"] for s in swaps])
            - 1000 * start,
        },
        "phases_ms": phases,
    }


# ---------------------------------------------------------------- page cache


def drop_from_page_cache(path: Path) -> None:
    """Write back and drop the file's cached pages (only pages no process maps can go)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float:
    """The fraction of the file's pages in the page cache now (mincore on a fresh mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with path.open("rb") as handle:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return float("nan")
    try:
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            return float("nan")
        return sum(b & 1 for b in vec) / pages
    finally:
        libc.munmap(addr, size)


def cold_read_mib_s(path: Path) -> float:
    """How fast the file reads with its pages dropped (MiB/s): what "cold" costs here."""
    drop_from_page_cache(path)
    started = time.perf_counter()
    with path.open("rb", buffering=0) as handle:
        while handle.read(1 << 20):
            pass
    return path.stat().st_size / 1024**2 / (time.perf_counter() - started)


def cold_vs_cached(preset: Preset, model: Path, runs: int, cores: Cores) -> Json:
    """llama-server start (spawn to health 200) with the GGUF evicted vs cached, alternating."""
    cold: list[float] = []
    cached: list[float] = []
    resident: list[float] = []
    read_speed: list[float] = []
    for _ in range(runs):
        read_speed.append(cold_read_mib_s(model))
        drop_from_page_cache(model)
        resident.append(resident_fraction(model))
        cold.append(1000 * direct_run(preset, cores.server)["start_s"])
        cached.append(1000 * direct_run(preset, cores.server)["start_s"])
    return {
        "model_mib": round(model.stat().st_size / 1024**2, 1),
        "resident_before_cold": _bench.summarize(resident),
        "cold_read_mib_s": _bench.summarize(read_speed),
        "cold_start_ms": _bench.summarize(cold),
        "cached_start_ms": _bench.summarize(cached),
        "ratio_p50": _bench.median(cold) / _bench.median(cached),
    }


# ---------------------------------------------------------------- main


def presets_for(kind: str, cache_dir: Path) -> tuple[Json, Path | None]:
    """The preset for one backend kind (and the model file, for llama)."""
    if kind == "fake":
        return {"backend": "command", "cmd": _bench.fake_cmd("fake")}, None
    model = _bench.gemma_model(cache_dir)
    args = ["-c", "2048", "-np", "1", "-t", "1"]
    return {"backend": "llama-server", "model": str(model), "args": args}, model


def combine_rounds(rounds: list[Json]) -> Json:
    """One backend's rounds: each figure's median over the rounds and range, and all runs."""
    last = rounds[-1]
    combined: Json = {"backend": last["backend"], "rounds": rounds}
    combined["direct"] = {
        key: _spread([r["direct"][key]["p50"] for r in rounds]) for key in last["direct"]
    }
    for scenario in ("first_load", "swap"):
        pooled = [v for r in rounds for v in r[scenario]["swapd_share_samples_ms"]]
        combined[scenario] = {
            "ttfb_p50_ms": _spread([r[scenario]["ttfb_ms"]["p50"] for r in rounds]),
            "swapd_share_p50_ms": _spread([r[scenario]["swapd_share_ms"]["p50"] for r in rounds]),
            "swapd_share_p99_ms": _spread([r[scenario]["swapd_share_ms"]["p99"] for r in rounds]),
            "swapd_share_all_runs_ms": _bench.summarize(pooled),
            "swapd_own_all_runs_ms": _bench.summarize(
                [v for r in rounds for v in r[scenario]["swapd_own_samples_ms"]]
            ),
            "over_backend_start_ms": _spread(
                [r[scenario]["over_backend_start_ms"] for r in rounds]
            ),
        }
    combined["phases_ms"] = {
        sc: {
            phase: _bench.median([r["phases_ms"][sc].get(phase, float("nan")) for r in rounds])
            for phase in last["phases_ms"][sc]
        }
        for sc in last["phases_ms"]
    }
    return combined


def _spread(values: list[float]) -> Json:
    return {"median": _bench.median(values), "min": min(values), "max": max(values)}


def _cell(spread: Json) -> str:
    """``median (min-max)`` over the rounds."""
    return f"{spread['median']:.3g} ({spread['min']:.3g}-{spread['max']:.3g})"


def print_report(results: list[Json], cache: Json | None, pinned: str) -> None:
    """The swap table and the page-cache table."""
    rounds = len(results[0]["rounds"]) if results else 0
    print(
        f"\nswapd's share of a cold request (ms; backend costs measured directly in the same "
        f"rounds; median over {rounds} rounds (range); all runs pooled for p99); {pinned}"
    )
    rows = []
    for r in results:
        d = r["direct"]
        for scenario in ("first_load", "swap"):
            s = r[scenario]
            pooled = s["swapd_share_all_runs_ms"]
            rows.append(
                [
                    f"{r['backend']}/{scenario}",
                    _cell(s["ttfb_p50_ms"]),
                    _cell(d["stop_ms"]) if scenario == "swap" else "0",
                    _cell(d["start_ms"]),
                    _cell(d["first_request_ms"]),
                    _cell(s["swapd_share_p50_ms"]),
                    _cell(s["swapd_share_p99_ms"]),
                    f"{pooled['p50']:.3g} / {pooled['p99']:.3g} ({pooled['n']})",
                    _cell(s["over_backend_start_ms"]),
                ]
            )
    _bench.print_table(
        [
            "backend/scenario",
            "TTFB p50",
            "stop p50",
            "start p50",
            "1st req p50",
            "swapd share p50",
            "share p99",
            "all runs p50 / p99 (n)",
            "TTFB - start",
        ],
        rows,
    )
    print(
        "\nswapd's own work per cold request (ms; TTFB - the backends' own stop and start, "
        "each from swapd's log for that very request - a direct first request; see "
        "backend_own), all runs pooled"
    )
    _bench.print_table(
        ["backend/scenario", "p50", "p90", "p99", "max", "n"],
        [
            [
                f"{r['backend']}/{sc}",
                *(r[sc]["swapd_own_all_runs_ms"][k] for k in ("p50", "p90", "p99", "max", "n")),
            ]
            for r in results
            for sc in ("first_load", "swap")
        ],
    )
    print("\nphases of a cold request through swapd (ms, medians, from swapd's log)")
    _bench.print_table(
        ["backend/scenario", *(p for p, _, _ in PHASES), "swapd CPU"],
        [
            [
                f"{r['backend']}/{sc}",
                *(ph.get(p, float("nan")) for p, _, _ in PHASES),
                ph["swapd_cpu_ms_mean"],
            ]
            for r in results
            for sc, ph in r["phases_ms"].items()
        ],
    )
    if cache is not None:
        print(f"\nllama-server start without swapd, GGUF {cache['model_mib']} MiB (ms)")
        _bench.print_table(
            ["case", "p50", "p90", "min", "resident before"],
            [
                [
                    "page cache dropped",
                    cache["cold_start_ms"]["p50"],
                    cache["cold_start_ms"]["p90"],
                    cache["cold_start_ms"]["min"],
                    cache["resident_before_cold"].get("p50", float("nan")),
                ],
                [
                    "page cache warm",
                    cache["cached_start_ms"]["p50"],
                    cache["cached_start_ms"]["p90"],
                    cache["cached_start_ms"]["min"],
                    1.0,
                ],
            ],
        )
        print(
            f"cold/cached ratio (p50): {cache['ratio_p50']:.2f}; the file reads at "
            f"{cache['cold_read_mib_s']['p50']:.0f} MiB/s with its pages dropped"
        )


def parse_args() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backends", default="fake,llama", help="comma list of fake, llama")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each with fresh swapd instances")
    p.add_argument(
        "--runs", type=int, help="runs per scenario and round (default 10 fake, 4 llama)"
    )
    p.add_argument("--quick", action="store_true", help="a few runs of each")
    p.add_argument("--free", action="store_true", help="pin nothing (default: client on core 0)")
    p.add_argument("--cache-dir", type=Path, default=_bench.default_cache_dir())
    p.add_argument("--out", type=Path, default=Path("out/bench_swap.json"))
    return p.parse_args()


def main() -> None:
    """Run every backend kind, print the tables, write the JSON."""
    args = parse_args()
    info = _bench.machine_info()
    info["cpu_capacity_start"] = _bench.parallel_capacity()
    _bench.print_machine(info)
    cores = choose_cores(free=args.free)
    pinned = (
        "nothing pinned"
        if cores.client is None
        else f"pinned: client on cores {sorted(cores.client)}, swapd and backends on "
        f"{sorted(cores.server or [])}"
    )
    results = []
    cache = None
    for kind in args.backends.split(","):
        runs = args.runs or (2 if args.quick else (10 if kind == "fake" else 4))
        preset, model = presets_for(kind, args.cache_dir)
        rounds = []
        for r in range(args.rounds):
            print(f"running {kind}, round {r + 1}/{args.rounds} ({runs} runs) ...", flush=True)
            rounds.append(measure_backend(kind, preset, runs, cores))
        results.append(combine_rounds(rounds))
        if model is not None:
            parsed = Preset(
                name="cold",
                file="cold.yaml",
                backend="llama-server",
                model=model,
                args=tuple(preset["args"]),
            )
            cache = cold_vs_cached(parsed, model, max(3, runs * args.rounds // 2), cores)
    print_report(results, cache, pinned)
    info["pinned"] = pinned
    info["cores"] = {
        "client": sorted(cores.client or []),
        "swapd_and_backends": sorted(cores.server or []),
    }
    _bench.write_json(
        args.out, {"machine": _bench.finish_info(info), "results": results, "page_cache": cache}
    )


if __name__ == "__main__":
    main()
