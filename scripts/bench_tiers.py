"""The tiers: Gemma from ram and from a cold disk, swapd's share of a wake, parallel starts.

Each part measures swapd against a baseline taken in the same run, interleaved round by round:

* gemma -- llama-server with Gemma 3 270M loaded through swapd (``POST
  /swapd/models/g/load`` until it answers, so spawn to healthy) from the ram tier (its
  TTL expired: stopped, GGUF pages locked by swapd) and from a cold disk (unloaded, then
  the file dropped from the page cache); baseline: the same llama-server started directly
  (swapd's own argv, health polled every 5 ms as swapd does) with the file cached and
  with it dropped.
* poll -- the baseline's own cost: direct llama-server starts with health polled every
  1 ms against every 5 ms (a llama-server answers each poll on the core it loads on).
* wake -- a fake vLLM (``tests/fakes/fake_vllm.py``, sleep level 1) that its TTL has put
  to sleep is woken by a request through swapd; swapd's share = the request's time to
  response headers - the backend's own ``/wake_up`` - a direct request's latency. Both
  baselines come from a second fake vLLM with the same argv, run by this script: put to
  sleep with ``/sleep``, woken with ``/wake_up`` on a kept-alive connection (as swapd's
  pool does), then sent the same request directly.
* swap -- bench_swap.py's llama-server swap (``max_running: 1``, two presets of one GGUF
  requested in turn) through two swapds at once, one with the ram tier and one with
  ``ram_budget: 0``, interleaved with direct runs (polled every 5 ms): what demoting to
  the ram tier adds, and the time from each eviction to the victim's pages being locked.
* parallel -- two fake models on the probe file's two fake GPUs, each with a start delay,
  requested at once: wall time for both against one alone, through swapd and directly.
* costs -- in this process, no baseline: ``WarmSet.open``/``close`` of the GGUF (what the
  ram tier does at each llama-server stop and start) and one host memory reading.

    python scripts/bench_tiers.py [--parts gemma,poll,wake,swap,parallel,costs] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import _bench
import psutil
from _bench import Json, Swapd
from bench_swap import (
    PHASES,
    Cores,
    chat,
    choose_cores,
    cold_request,
    event_times,
    phases_summary,
    spawned,
)
from fakes import probe_file

from swapd.backends import Placement, build_launch
from swapd.pages import WarmSet, drop_cache, resident_bytes
from swapd.presets import Preset, load_presets
from swapd.probe import HostRamProbe
from swapd.probe._tree import process_trees

REPO = _bench.REPO
FAKE_VLLM = REPO / "tests" / "fakes" / "fake_vllm.py"
GIB = 1024**3
# A clean file nobody maps drops to nothing; allow a page or two.
SLACK = 2 * os.sysconf("SC_PAGE_SIZE")
# Pause after a model reaches a tier before timing it, so that swapd's own follow-up work
# (the ram-budget check after a demotion) is done, as it is long done for a real request.
SETTLE = 0.05
ALL_CORES = frozenset(os.sched_getaffinity(0))
# Direct starts are polled as often as swapd polls a starting backend. A llama-server
# answers every poll on the core it loads on: polled every 1 ms (as bench_swap.py does),
# its start took 17 ms longer at the median on the 2-core machine of docs/benchmarks.md
# (the ``poll`` part measures it).
DIRECT_POLL = 0.005
SHARE_STATS = ("p50", "p90", "p99", "max")
LLAMA_ARGS = ["-c", "2048", "-np", "1", "-t", "1"]  # as bench_swap.py


# ---------------------------------------------------------------- helpers


def presets_of(daemon: Swapd) -> dict[str, Preset]:
    """The daemon's presets as swapd parses them (for swapd's own argv)."""
    return {p.name: p for p in load_presets(daemon.root / "presets", {})}


def log_events(daemon: Swapd) -> list[Json]:
    """Every event in swapd's log, with its wall-clock time as ``t``."""
    out = []
    for line in daemon.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event = json.loads(line)
            event["t"] = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
            out.append(event)
    return out


@contextlib.contextmanager
def direct(preset: Preset, placement: Placement, cores: set[int] | None) -> Iterator[int]:
    """Start a backend ourselves with swapd's argv and environment; yield its port."""
    port = _bench.free_port()
    launch = build_launch(preset, port, placement)
    proc = subprocess.Popen(
        list(launch.argv),
        env=dict(launch.env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_bench.pinner(cores),  # noqa: PLW1509 - pin before exec; no threads here
    )
    try:
        wait_ready(proc, port, preset)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(
    proc: subprocess.Popen[bytes], port: int, preset: Preset, interval: float = DIRECT_POLL
) -> None:
    """Poll the health URL every ``interval`` until it answers 200."""
    deadline = time.monotonic() + preset.start_timeout
    while _bench.http_status(port, preset.health or "/health", timeout=5) != 200:  # all have one
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"backend not healthy after {preset.start_timeout:g}s")
        time.sleep(interval)


