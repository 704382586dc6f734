"""swapd's own share of a model load and of a swap, against the backend's own costs.

Definitions (the same for every backend kind):

* backend start  -- spawn to the first 200 from its health URL, the backend run
  directly (same argv and environment as swapd would use), health polled every 1 ms;
* backend first request -- the first chat request's latency on that fresh backend;
* backend stop   -- SIGTERM to its process group until the leader is reaped;
* cold TTFB      -- through swapd, a chat request for a model that is not running
  until its response headers arrive;
* swapd's share of a first load = cold TTFB - (start + first request);
* swapd's share of a swap (``max_running: 1``, alternating two presets)
  = cold TTFB - (stop + start + first request).

The backend's costs are medians of direct runs interleaved with the swapd runs in
the same process, on the same cores. Also measured, without swapd: llama-server's
start with the GGUF evicted from the page cache vs with it cached.

    python scripts/bench_swap.py [--backends fake,llama] [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import _bench
from _bench import Json, Swapd
from swapd.backends import build_launch
from swapd.presets import Preset, load_presets

HEALTH_POLL = 0.001
BODY = {"model": "", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1}


@dataclass(frozen=True)
class Cores:
    """The benchmark (client and health poller) on one core, swapd and backends on another."""

    client: set[int] | None
    server: set[int] | None


def choose_cores() -> Cores:
    """Split two cores between the client and the servers; pin nothing on one core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:  # noqa: PLR2004
        return Cores(None, None)
    return Cores({cores[0]}, {cores[1]})


# ---------------------------------------------------------------- requests


def chat(port: int, model: str) -> tuple[float, float]:
    """One small chat request; return (seconds to response headers, seconds to the end)."""
    body = json.dumps({**BODY, "model": model})
    conn = http.client.HTTPConnection(_bench.LOOPBACK, port, timeout=600)
    try:
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        ttfb = time.perf_counter() - started
        resp.read()
        if resp.status != 200:  # noqa: PLR2004
            raise RuntimeError(f"HTTP {resp.status} for {model}")
        return ttfb, time.perf_counter() - started
    finally:
        conn.close()


# ---------------------------------------------------------------- direct runs


@contextlib.contextmanager
def spawned(preset: Preset, cores: set[int] | None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start the backend directly with swapd's argv on a free port; always stop it."""
    port = _bench.free_port()
    launch = build_launch(preset, port)
    proc = subprocess.Popen(  # noqa: PLW1509 - the pin must happen before exec
        list(launch.argv),
        env=dict(launch.env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_bench.pinner(cores),
    )
    try:
        yield proc, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_healthy(proc: subprocess.Popen[bytes], port: int, path: str, timeout: float) -> None:
    """Poll the health URL every millisecond until it answers 200."""
    deadline = time.monotonic() + timeout
    while _bench.http_status(port, path, timeout=5) != 200:  # noqa: PLR2004
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"backend not healthy after {timeout:g}s")
        time.sleep(HEALTH_POLL)


def direct_run(preset: Preset, cores: set[int] | None) -> Json:
    """One start, first request and stop of the backend on its own, timed."""
    started = time.perf_counter()
    with spawned(preset, cores) as (proc, port):
        wait_healthy(proc, port, preset.health, preset.start_timeout)
        start_s = time.perf_counter() - started
        _, request_s = chat(port, preset.name)
        stopping = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        stop_s = time.perf_counter() - stopping
    return {"start_s": start_s, "first_request_s": request_s, "stop_s": stop_s}


# ---------------------------------------------------------------- through swapd


def first_load(daemon: Swapd) -> Json:
    """A request for a stopped model (nothing to evict), then unload it again."""
    ttfb, total = chat(daemon.port, "a")
    _bench.http_json("POST", daemon.port, "/swapd/models/a/unload")
    return {"ttfb_s": ttfb, "total_s": total}


def swap(daemon: Swapd, target: str) -> Json:
    """A request for ``target`` while the other preset is the one running model."""
    ttfb, total = chat(daemon.port, target)
    return {"ttfb_s": ttfb, "total_s": total, "target": target}


def scenario_events(daemon: Swapd) -> Json:
    """swapd's own view: stop times of evicted backends and load times, from its log."""
    exits = [float(e["stop_s"]) for e in daemon.events("backend.exit")]
    loads = [float(e["load_s"]) for e in daemon.events("model.load.done")]
    return {"backend_exit_stop_s": _bench.summarize(exits), "load_done_s": _bench.summarize(loads)}


def measure_backend(kind: str, preset: Json, runs: int, cores: Cores) -> Json:
    """Interleave direct runs with first loads and swaps through swapd for one backend kind."""
    direct: list[Json] = []
    firsts: list[Json] = []
    swaps: list[Json] = []
    events: dict[str, Json] = {}
    _bench.pin_self(cores.client)
    one = Swapd({"a": preset}, cores=cores.server)
    with _bench.running(one):
        parsed = load_presets(one.root / "presets", {})[0]
        chat(one.port, "a")  # first spawn of anything pays for cold imports: not counted
        _bench.http_json("POST", one.port, "/swapd/models/a/unload")
        for _ in range(runs):
            direct.append(direct_run(parsed, cores.server))
            firsts.append(first_load(one))
        events["first_load"] = scenario_events(one)
    two = Swapd({"a": preset, "b": preset}, settings={"max_running": 1}, cores=cores.server)
    with _bench.running(two):
        chat(two.port, "b")
        for i in range(runs):
            direct.append(direct_run(parsed, cores.server))
            swaps.append(swap(two, "ab"[i % 2]))
        events["swap"] = scenario_events(two)
    return summarize_backend(kind, direct, firsts, swaps, events)


def summarize_backend(
    kind: str, direct: list[Json], firsts: list[Json], swaps: list[Json], events: dict[str, Json]
) -> Json:
    """Medians of the backend's own costs and swapd's share for both scenarios."""
    start = _bench.median([d["start_s"] for d in direct])
    request = _bench.median([d["first_request_s"] for d in direct])
    stop = _bench.median([d["stop_s"] for d in direct])
    first_share = [1000 * (f["ttfb_s"] - start - request) for f in firsts]
    swap_share = [1000 * (s["ttfb_s"] - stop - start - request) for s in swaps]
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
            "over_backend_start_ms": _bench.median([1000 * f["ttfb_s"] for f in firsts])
            - 1000 * start,
        },
        "swap": {
            "ttfb_ms": _bench.summarize([1000 * s["ttfb_s"] for s in swaps]),
            "swapd_share_ms": _bench.summarize(swap_share),
            "over_backend_start_ms": _bench.median([1000 * s["ttfb_s"] for s in swaps])
            - 1000 * start,
        },
        "swapd_events": events,
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
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
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


