"""Where swapd's time per proxied request goes: instructions, and a timeline across processes.

``instructions`` runs swapd under ``valgrind --tool=callgrind`` with instrumentation off,
warms it up, then counts the instructions of N plain requests (kept-alive client) and of N
streams (a new connection each) against the fake backend: deterministic, so it compares
commits on a noisy shared machine.

``floor`` compares swapd with the least proxy aiohttp and swapd's upstream pool make (one
handler: read the body, send it to the backend, answer with what came back), against the
same fake backend, in alternating rounds of N plain requests each: what aiohttp and one more
hop cost before anything of swapd's own (routing, access checks, admission, the log line).

``timeline`` stamps ``perf_counter_ns`` (CLOCK_MONOTONIC, one clock for every process) at
fixed points in the client, in swapd and in the fake backend, sends N streams direct and
through swapd alternately, and prints the median time of each step from the client's send:
where the time to the first chunk goes.

    python scripts/profile_proxy.py instructions [--requests 200] [--interval 0] [--log-level info]
    python scripts/profile_proxy.py floor [--requests 5000] [--rounds 3]
    python scripts/profile_proxy.py timeline [--streams 300] [--interval 0.002]

With ``PYTHONPATH=/path/to/checkout`` the swapd of that checkout is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import http.client
import json
import os
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _bench
from _bench import Json, Swapd

HERE = Path(__file__).resolve()
WARM = 30


def body(stream: bool) -> bytes:
    """The benchmark's small chat completion for model ``m``."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "Say hi."}], "stream": stream}
    return json.dumps(chat).encode()


def fake(interval: float, *wrap: str) -> Json:
    """The fake backend's preset: 10 chunks ``interval`` apart."""
    extra = ("--chunks", "10", "--chunk-interval", str(interval))
    cmd = [sys.executable, *wrap, str(_bench.FAKE_UPSTREAM), "--port", "${PORT}", "--name", "m"]
    return {"backend": "command", "cmd": [*cmd, *extra]}


def plain(conn: http.client.HTTPConnection) -> None:
    """One plain request on a kept-alive connection."""
    conn.request(
        "POST", "/v1/chat/completions", body(stream=False), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}")