def direct_cycle(preset: Preset, cores: set[int] | None) -> Json:
    """bench_swap.py's direct run (start, first request, stop), polled every DIRECT_POLL."""
    started = time.perf_counter()
    with spawned(preset, cores) as direct:
        wait_ready(direct.proc, direct.port, preset)
        start_s = time.perf_counter() - started
        _, request_s = chat(direct.port, preset.name, direct.headers)
        stopping = time.perf_counter()
        os.killpg(direct.proc.pid, signal.SIGTERM)
        direct.proc.wait()
        stop_s = time.perf_counter() - stopping
    return {"start_s": start_s, "first_request_s": request_s, "stop_s": stop_s}


def timed_call(conn: http.client.HTTPConnection, method: str, path: str) -> float:
    """Seconds for one exchange on a kept-alive connection, body read."""
    started = time.perf_counter()
    conn.request(method, path)
    resp = conn.getresponse()
    resp.read()
    elapsed = time.perf_counter() - started
    if resp.status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {resp.status}")
    return elapsed


def ms(values: list[float]) -> Json:
    """Summary of a sample given in seconds, in milliseconds."""
    return _bench.summarize([1000 * v for v in values])


# ---------------------------------------------------------------- gemma: ram tier vs cold disk


def in_ram(daemon: Swapd) -> bool:
    """Stopped by its TTL with the GGUF's pages held by swapd."""
    model = daemon.model("g")
    return (model["state"], model["tier"]) == ("stopped", "ram") and model["pages"] is not None


def to_ram(daemon: Swapd) -> None:
    """Bring the model to the ram tier (load it first if it is on disk), then settle."""
    model = daemon.model("g")
    if (model["state"], model["tier"]) == ("stopped", "disk"):
        daemon.load("g")
    _bench.wait_until(lambda: in_ram(daemon), timeout=60, interval=0.01)
    time.sleep(SETTLE)


def to_cold_disk(daemon: Swapd, model: Path) -> None:
    """Unload (drops swapd's hold), then drop the file from the page cache."""
    _bench.http_json("POST", daemon.port, "/swapd/models/g/unload")
    # swapd closes the hold in a thread after unload answers: retry until nothing stays.
    _bench.wait_until(lambda: drop_cache(model).after <= SLACK, timeout=30, interval=0.05)


def swapd_load(daemon: Swapd) -> Json:
    """Time one load through swapd; swapd's own ``load_s`` from its log as well."""
    started = time.perf_counter()
    daemon.load("g")
    elapsed = time.perf_counter() - started
    done = daemon.events("model.load.done")[-1]
    return {"s": elapsed, "swapd_load_s": float(done["load_s"]), "how": done["how"]}


def direct_start(preset: Preset, cores: set[int] | None) -> Json:
    """Spawn llama-server with swapd's argv and time it to health 200 (every DIRECT_POLL)."""
    started = time.perf_counter()
    with spawned(preset, cores) as direct:
        wait_ready(direct.proc, direct.port, preset)
        return {"s": time.perf_counter() - started}


GEMMA_CASES = ("swapd/ram", "swapd/cold", "direct/warm", "direct/cold")


def gemma_part(model: Path, rounds: int, cores: Cores) -> Json:
    """Interleave the four cases, rotating their order each round."""
    preset = {"backend": "llama-server", "model": str(model), "args": LLAMA_ARGS, "ttl": "300ms"}
    _bench.pin_self(cores.client)
    daemon = Swapd({"g": preset}, cores=cores.server)
    runs: dict[str, list[Json]] = {case: [] for case in GEMMA_CASES}
    size = model.stat().st_size
    with _bench.running(daemon):
        parsed = presets_of(daemon)["g"]
        daemon.load("g")  # the first start pays for cold imports: not counted
        direct_start(parsed, cores.server)  # and the first `llama-server --help`
        for i in range(rounds):
            shift = i % len(GEMMA_CASES)
            for case in GEMMA_CASES[shift:] + GEMMA_CASES[:shift]:
                to_ram(daemon)
                if case.endswith("cold"):
                    to_cold_disk(daemon, model)
                resident = resident_bytes(model) / size
                run = (
                    swapd_load(daemon)
                    if case.startswith("swapd")
                    else direct_start(parsed, cores.server)
                )
                run["resident_before"] = resident
                runs[case].append(run)
        to_ram(daemon)
        pages = daemon.model("g")["pages"]
    return summarize_gemma(runs, size, pages)