def cold_vs_cached(preset: Preset, model: Path, runs: int, cores: Cores) -> Json:
    """llama-server start (spawn to health 200) with the GGUF evicted vs cached, alternating."""
    cold: list[float] = []
    cached: list[float] = []
    resident: list[float] = []
    for _ in range(runs):
        drop_from_page_cache(model)
        resident.append(resident_fraction(model))
        cold.append(1000 * direct_run(preset, cores.server)["start_s"])
        cached.append(1000 * direct_run(preset, cores.server)["start_s"])
    return {
        "model_mib": round(model.stat().st_size / 1024**2, 1),
        "resident_before_cold": _bench.summarize(resident),
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


def print_report(results: list[Json], cache: Json | None) -> None:
    """The swap table and the page-cache table."""
    print("\nswapd's share of a cold request (ms; backend costs measured directly, same run)")
    rows = []
    for r in results:
        d = r["direct"]
        for scenario in ("first_load", "swap"):
            s = r[scenario]
            rows.append(
                [f"{r['backend']}/{scenario}", s["ttfb_ms"]["p50"],
                 d["stop_ms"]["p50"] if scenario == "swap" else 0.0, d["start_ms"]["p50"],
                 d["first_request_ms"]["p50"], s["swapd_share_ms"]["p50"],
                 s["swapd_share_ms"]["p90"], s["over_backend_start_ms"]]
            )
    _bench.print_table(
        ["backend/scenario", "TTFB p50", "stop p50", "start p50", "1st req p50",
         "swapd share p50", "share p90", "TTFB - start"],
        rows,
    )
    if cache is not None:
        print(f"\nllama-server start without swapd, GGUF {cache['model_mib']} MiB (ms)")
        _bench.print_table(
            ["case", "p50", "p90", "min", "resident before"],
            [
                ["page cache dropped", cache["cold_start_ms"]["p50"],
                 cache["cold_start_ms"]["p90"], cache["cold_start_ms"]["min"],
                 cache["resident_before_cold"].get("p50", float("nan"))],
                ["page cache warm", cache["cached_start_ms"]["p50"],
                 cache["cached_start_ms"]["p90"], cache["cached_start_ms"]["min"], 1.0],
            ],
        )
        print(f"cold/cached ratio (p50): {cache['ratio_p50']:.2f}")


def parse_args() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backends", default="fake,llama", help="comma list of fake, llama")
    p.add_argument("--runs", type=int, help="runs per scenario (default 30 fake, 12 llama)")
    p.add_argument("--quick", action="store_true", help="a few runs of each")
    p.add_argument("--cache-dir", type=Path, default=_bench.default_cache_dir())
    p.add_argument("--out", type=Path, default=Path("out/bench_swap.json"))
    return p.parse_args()


def main() -> None:
    """Run every backend kind, print the tables, write the JSON."""
    args = parse_args()
    info = _bench.machine_info()
    _bench.print_machine(info)
    cores = choose_cores()
    results = []
    cache = None
    for kind in args.backends.split(","):
        runs = args.runs or (4 if args.quick else (30 if kind == "fake" else 12))
        preset, model = presets_for(kind, args.cache_dir)
        print(f"running {kind} ({runs} runs per scenario) ...", flush=True)
        results.append(measure_backend(kind, preset, runs, cores))
        if model is not None:
            parsed = Preset(name="cold", file="cold.yaml", backend="llama-server", model=model,
                            args=tuple(preset["args"]))
            cache = cold_vs_cached(parsed, model, max(3, runs // 2), cores)
    print_report(results, cache)
    info["cores"] = {"client": sorted(cores.client or []), "swapd_and_backends":
                     sorted(cores.server or [])}
    _bench.write_json(
        args.out, {"machine": _bench.finish_info(info), "results": results, "page_cache": cache}
    )


if __name__ == "__main__":
    main()
