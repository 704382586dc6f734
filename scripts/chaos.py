"""Chaos: clients that hang up, backends killed, models loaded and unloaded, for a fixed time.

``python scripts/chaos.py --duration 60`` starts a real swapd as ``bench_storm.py`` does
(three fake models, ``max_running: 1``; one model's backend, gamma's unless
``--fork-child`` says otherwise, forks a worker into its process group, as a backend
with worker processes does) and, until the time is up:

* 16 client threads send requests one after another (chat and text completions, half
  streamed); a quarter of the streams are closed by the client after a random number of
  chunks, and a few requests are closed before any answer arrives;
* a killer thread SIGKILLs a random backend's leader every few seconds (only processes
  that carry this run's mark);
* an admin thread calls ``POST /swapd/models/{name}/load``, ``/unload`` and
  ``/unload?force=true`` at random.

Each answer is classified as in ``bench_storm.py``. A stream cut while its model's backend
was being killed (SIGKILL or forced unload) is ``cut``, not an error: swapd has already
sent the headers, and cutting the connection is the only signal left. Any other cut,
reset or closed connection the client did not cause is opaque.

The two numbers: **orphans** (processes of this run alive after swapd stopped; also the
strays seen while it ran: marked processes outside every live backend's process group)
and **opaque errors**. The report goes to ``out/chaos.json``, swapd's log beside it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import random
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import psutil
from _bench import REPO, Json, finish_info, machine_info, print_machine, summarize, write_json
from bench_storm import (
    LOOPBACK,
    MODELS,
    TRANSIENT,
    Ask,
    Kill,
    Outcome,
    RssSampler,
    classify_error,
    count_outcomes,
    exchange,
    fake_presets,
    held_after,
    keep_log,
    log_summary,
    opaque_examples,
    print_counts,
    settle,
    shut_down,
    swapd_pid,
)
from daemon import Daemon, marked


def parse_args() -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (<= 600)")
    p.add_argument("--clients", type=int, default=16, help="client threads")
    p.add_argument("--stream-share", type=float, default=0.5)
    p.add_argument("--hangup", type=float, default=0.25, help="share of streams cut by clients")
    p.add_argument("--early-hangup", type=float, default=0.05, help="share closed unanswered")
    p.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills")
    p.add_argument("--admin-every", type=float, default=1.5, help="mean seconds between calls")
    p.add_argument("--max-running", type=int, default=1, help="swapd's max_running")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--chunk-interval", type=float, default=0.05)
    p.add_argument("--max-delay", type=float, default=0.2, help="fake_delay drawn up to this")
    p.add_argument("--timeout", type=float, default=150.0, help="client timeout: hung after")
    p.add_argument(
        "--fork-child",
        choices=(*MODELS, "none"),
        default="gamma",
        help="the model whose backend forks a worker into its process group",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "out" / "chaos.json")
    args = p.parse_args()
    if not 0 < args.duration <= 600 or not 1 <= args.clients <= 64:
        p.error("--duration must be in (0, 600] and --clients 1..64")
    if args.kill_every <= 0 or args.admin_every <= 0:
        p.error("--kill-every and --admin-every must be positive")
    return args


class Chaos:
    """The threads of one run and what they saw."""

    def __init__(self, daemon: Daemon, args: argparse.Namespace) -> None:
        self.daemon = daemon
        self.args = args
        self.deadline = time.monotonic() + args.duration
        self.outcomes: list[Outcome] = []
        self.admin: list[Outcome] = []
        self.kills: list[Kill] = []
        self.misses: list[str] = []  # kill attempts that found nothing to kill
        self.lock = threading.Lock()
        self.stop = threading.Event()  # the time is up: stop killing and calling
        self.done = threading.Event()  # every client has its answer
        self.started = time.monotonic()
        self.states: list[tuple[float, dict[str, str]]] = []  # (seconds in, model -> state)

    # ---------------------------------------------------------------- clients

    def ask(self, rng: random.Random) -> Ask:
        """One client request, drawn at random."""
        args = self.args
        stream = rng.random() < args.stream_share
        hangup_after = None
        if stream and rng.random() < args.hangup:
            hangup_after = rng.randrange(args.chunks)
        early = rng.uniform(0.0, 0.5) if rng.random() < args.early_hangup else None
        return Ask(
            model=rng.choice(MODELS),
            stream=stream,
            chat=rng.random() < 0.5,
            delay=rng.uniform(0.0, args.max_delay),
            hangup_after=hangup_after,
            hangup_early=early,
        )

    def client(self, seed: int) -> None:
        """Send requests one after another until the time is up."""
        rng = random.Random(seed)
        while time.monotonic() < self.deadline:
            outcome = exchange(self.daemon.port, self.ask(rng), self.args.timeout)
            with self.lock:
                self.outcomes.append(outcome)

    # ---------------------------------------------------------------- killer

    def backends(self) -> list[tuple[str, int, str]]:
        """(model, pid, state) of every backend leader swapd reports now."""
        _, status = self.daemon.get("/swapd/status")
        return [(m["name"], int(m["pid"]), m["state"]) for m in status["models"] if m["pid"]]

    def ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live process of this run (never kill anything else)."""
        try:
            proc = psutil.Process(pid)
            return proc.environ().get("SWAPD_TEST_MARK") == self.daemon.mark
        except psutil.Error:
            return False

    def killer(self, seed: int) -> None:
        """SIGKILL a random backend leader every few seconds."""
        rng = random.Random(seed)
        while not self.stop.wait(rng.uniform(0.5, 1.5) * self.args.kill_every):
            if time.monotonic() >= self.deadline:
                return
            candidates = [b for b in self.backends() if self.ours(b[1])]
            if not candidates:
                self.misses.append("no backend running")
                continue
            model, pid, state = rng.choice(candidates)
            now = time.monotonic()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                self.misses.append(f"{model} pid {pid} already gone")
                continue
            with self.lock:
                self.kills.append(Kill("SIGKILL", model, now, now, pid, state))

    # ---------------------------------------------------------------- admin

    def admin_call(self, model: str, action: str) -> Outcome:
        """One load or unload call, classified like a request."""
        path = f"/swapd/models/{model}/{'load' if action == 'load' else 'unload'}"
        if action == "force":
            path += "?force=true"
        started = time.monotonic()
        conn = http.client.HTTPConnection(LOOPBACK, self.daemon.port, timeout=self.args.timeout)

        def outcome(
            kind: str, detail: str, status: int | None = None, message: str | None = None
        ) -> Outcome:
            return Outcome(
                kind=kind,
                detail=f"{action} {detail}",
                model=model,
                stream=False,
                started=started,
                ended=time.monotonic(),
                status=status,
                message=message,
            )

        try:
            conn.request("POST", path)
            resp = conn.getresponse()
            raw = resp.read()
            content_type = resp.getheader("Content-Type") or ""
        except TimeoutError:
            return outcome("hung", "no answer")
        except (http.client.HTTPException, OSError) as exc:
            return outcome("opaque", f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            kind, detail, message = classify_error(resp.status, content_type, raw)
            return outcome(kind, detail, resp.status, message)
        try:
            named = json.loads(raw).get("name") == model
        except (ValueError, AttributeError):
            named = False
        return outcome("ok" if named else "opaque", str(resp.status), resp.status)

    def admin_loop(self, seed: int) -> None:
        """Load, unload and force-unload models at random."""
        rng = random.Random(seed)
        while not self.stop.wait(rng.uniform(0.5, 1.5) * self.args.admin_every):
            if time.monotonic() >= self.deadline:
                return
            model = rng.choice(MODELS)
            action = rng.choice(("load", "unload", "force"))
            outcome = self.admin_call(model, action)
            with self.lock:
                self.admin.append(outcome)
                if action == "force":
                    self.kills.append(Kill("forced unload", model, outcome.started, outcome.ended))

    def monitor(self) -> None:
        """Sample every model's state once a second until the last client is done."""
        while not self.done.wait(1.0):
            with contextlib.suppress(OSError, KeyError, ValueError):
                _, status = self.daemon.get("/swapd/status")
                states = {m["name"]: m["state"] for m in status["models"]}
                self.states.append((time.monotonic() - self.started, states))

    def stuck_since(self, final: dict[str, str]) -> dict[str, float]:
        """For each model left in a passing state: seconds into the run it has been there."""
        found = {}
        for name, state in final.items():
            if state not in TRANSIENT:
                continue
            since = None
            for at, states in self.states:
                if states.get(name) != state:
                    since = None
                elif since is None:
                    since = at
            if since is not None:
                found[name] = round(since, 1)
        return found

    # ---------------------------------------------------------------- run

    def run(self) -> None:
        """Start every thread, wait for the time to pass and for every thread to end."""
        seed = self.args.seed
        threads = [
            threading.Thread(target=self.client, args=(seed * 1000 + i,), name=f"client-{i}")
            for i in range(self.args.clients)
        ]
        threads.append(threading.Thread(target=self.killer, args=(seed * 1000 + 500,)))
        threads.append(threading.Thread(target=self.admin_loop, args=(seed * 1000 + 501,)))
        watcher = threading.Thread(target=self.monitor, name="monitor")
        for thread in [*threads, watcher]:
            thread.start()
        time.sleep(max(0.0, self.deadline - time.monotonic()))
        self.stop.set()
        for thread in threads:
            thread.join()  # each is bounded by the client timeout
        self.done.set()
        watcher.join()


def strays(daemon: Daemon) -> list[Json]:
    """Processes of this run outside swapd, its reaper and every live backend's group."""
    _, status = daemon.get("/swapd/status")
    groups = {int(m["pid"]) for m in status["models"] if m["pid"]}
    swapd = swapd_pid(daemon)
    found = []
    for proc in marked(daemon.mark):
        try:
            cmdline = " ".join(proc.cmdline())
            if proc.pid == swapd or "swapd.reaper" in cmdline:
                continue
            if os.getpgid(proc.pid) in groups:
                continue
            found.append({"pid": proc.pid, "ppid": proc.ppid(), "cmdline": cmdline[:200]})
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def lasting_strays(daemon: Daemon, gap: float = 2.0) -> list[Json]:
    """Strays seen twice, ``gap`` seconds apart (a backend being reaped is not one)."""
    first = {s["pid"]: s for s in strays(daemon)}
    time.sleep(gap)
    return [s for s in strays(daemon) if s["pid"] in first]


def main() -> None:
    """Run the chaos and print and write the report."""
    args = parse_args()
    info = machine_info()
    print_machine(info)
    settings: Json = {"max_running": args.max_running}
    presets = fake_presets(args.chunks, args.chunk_interval, {args.fork_child: ["--fork-child"]})
    daemon = Daemon(Path(tempfile.mkdtemp(prefix="swapd-chaos-")), presets, settings)
    daemon.start()
    sampler = RssSampler(swapd_pid(daemon)).start()
    chaos = Chaos(daemon, args)
    try:
        started = time.monotonic()
        chaos.run()
        wall = time.monotonic() - started
        after = held_after(daemon)
        stray = lasting_strays(daemon)
    finally:
        rss = sampler.stop()
        ending = shut_down(daemon)
        keep_log(daemon, args.out.with_suffix(".log"))
    outcomes = [settle(o, chaos.kills) for o in chaos.outcomes]
    counts = count_outcomes(outcomes)
    admin = count_outcomes(chaos.admin)
    opaque = sum(1 for o in [*outcomes, *chaos.admin] if o.kind == "opaque")
    kills = [k for k in chaos.kills if k.how == "SIGKILL"]
    report: Json = {
        "machine": finish_info(info),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "settings": settings,
        "presets": presets,
        "wall_s": round(wall, 2),
        "requests": counts,
        "admin": admin,
        "kills": {
            "sigkill": len(kills),
            "by_state": dict(collections.Counter(k.state or "?" for k in kills)),
            "forced_unloads": len(chaos.kills) - len(kills),
            "misses": dict(collections.Counter(chaos.misses)),
        },
        "ok_latency_s": summarize([o.seconds for o in outcomes if o.kind == "ok"]),
        "opaque": opaque,
        "hung": sum(1 for o in [*outcomes, *chaos.admin] if o.kind == "hung"),
        "internal": counts["internal"] + admin["internal"],
        "stuck_since_s": chaos.stuck_since(after["settled"]["states"]),
        "strays_while_running": stray,
        "held_after": after,
        "rss": rss,
        "shutdown": ending,
        "orphans": len(ending["orphans"]),
        "log": log_summary(daemon.log_path),
        "examples": opaque_examples([*outcomes, *chaos.admin], limit=20),
        "kill_log": [asdict(k) for k in chaos.kills],
    }
    write_json(args.out, report)
    print(f"settings: {settings}; {args.clients} clients for {args.duration:g} s ({wall:.1f} s)")
    print_counts("requests", counts)
    print_counts("admin calls", admin)
    print(f"kills: {report['kills']}")
    print(f"held after: {after}")
    print(f"strays while running: {stray}")
    print(f"rss: {rss}")
    print(f"shutdown: {ending}")
    print(f"log problems: {report['log']['problems']}")
    print(
        f"ORPHANS {report['orphans']}  OPAQUE {opaque}  HUNG {report['hung']}  "
        f"INTERNAL {report['internal']}  STUCK {report['stuck_since_s'] or 0} (since s)"
    )


if __name__ == "__main__":
    main()