def summarize_gemma(runs: dict[str, list[Json]], size: int, pages: Json) -> Json:
    """Per case: times and residency; ratios against the direct starts."""
    cases = {
        case: {
            "ms": ms([r["s"] for r in found]),
            "resident_before": _bench.summarize([r["resident_before"] for r in found]),
            **(
                {"swapd_load_ms": ms([r["swapd_load_s"] for r in found])}
                if case.startswith("swapd")
                else {}
            ),
        }
        for case, found in runs.items()
    }
    out: Json = {
        "model_mib": round(size / 1024**2, 1),
        "pages_in_ram_tier": pages,
        "cases": cases,
    }
    # The minimum is the run least disturbed by other work on a shared machine.
    for stat in ("p50", "min"):
        t = {case: cases[case]["ms"][stat] for case in cases}
        out[f"ratios_{stat}"] = {
            "swapd_ram/direct_warm": t["swapd/ram"] / t["direct/warm"],
            "swapd_cold/direct_cold": t["swapd/cold"] / t["direct/cold"],
            "swapd_cold/swapd_ram": t["swapd/cold"] / t["swapd/ram"],
            "direct_cold/direct_warm": t["direct/cold"] / t["direct/warm"],
        }
        out[f"added_{stat}_ms"] = {
            "ram": t["swapd/ram"] - t["direct/warm"],
            "cold": t["swapd/cold"] - t["direct/cold"],
        }
    return out


# ---------------------------------------------------------------- wake: swapd's share


def vllm_binary(folder: Path) -> str:
    """An executable named vllm that runs the fake vLLM with this interpreter."""
    path = folder / "bin" / "vllm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_VLLM} "$@"\n')
    path.chmod(0o755)
    return str(path)


def wake_part(wakes: int, cores: Cores, hold_mib: int) -> Json:
    """Wake a sleeping fake vLLM through swapd ``wakes`` times, each against direct calls."""
    folder = Path(tempfile.mkdtemp(prefix="swapd-bench-wake-"))
    (folder / "model").mkdir()
    (folder / "model" / "weights.safetensors").write_bytes(b"\0" * 1024)
    common = {
        "backend": "vllm",
        "model": str(folder / "model"),
        "binary": vllm_binary(folder),
        "sleep": 1,
        "memory": "256MiB",
    }
    os.environ["FAKE_VLLM_HOLD_BYTES"] = str(hold_mib * 1024**2)
    _bench.pin_self(cores.client)
    daemon = Swapd({"v": {**common, "ttl": "100ms"}, "awake": common}, cores=cores.server)
    rounds: list[Json] = []
    try:
        with _bench.running(daemon):
            parsed = presets_of(daemon)["v"]
            with direct(parsed, Placement(sleep_level=1), cores.server) as port:
                conn = http.client.HTTPConnection(_bench.LOOPBACK, port, timeout=60)
                daemon.load("awake")
                for _ in range(5):  # warm both paths up (first requests, imports)
                    chat(daemon.port, "v")
                    chat(daemon.port, "awake")
                    chat(port, "v")
                rounds.extend(one_wake(daemon, conn, port) for _ in range(wakes))
                conn.close()
            events = log_events(daemon)
    finally:
        os.environ.pop("FAKE_VLLM_HOLD_BYTES", None)
        shutil.rmtree(folder, ignore_errors=True)
    return summarize_wake(rounds, events)


def one_wake(daemon: Swapd, conn: http.client.HTTPConnection, port: int) -> Json:
    """One wake through swapd, then the same through the direct fake, then an awake request."""

    def asleep() -> bool:
        return bool(daemon.model("v")["state"] == "asleep")

    _bench.wait_until(asleep, timeout=30, interval=0.005)
    time.sleep(SETTLE)
    sent = time.time()
    ttfb, _ = chat(daemon.port, "v")
    timed_call(conn, "POST", "/sleep?level=1")
    wake_up = timed_call(conn, "POST", "/wake_up")
    is_sleeping = timed_call(conn, "GET", "/is_sleeping")
    direct_ttfb, _ = chat(port, "v")
    awake_ttfb, _ = chat(daemon.port, "awake")
    return {
        "sent": sent,
        "ttfb_s": ttfb,
        "wake_up_s": wake_up,
        "is_sleeping_s": is_sleeping,
        "direct_ttfb_s": direct_ttfb,
        "awake_through_ttfb_s": awake_ttfb,
    }