def stream(port: int) -> None:
    """One stream on a new connection, read to its end."""
    conn = http.client.HTTPConnection(_bench.LOOPBACK, port, timeout=60)
    try:
        conn.request(
            "POST", "/v1/chat/completions", body(stream=True), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200 or resp.read().count(b"data:") != 11:
            raise RuntimeError(f"HTTP {resp.status}: not a whole stream")
    finally:
        conn.close()


# ---------------------------------------------------------------- instructions


def instructions(args: argparse.Namespace) -> None:
    """Instructions per plain request and per stream, swapd under callgrind."""
    layout = Swapd({"m": fake(args.interval)}, {"log_level": args.log_level})
    root, port, config = layout.root, layout.port, layout.write()
    out = root / "callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    argv = [*valgrind, sys.executable, "-m", "swapd", "serve", "--config", str(config)]
    with (root / "swapd.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        _bench.wait_until(lambda: _bench.http_status(port, "/health", timeout=10) == 200, 600, 1)
        _bench.http_json("POST", port, "/swapd/models/m/load")
        conn = http.client.HTTPConnection(_bench.LOOPBACK, port, timeout=60)
        for _ in range(WARM):
            plain(conn)
            stream(port)
        counts: dict[str, float] = {}
        kinds: dict[str, Callable[[], None]] = {
            "plain": lambda: plain(conn),
            "stream": lambda: stream(port),
        }
        for name, one in kinds.items():
            callgrind(proc.pid, "--instr=on")
            for _ in range(WARM):  # switching instrumentation on costs once: not counted
                one()
            callgrind(proc.pid, "--zero")
            for _ in range(args.requests):
                one()
            callgrind(proc.pid, "--instr=off")
            callgrind(proc.pid, f"--dump={name}")
            counts[name] = latest_total(root) / args.requests
        conn.close()
    finally:
        _bench.stop_process(proc, timeout=120)
    print(
        f"swapd {_bench.swapd_version()}, chunks {args.interval * 1000:g} ms apart, "
        f"log_level {args.log_level}, {args.requests} requests each"
    )
    for name, count in counts.items():
        print(f"{name}: {count / 1000:.0f}K instructions per request")


def callgrind(pid: int, *options: str) -> None:
    """Tell a running callgrind to do something."""
    subprocess.run(["callgrind_control", *options, str(pid)], check=True, capture_output=True)


def latest_total(root: Path) -> int:
    """The instruction total of the newest callgrind dump in ``root`` (``callgrind.out.N``)."""
    dumps = [p for p in root.glob("callgrind.out.*") if p.suffix[1:].isdigit()]
    dump = max(dumps, key=lambda p: int(p.suffix[1:]))
    totals = [
        line for line in dump.read_text(errors="replace").splitlines() if line.startswith("totals:")
    ]
    if not totals:
        raise RuntimeError(f"no totals in {dump}")
    return int(totals[-1].split()[1])


# ---------------------------------------------------------------- floor


def floor(args: argparse.Namespace) -> None:
    """CPU per plain request and latency: swapd against aiohttp's least proxy, alternately."""
    backend_port, floor_port = _bench.free_port(), _bench.free_port()
    backend_argv = [a.replace("${PORT}", str(backend_port)) for a in fake(0.0)["cmd"]]
    backend = subprocess.Popen(backend_argv, stdout=subprocess.DEVNULL)
    least = subprocess.Popen(
        [sys.executable, str(HERE), "_floor", str(backend_port), str(floor_port)],
        stdout=subprocess.DEVNULL,
    )
    daemon = Swapd({"m": fake(0.0)})
    try:
        _bench.wait_until(lambda: _bench.http_status(backend_port, "/health") == 200, 60)
        daemon.start()
        daemon.load("m")
        _bench.wait_until(lambda: _bench.http_status(floor_port, "/health") == 200, 60)
        targets = {"aiohttp floor": (least.pid, floor_port), "swapd": (daemon.pid, daemon.port)}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for round_no in range(args.rounds):
            order = list(targets) if round_no % 2 == 0 else list(reversed(targets))
            for name in order:
                results[name].append(_floor_round(*targets[name], args.requests))
    finally:
        daemon.stop()
        _bench.stop_process(least)
        _bench.stop_process(backend)
    print(
        f"swapd {_bench.swapd_version()}, {args.rounds} rounds of {args.requests} plain "
        "requests each, alternating; median (range)"
    )
    for name, rounds in results.items():
        cpu = [c for c, _ in rounds]
        p50 = [p for _, p in rounds]
        print(
            f"{name:14s} cpu/request {statistics.median(cpu):.3f} ms ({min(cpu):.3f}-"
            f"{max(cpu):.3f}), latency p50 {statistics.median(p50):.3f} ms "
            f"({min(p50):.3f}-{max(p50):.3f})"
        )


def _floor_round(pid: int, port: int, requests: int) -> tuple[float, float]:
    """One round against one target: its CPU per request and the latency p50, in ms."""
    conn = http.client.HTTPConnection(_bench.LOOPBACK, port, timeout=60)
    for _ in range(WARM):
        plain(conn)
    took = []
    before = _bench.cpu_ns(pid)
    for _ in range(requests):
        start = time.perf_counter()
        plain(conn)
        took.append(time.perf_counter() - start)
    cpu = (_bench.cpu_ns(pid) - before) / requests / 1e6
    conn.close()
    return cpu, statistics.median(took) * 1000


def run_least_proxy(argv: list[str]) -> None:
    """aiohttp with one route that passes a request through swapd's upstream pool."""
    import uvloop
    from aiohttp import web

    from swapd.upstream import UpstreamPool

    backend_port, port = int(argv[0]), int(argv[1])

    async def serve() -> None:
        pool = UpstreamPool()

        async def passed(request: web.Request) -> web.Response:
            body = await request.read()
            headers = [(b"Content-Type", b"application/json")]
            path = request.rel_url.raw_path_qs
            answer = await pool.request("127.0.0.1", backend_port, "POST", path, headers, body)
            try:
                data = await answer.read()
            finally:
                answer.finish()
            return web.Response(status=answer.status, body=data, content_type="application/json")

        async def health(_request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", passed)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, _bench.LOOPBACK, port).start()
        await asyncio.Event().wait()

    uvloop.run(serve())


# ---------------------------------------------------------------- timeline

# (module, attribute path, stamp before the call, stamp after it)
SWAPD_POINTS = (
    ("swapd.limits", "EdgeHandler.data_received", "request bytes", None),
    ("aiohttp.web_protocol", "RequestHandler._handle_request", "handler", None),
    ("swapd.proxy", "Proxy.forward", "forward", None),
    ("swapd.upstream", "UpstreamPool.request", "upstream write", "request() returns"),
    ("swapd.upstream", "_Connection.data_received", "backend bytes", None),
    ("swapd.upstream", "_Connection.on_headers_complete", "backend headers", None),
    ("swapd.upstream", "_Connection.next_chunk", None, "chunk taken"),
    ("aiohttp.http_writer", "StreamWriter._write", "write to client", None),
    ("aiohttp.http_writer", "StreamWriter._writelines", "write to client", None),
)
BACKEND_POINTS = (
    ("aiohttp.web_protocol", "RequestHandler.data_received", "backend: bytes", None),
    ("aiohttp.http_writer", "StreamWriter._write", "backend: write", None),
    ("aiohttp.http_writer", "StreamWriter._writelines", "backend: write", None),
)
STAMPS: list[tuple[str, int]] = []


def stamped(points: tuple[tuple[str, str, str | None, str | None], ...]) -> None:
    """Wrap each point so that calling it records a stamp; dump them at exit."""
    import importlib

    for module_name, path, before, after in points:
        owner_name, name = path.split(".")
        owner = getattr(importlib.import_module(module_name), owner_name)
        setattr(owner, name, _wrap(getattr(owner, name), before, after))
    out = Path(os.environ["PROFILE_STAMPS"])
    atexit.register(_dump, out)
    leave = os._exit

    def dump_and_leave(code: int) -> None:  # the fake backend leaves with os._exit
        _dump(out)
        leave(code)

    os._exit = dump_and_leave  # type: ignore[assignment]


def _dump(out: Path) -> None:
    out.write_text(json.dumps(STAMPS))


def _wrap(func: Any, before: str | None, after: str | None) -> Any:
    clock = time.perf_counter_ns
    if asyncio.iscoroutinefunction(func):

        @functools.wraps(func)
        async def coroutine(*args: Any, **kwargs: Any) -> Any:
            if before:
                STAMPS.append((before, clock()))
            result = await func(*args, **kwargs)
            if after:
                STAMPS.append((after, clock()))
            return result

        return coroutine

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        if before:
            STAMPS.append((before, clock()))
        result = func(*args, **kwargs)
        if after:
            STAMPS.append((after, clock()))
        return result

    return call


def run_stamped_swapd(argv: list[str]) -> None:
    """``_swapd``: swapd's CLI with stamps."""
    stamped(SWAPD_POINTS)
    from swapd.cli import main

    sys.argv = ["swapd", *argv]
    main()


def run_stamped_backend(argv: list[str]) -> None:
    """``_backend``: the fake backend with stamps."""
    stamped(BACKEND_POINTS)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


def timeline(args: argparse.Namespace) -> None:
    """Stream direct and through swapd alternately; print each step's median time."""
    root = Path(tempfile.mkdtemp(prefix="profile-"))
    preset = fake(args.interval, str(HERE), "_backend")
    preset["env"] = {"PROFILE_STAMPS": str(root / "backend.json")}
    layout = Swapd({"m": preset}, root=root)
    port, config = layout.port, layout.write()
    env = {**os.environ, "PROFILE_STAMPS": str(root / "swapd.json")}
    argv = [sys.executable, str(HERE), "_swapd", "serve", "--config", str(config)]
    with (root / "swapd.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    try:
        _bench.wait_until(lambda: _bench.http_status(port, "/health") == 200, 60)
        backend = int(_bench.http_json("POST", port, "/swapd/models/m/load")[1]["port"])
        sent = _bench.run_async(_streams({"direct": backend, "through": port}, args.streams))
    finally:
        _bench.stop_process(proc, timeout=60)
    stamps = json.loads((root / "swapd.json").read_text())
    stamps += json.loads((root / "backend.json").read_text())
    shutil.rmtree(root, ignore_errors=True)
    print(
        f"swapd {_bench.swapd_version()}, chunks {args.interval * 1000:g} ms apart, "
        f"{args.streams} streams each, load {os.getloadavg()[0]:.2f}"
    )
    for mode in ("direct", "through"):
        _print_steps(mode, [s for s in sent if s[0] == mode], stamps)


async def _streams(ports: dict[str, int], count: int) -> list[tuple[str, int, int]]:
    import aiohttp

    sent = []
    once = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=once) as session:
        for i in range(count * 2 + 20):
            mode = ("direct", "through")[i % 2]
            url = f"http://{_bench.LOOPBACK}:{ports[mode]}/v1/chat/completions"
            started = time.perf_counter_ns()
            first = 0
            async with session.post(url, data=body(stream=True)) as resp:
                async for line in resp.content:
                    if not first and line.startswith(b"data:"):
                        first = time.perf_counter_ns()
            if i >= 20:  # the first ones warm up
                sent.append((mode, started, first))
    return sent


def _print_steps(mode: str, sent: list[tuple[str, int, int]], stamps: list[Any]) -> None:
    sequences: list[list[tuple[str, float]]] = []
    for _, started, first in sent:
        steps = sorted((ns, tag) for tag, ns in stamps if started <= ns <= first)
        sequences.append([(tag, (ns - started) / 1000) for ns, tag in steps])
        sequences[-1].append(("client has the first chunk", (first - started) / 1000))
    usual, count = Counter(tuple(t for t, _ in s) for s in sequences).most_common(1)[0]
    chosen = [s for s in sequences if tuple(t for t, _ in s) == usual]
    print(f"\n{mode}: {count} of {len(sequences)} streams in the usual order; us from the send")
    previous = 0.0
    for i, tag in enumerate(usual):
        at = statistics.median(s[i][1] for s in chosen)
        print(f"  {tag:28s} {at:8.1f}  (+{at - previous:6.1f})")
        previous = at


# ---------------------------------------------------------------- command line


def main() -> None:
    """Dispatch: the two profiles, and the stamped child processes they start."""
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        run_least_proxy(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] in {"_swapd", "_backend"}:
        run: Callable[[list[str]], None] = (
            run_stamped_swapd if sys.argv[1] == "_swapd" else run_stamped_backend
        )
        run(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("what", choices=["instructions", "floor", "timeline"])
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="instructions: per kind (200); floor: per round (5000)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="floor: rounds per target")
    parser.add_argument("--streams", type=int, default=300, help="timeline: per target")
    parser.add_argument("--interval", type=float, default=None, help="seconds between chunks")
    parser.add_argument("--log-level", default="info", help="instructions: swapd's log_level")
    args = parser.parse_args()
    if args.interval is None:
        args.interval = 0.0 if args.what == "instructions" else 0.002
    if args.requests is None:
        args.requests = 5000 if args.what == "floor" else 200
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop children on SIGTERM
    {"instructions": instructions, "floor": floor, "timeline": timeline}[args.what](args)


if __name__ == "__main__":
    main()