def wake_phases(run: Json, events: list[Json]) -> Json | None:
    """From swapd's log: admission until the wake call, the wake, ready, and the forward."""
    end = run["sent"] + run["ttfb_s"]
    found = {
        e["event"]: e
        for e in events
        if e.get("model") == "v"
        and run["sent"] - 0.002 <= e["t"] <= end + 0.002
        and e["event"] in ("model.wake", "model.load.done")
    }
    if len(found) < 2:
        return None
    woke = found["model.wake"]
    done = found["model.load.done"]
    return {
        "admit_ms": 1000 * (woke["t"] - float(woke["wake_s"]) - run["sent"]),
        "wake_ms": 1000 * float(woke["wake_s"]),
        "ready_ms": 1000 * (done["t"] - woke["t"]),
        "forward_ms": 1000 * (end - done["t"]),
        "load_s": float(done["load_s"]),
        "how": done["how"],
    }


def summarize_wake(rounds: list[Json], events: list[Json]) -> Json:
    """swapd's share of each wake, with the baselines' medians and paired per round."""
    wake_up = _bench.median([r["wake_up_s"] for r in rounds])
    direct_ttfb = _bench.median([r["direct_ttfb_s"] for r in rounds])
    share = [r["ttfb_s"] - wake_up - direct_ttfb for r in rounds]
    paired = [r["ttfb_s"] - r["wake_up_s"] - r["direct_ttfb_s"] for r in rounds]
    phases = [p for p in (wake_phases(r, events) for r in rounds) if p is not None]
    return {
        "wakes": len(rounds),
        "how": sorted({p["how"] for p in phases}),
        "ttfb_ms": ms([r["ttfb_s"] for r in rounds]),
        "backend_wake_up_ms": ms([r["wake_up_s"] for r in rounds]),
        "backend_is_sleeping_ms": ms([r["is_sleeping_s"] for r in rounds]),
        "direct_request_ms": ms([r["direct_ttfb_s"] for r in rounds]),
        "awake_through_ms": ms([r["awake_through_ttfb_s"] for r in rounds]),
        "swapd_share_ms": ms(share),
        "swapd_share_paired_ms": ms(paired),
        "phases_ms": {
            key: _bench.summarize([p[key] for p in phases])
            for key in ("admit_ms", "wake_ms", "ready_ms", "forward_ms")
        },
        "swapd_load_ms": ms([p["load_s"] for p in phases]),
    }


# ---------------------------------------------------------------- poll: the baseline's own cost


def poll_part(model: Path, rounds: int, cores: Cores) -> Json:
    """Direct llama-server starts polled every 1 ms and every 5 ms, alternating."""
    _bench.pin_self(cores.client)
    preset = Preset(
        name="g", file="g.yaml", backend="llama-server", model=model, args=tuple(LLAMA_ARGS)
    )
    times: dict[str, list[float]] = {"1 ms": [], "5 ms": []}
    for i in range(rounds + 1):
        order = [("1 ms", 0.001), ("5 ms", 0.005)]
        for key, interval in order[i % 2 :] + order[: i % 2]:
            started = time.perf_counter()
            with spawned(preset, cores.server) as direct:
                wait_ready(direct.proc, direct.port, preset, interval)
                if i:  # the first round pays for `llama-server --help`: not counted
                    times[key].append(time.perf_counter() - started)
    return {key: ms(values) for key, values in times.items()}


# ---------------------------------------------------------------- swap: the ram tier's cost


def page_holds(events: list[Json]) -> list[float]:
    """Milliseconds from each eviction to its victim entering the ram tier (pages locked)."""
    holds = []
    for i, event in enumerate(events):
        if event["event"] != "model.evict":
            continue
        for later in events[i + 1 :]:
            if later["event"] == "backend.exit":
                break  # stopped without a hold
            if later["event"] == "model.tier" and later.get("tier") == "ram":
                holds.append(1000 * (later["t"] - event["t"]))
                break
    return holds


def own_phases(run: Json, events: list[Json]) -> Json | None:
    """The parts of one swap that are swapd's alone, from its log (ms).

    admit (request to ``model.evict``), stop bookkeeping (``model.evict`` to
    ``backend.exit`` less the backend's own exit, ``stop_s``: locking the victim's pages
    falls here), replan (to ``model.load.start``) and spawn (to ``backend.spawn``). Not
    in it: noticing readiness (health polled every 5 ms) and forwarding the first request.
    """
    end = run["sent"] + run["ttfb_s"]
    marks: dict[str, Json] = {}
    for event in events:
        if run["sent"] - 0.002 <= event["t"] <= end + 0.002:
            marks.setdefault(event["event"], event)
    names = ("model.evict", "backend.exit", "model.load.start", "backend.spawn")
    if not all(name in marks for name in names):
        return None
    evict, exit_, load, spawn = (marks[name]["t"] for name in names)
    out = {
        "admit": evict - run["sent"],
        "stop_bookkeeping": exit_ - evict - float(marks["backend.exit"]["stop_s"]),
        "replan": load - exit_,
        "spawn": spawn - load,
    }
    out["total"] = sum(out.values())
    return {key: 1000 * value for key, value in out.items()}


def swap_part(model: Path, runs: int, cores: Cores) -> Json:
    """llama-server swaps with the ram tier on and off, interleaved with direct runs.

    As in bench_swap.py: ``max_running: 1``, two presets of the same GGUF requested in
    turn; swapd's share = cold TTFB - (stop + start + first request), the backend's costs
    being medians of direct runs taken in the same rounds.
    """
    _bench.pin_self(cores.client)
    preset = {"backend": "llama-server", "model": str(model), "args": LLAMA_ARGS}
    pair = {"a": preset, "b": preset}
    daemons = {
        "ram tier on": Swapd(pair, settings={"max_running": 1}, cores=cores.server),
        "ram_budget 0": Swapd(
            pair, settings={"max_running": 1, "ram_budget": 0}, cores=cores.server
        ),
    }
    directs: list[Json] = []
    swaps: dict[str, list[Json]] = {name: [] for name in daemons}
    with contextlib.ExitStack() as stack:
        for daemon in daemons.values():
            stack.enter_context(_bench.running(daemon))
            chat(daemon.port, "b")  # the first spawn pays for cold imports: not counted
        parsed = presets_of(next(iter(daemons.values())))["a"]
        for i in range(runs):
            order = list(daemons.items())
            for name, daemon in order[i % 2 :] + order[: i % 2]:
                swaps[name].append(cold_request(daemon, "ab"[i % 2]))
            directs.append(direct_cycle(parsed, cores.server))
        events = {name: event_times(daemon) for name, daemon in daemons.items()}
        logs = {name: log_events(daemon) for name, daemon in daemons.items()}
    holds = {name: page_holds(found) for name, found in logs.items()}
    own = {
        name: [p for p in (own_phases(r, logs[name]) for r in found) if p is not None]
        for name, found in swaps.items()
    }
    stop = _bench.median([d["stop_s"] for d in directs])
    start = _bench.median([d["start_s"] for d in directs])
    request = _bench.median([d["first_request_s"] for d in directs])
    return {
        "runs": runs,
        "direct": {
            "stop_ms": ms([d["stop_s"] for d in directs]),
            "start_ms": ms([d["start_s"] for d in directs]),
            "first_request_ms": ms([d["first_request_s"] for d in directs]),
            "raw": directs,
        },
        "swapd": {
            name: {
                "ttfb_ms": ms([r["ttfb_s"] for r in found]),
                "swapd_share_ms": ms([r["ttfb_s"] - stop - start - request for r in found]),
                "phases_ms": phases_summary(found, events[name]),
                "lock_pages_ms": _bench.summarize(holds[name]),
                "own_phases_ms": {
                    key: _bench.summarize([p[key] for p in own[name]])
                    for key in ("admit", "stop_bookkeeping", "replan", "spawn", "total")
                },
                "raw": [
                    {"ttfb_ms": 1000 * r["ttfb_s"], "own_ms": p}
                    for r, p in zip(found, (own_phases(r, logs[name]) for r in found), strict=True)
                ],
            }
            for name, found in swaps.items()
        },
    }


# ---------------------------------------------------------------- parallel starts


def wait_all_healthy(ports: list[int], procs: list[subprocess.Popen[bytes]]) -> None:
    """Poll every port's /health (every DIRECT_POLL) until all answer 200."""
    pending = set(range(len(ports)))
    deadline = time.monotonic() + 120
    while pending:
        for i in list(pending):
            if _bench.http_status(ports[i], "/health", timeout=5) == 200:
                pending.discard(i)
            elif procs[i].poll() is not None:
                raise RuntimeError(f"backend exited with {procs[i].returncode} while starting")
        if time.monotonic() > deadline:
            raise TimeoutError("backends not healthy after 120s")
        time.sleep(DIRECT_POLL)


def direct_starts(argvs: list[list[str]]) -> float:
    """Start these backends at once ourselves; seconds until every one is healthy."""
    ports = [_bench.free_port() for _ in argvs]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [arg.replace("${PORT}", str(port)) for arg in argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for argv, port in zip(argvs, ports, strict=True)
    ]
    try:
        wait_all_healthy(ports, procs)
        return time.perf_counter() - started
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def through_starts(
    daemon: Swapd, names: list[str], windows: list[tuple[float, float]] | None = None
) -> float:
    """Request these stopped models at once through swapd; seconds until every one answered.

    ``windows`` collects each call's wall-clock span, to find its loads in swapd's log.
    """
    with ThreadPoolExecutor(len(names)) as pool:
        wall = time.time()
        started = time.perf_counter()
        list(pool.map(lambda name: chat(daemon.port, name), names))
        elapsed = time.perf_counter() - started
    if windows is not None:
        windows.append((wall, wall + elapsed))
    for name in names:
        _bench.http_json("POST", daemon.port, f"/swapd/models/{name}/unload")
    return elapsed


def parallel_part(rounds: int, delay: float) -> Json:
    """Alone and both-at-once starts on two fake GPUs, through swapd and direct, interleaved."""
    folder = Path(tempfile.mkdtemp(prefix="swapd-bench-gpus-"))
    probe = folder / "gpus.json"
    gpu = {"total": 8 * GIB, "outside": 0}
    probe_file.write_devices(probe, {"gpu0": dict(gpu), "gpu1": dict(gpu)})

    def preset(name: str, device: int) -> Json:
        extra = ("--start-delay", f"{delay:g}", "--probe-file", str(probe), "--mem-bytes", str(GIB))
        return {
            "backend": "command",
            "cmd": _bench.fake_cmd(name, *extra),
            "memory": GIB,
            "devices": [device],
        }

    presets = {"a": preset("a", 0), "b": preset("b", 1)}
    os.environ["SWAPD_FAKE_PROBE"] = str(probe)
    # Unpinned: two Python fakes starting on one core would serialise on the CPU, not in swapd.
    os.sched_setaffinity(0, ALL_CORES)
    daemon = Swapd(presets, settings={"devices": "auto", "reserve": 0})
    times: dict[str, list[float]] = {
        k: [] for k in ("swapd/one", "swapd/two", "direct/one", "direct/two")
    }
    try:
        with _bench.running(daemon):
            pairs: list[tuple[float, float]] = []
            through_starts(daemon, ["a", "b"])  # cold imports: not counted
            both = [presets["a"]["cmd"], presets["b"]["cmd"]]
            for i in range(rounds):
                one = "ab"[i % 2]
                cases: list[tuple[str, Callable[[], float]]] = [
                    ("swapd/one", partial(through_starts, daemon, [one])),
                    ("swapd/two", partial(through_starts, daemon, ["a", "b"], pairs)),
                    ("direct/one", partial(direct_starts, [presets[one]["cmd"]])),
                    ("direct/two", partial(direct_starts, both)),
                ]
                shift = i % len(cases)
                for key, run in cases[shift:] + cases[:shift]:
                    times[key].append(run())
            events = log_events(daemon)
    finally:
        os.environ.pop("SWAPD_FAKE_PROBE", None)
        shutil.rmtree(folder, ignore_errors=True)
    return summarize_parallel(times, overlapped_pairs(events, pairs), delay)


def overlapped_pairs(events: list[Json], windows: list[tuple[float, float]]) -> Json:
    """How many timed both-at-once requests had both loads started before either was done."""
    overlapped = 0
    for first, last in windows:
        inside = [e for e in events if first - 0.002 <= e["t"] <= last + 0.002]
        starts = [e["t"] for e in inside if e["event"] == "model.load.start"]
        dones = [e["t"] for e in inside if e["event"] == "model.load.done"]
        overlapped += len(starts) == len(dones) == 2 and max(starts) < min(dones)
    return {"overlapped": overlapped, "pairs": len(windows)}


def summarize_parallel(times: dict[str, list[float]], overlaps: Json, delay: float) -> Json:
    """Medians and the two-vs-one ratios."""
    p50 = {key: _bench.median(values) for key, values in times.items()}
    return {
        "start_delay_s": delay,
        "ms": {key: ms(values) for key, values in times.items()},
        "ratio_two_over_one_p50": {
            "swapd": p50["swapd/two"] / p50["swapd/one"],
            "direct": p50["direct/two"] / p50["direct/one"],
        },
        "swapd_pairs_overlapping": overlaps,
    }


# ---------------------------------------------------------------- costs: what the findings name


def costs_part(model: Path, holds: int, reads: int) -> Json:
    """In one process: holding the GGUF's pages (the ram tier) and one host memory reading."""
    size = model.stat().st_size
    with WarmSet.open(model):  # cached before the loop, as a running backend's file is
        pass
    opens: list[float] = []
    closes: list[float] = []
    for _ in range(holds):
        started = time.perf_counter()
        warm = WarmSet.open(model)
        opens.append(time.perf_counter() - started)
        locked = warm.locked
        started = time.perf_counter()
        warm.close()
        closes.append(time.perf_counter() - started)
    probe = HostRamProbe()
    pids = [os.getpid(), os.getppid()]
    timed: dict[str, list[float]] = {"HostRamProbe.read": [], "process_trees": []}
    calls: dict[str, Callable[[], object]] = {
        "HostRamProbe.read": partial(probe.read, pids),
        "process_trees": partial(process_trees, pids),
    }
    for _ in range(reads):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            timed[name].append(time.perf_counter() - started)
    return {
        "model_mib": round(size / 1024**2, 1),
        "locked": locked,
        "warmset_open_ms": ms(opens),
        "warmset_close_ms": ms(closes),
        "processes": len(psutil.pids()),
        **{f"{name}_ms": ms(values) for name, values in timed.items()},
    }


# ---------------------------------------------------------------- report


def print_report(results: Json) -> None:
    """One table per part."""
    if "gemma" in results:
        g = results["gemma"]
        print(
            f"\nGemma load (ms; GGUF {g['model_mib']} MiB; ram-tier pages {g['pages_in_ram_tier']})"
        )
        _bench.print_table(
            ["case", "p50", "p90", "min", "max", "swapd's load_s p50", "resident before"],
            [
                [
                    case,
                    c["ms"]["p50"],
                    c["ms"]["p90"],
                    c["ms"]["min"],
                    c["ms"]["max"],
                    c.get("swapd_load_ms", {}).get("p50", "-"),
                    c["resident_before"]["p50"],
                ]
                for case, c in g["cases"].items()
            ],
        )
        for stat in ("p50", "min"):
            ratios = ", ".join(f"{k} {v:.3f}" for k, v in g[f"ratios_{stat}"].items())
            added = ", ".join(f"{k} {v:.1f}" for k, v in g[f"added_{stat}_ms"].items())
            print(f"ratios ({stat}): {ratios}; added by swapd (ms): {added}")
    if "wake" in results:
        w = results["wake"]
        print(f"\nwake ({w['wakes']} wakes, how={w['how']}; ms)")
        rows = [
            ["TTFB through swapd, asleep", w["ttfb_ms"]],
            ["backend /wake_up (direct)", w["backend_wake_up_ms"]],
            ["backend /is_sleeping (direct)", w["backend_is_sleeping_ms"]],
            ["direct request", w["direct_request_ms"]],
            ["through swapd, awake", w["awake_through_ms"]],
            ["swapd share (medians off)", w["swapd_share_ms"]],
            ["swapd share (paired)", w["swapd_share_paired_ms"]],
            *([f"phase {k}", v] for k, v in w["phases_ms"].items()),
        ]
        _bench.print_table(
            ["", "p50", "p90", "p99", "max"],
            [[name, s["p50"], s["p90"], s["p99"], s["max"]] for name, s in rows],
        )
    if "poll" in results:
        print("\ndirect llama-server start by health-poll interval (ms)")
        _bench.print_table(
            ["poll every", "p50", "p90", "min", "max"],
            [[k, v["p50"], v["p90"], v["min"], v["max"]] for k, v in results["poll"].items()],
        )
    if "swap" in results:
        w = results["swap"]
        d = w["direct"]
        print(
            f"\nllama-server swaps ({w['runs']} per daemon; ms): direct stop "
            f"{d['stop_ms']['p50']:.1f}, start {d['start_ms']['p50']:.0f}, "
            f"first request {d['first_request_ms']['p50']:.0f} (p50)"
        )
        _bench.print_table(
            ["daemon", "TTFB p50", "share p50", "share p90", "share p99", "share max"],
            [
                [name, r["ttfb_ms"]["p50"], *(r["swapd_share_ms"][k] for k in SHARE_STATS)]
                for name, r in w["swapd"].items()
            ],
        )
        _bench.print_table(
            ["daemon", *(p for p, _, _ in PHASES), "swapd CPU", "lock pages p50", "max"],
            [
                [
                    name,
                    *(r["phases_ms"].get(p, float("nan")) for p, _, _ in PHASES),
                    r["phases_ms"]["swapd_cpu_ms_mean"],
                    r["lock_pages_ms"].get("p50", "-"),
                    r["lock_pages_ms"].get("max", "-"),
                ]
                for name, r in w["swapd"].items()
            ],
        )
        print("swapd's own phases of a swap (ms; readiness polling and forwarding not in them)")
        _bench.print_table(
            ["daemon", "phase", *SHARE_STATS],
            [
                [name, phase, *(stats[k] for k in SHARE_STATS)]
                for name, r in w["swapd"].items()
                for phase, stats in r["own_phases_ms"].items()
            ],
        )
    if "costs" in results:
        c = results["costs"]
        print(
            f"\nin one process (ms): GGUF {c['model_mib']} MiB, locked {c['locked']}; "
            f"{c['processes']} processes on the machine"
        )
        rows = [
            ["WarmSet.open (cached file)", c["warmset_open_ms"]],
            ["WarmSet.close", c["warmset_close_ms"]],
            ["HostRamProbe.read, 2 pids", c["HostRamProbe.read_ms"]],
            ["process_trees, 2 pids", c["process_trees_ms"]],
        ]
        _bench.print_table(
            ["call", "n", "p50", "p99", "min", "max"],
            [[name, v["n"], v["p50"], v["p99"], v["min"], v["max"]] for name, v in rows],
        )
    if "parallel" in results:
        p = results["parallel"]
        print(f"\nparallel starts (start delay {p['start_delay_s']:g} s; ms)")
        _bench.print_table(
            ["case", "p50", "min", "max"],
            [[k, s["p50"], s["min"], s["max"]] for k, s in p["ms"].items()],
        )
        r = p["ratio_two_over_one_p50"]
        o = p["swapd_pairs_overlapping"]
        print(
            f"two/one (p50): swapd {r['swapd']:.3f}, direct {r['direct']:.3f}; "
            f"pairs whose starts overlapped in swapd's log: {o['overlapped']}/{o['pairs']}"
        )


def parse_args() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="gemma,poll,wake,swap,parallel,costs", help="comma list")
    p.add_argument("--rounds", type=int, help="gemma and parallel rounds (default 8; quick 3)")
    p.add_argument("--swaps", type=int, help="swaps per daemon (default 30; quick 6)")
    p.add_argument("--wakes", type=int, help="wakes (default 200; quick 50)")
    p.add_argument("--hold-mib", type=int, default=0, help="memory the fake vLLM takes back")
    p.add_argument("--start-delay", type=float, default=2.0, help="fake start delay (parallel)")
    p.add_argument("--quick", action="store_true", help="a few rounds of each")
    p.add_argument("--cache-dir", type=Path, default=_bench.default_cache_dir())
    p.add_argument("--out", type=Path, default=Path("out/bench_tiers.json"))
    return p.parse_args()


def main() -> None:
    """Run the parts, print the tables, write the JSON."""
    args = parse_args()
    info = _bench.machine_info()
    info["cpu_capacity_start"] = _bench.parallel_capacity()
    _bench.print_machine(info)
    cores = choose_cores()
    rounds = args.rounds or (3 if args.quick else 8)
    results: Json = {}
    for part in args.parts.split(","):
        print(f"running {part} ...", flush=True)
        if part == "gemma":
            model = _bench.gemma_model(args.cache_dir)
            results["gemma"] = gemma_part(model, rounds, cores)
        elif part == "wake":
            wakes = args.wakes or (50 if args.quick else 200)
            results["wake"] = wake_part(wakes, cores, args.hold_mib)
        elif part == "poll":
            model = _bench.gemma_model(args.cache_dir)
            results["poll"] = poll_part(model, rounds, cores)
        elif part == "swap":
            model = _bench.gemma_model(args.cache_dir)
            results["swap"] = swap_part(model, args.swaps or (6 if args.quick else 30), cores)
        elif part == "costs":
            model = _bench.gemma_model(args.cache_dir)
            results["costs"] = costs_part(model, 20, 300)
        elif part == "parallel":
            results["parallel"] = parallel_part(rounds, args.start_delay)
        else:
            raise SystemExit(f"unknown part {part!r}")
    print_report(results)
    info["cores"] = {
        "client": sorted(cores.client or []),
        "swapd_and_backends": sorted(cores.server or []),
        "parallel_part": "unpinned",
    }
    _bench.write_json(args.out, {"machine": _bench.finish_info(info), "results": results})


if __name__ == "__main__":
    main()
