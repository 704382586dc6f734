"""Storm: a fixed number of requests over three fake models through one swapd that swaps.

``python scripts/bench_storm.py`` starts a real swapd (``tests/daemon.py``'s ``Daemon``,
the fake OpenAI backend ``tests/fakes/upstream.py`` behind three presets) with
``max_running: 1``, so that nearly every change of model is a swap, and sends 500
requests (streamed and not, chat and text completions, models drawn at random) from 32
client threads, each request on a connection of its own. It then reads what swapd still
holds in flight, stops swapd and looks for any process left behind.

Every answer is classified (``chaos.py`` uses the same client and the same classes):

* ``ok``: 2xx and complete from the model asked for (a stream ends with ``data: [DONE]``);
* ``error``: a non-2xx JSON answer in OpenAI's envelope ``{"error": {"message", "type",
  "code", "param"}}`` with a message: a clear error, counted by status and code; also that
  envelope as a stream's last event (``in-stream CODE``: the error of a request whose
  status went out with the cold-load pings);
* ``opaque``: anything else swapd did: a non-2xx body that is not the envelope
  (text/plain, HTML, empty), a connection closed or reset without an answer, a 2xx body
  that does not parse, a stream cut that no backend kill explains;
* ``wrong``: a complete answer from another model's backend;
* ``hung``: no answer, or a stream that made no progress, within ``--timeout``;
* ``hangup`` and ``cut`` (chaos only): the client closed the connection on purpose; a
  stream cut while its model's backend was being killed.

The numbers, with the machine, the load average and swapd's settings, go to
``out/bench_storm.json``; swapd's log is copied beside it.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import http.client
import json
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
from _bench import REPO, Json, finish_info, machine_info, print_machine, summarize, write_json
from daemon import Daemon, fake_preset, wait_for_gone

LOOPBACK = "127.0.0.1"
MODELS = ("alpha", "beta", "gamma")
ENVELOPE_KEYS = ("message", "type", "code", "param")
# Kinds that are not an answer swapd owes the client: the client left, or a backend was killed.
NOT_ERRORS = ("ok", "hangup", "cut")
# Error codes that mean an exception inside swapd: in the envelope, but a bug all the same.
INTERNAL_CODES = ("internal_error", "load_failed")
# States a model passes through; one still there once nothing is asked of swapd is stuck.
TRANSIENT = ("queued", "starting", "waking", "draining", "sleeping", "stopping")


# ---------------------------------------------------------------- one request


@dataclass(frozen=True)
class Ask:
    """One request a client sends, and how it behaves while the answer comes."""

    model: str
    stream: bool
    chat: bool
    delay: float = 0.0  # the fake backend waits this long before answering (``fake_delay``)
    hangup_after: int | None = None  # close after this many ``data:`` lines (streams)
    hangup_early: float | None = None  # close this many seconds after sending, unread
    # A real backend on random weights: any answer with choices is ok (no name to check).
    any_answer: bool = False

    def body(self) -> Json:
        """The JSON body for the fake backend."""
        body: Json = {"model": self.model, "max_tokens": 8, "stream": self.stream}
        if self.delay:
            body["fake_delay"] = round(self.delay, 3)
        if self.chat:
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "hi"
        return body

    @property
    def path(self) -> str:
        """The OpenAI route."""
        return "/v1/chat/completions" if self.chat else "/v1/completions"


@dataclass(frozen=True)
class Outcome:
    """What became of one request, with its times (``time.monotonic``)."""

    kind: str
    detail: str
    model: str
    stream: bool
    started: float
    ended: float
    status: int | None = None
    request_id: str | None = None
    message: str | None = None  # the envelope's message, or the start of an opaque body

    @property
    def seconds(self) -> float:
        """How long the request took."""
        return self.ended - self.started


def classify_error(status: int, content_type: str, raw: bytes) -> tuple[str, str, str | None]:
    """Kind, detail and message of a non-2xx answer: ``error`` only for the envelope."""
    shown = raw[:120].decode(errors="replace")
    if not raw:
        return "opaque", f"{status} empty body", ""
    if not content_type.startswith("application/json"):
        return "opaque", f"{status} {content_type or 'no content type'}", shown
    try:
        doc = json.loads(raw)
    except ValueError:
        return "opaque", f"{status} json content type, body not JSON", shown
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or any(key not in error for key in ENVELOPE_KEYS):
        return "opaque", f"{status} JSON outside the envelope", shown
    message = error["message"]
    if not isinstance(message, str) or not message.strip():
        return "opaque", f"{status} envelope without a message", shown
    return "error", f"{status} {error['code']}", message


def _answer_text(doc: Any, *, chat: bool, delta: bool) -> str:
    """The generated text of a completion or of one streamed chunk ('' when absent)."""
    try:
        choice = doc["choices"][0]
        if chat:
            part = choice["delta" if delta else "message"]
            return str(part.get("content") or "")
        return str(choice.get("text") or "")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""


def _check_body(ask: Ask, raw: bytes) -> tuple[str, str]:
    """Kind and detail of a complete 2xx non-streamed body."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return "opaque", "2xx body not JSON"
    if ask.any_answer:
        return ("ok", "complete") if _has_choices(doc) else ("opaque", "2xx JSON without choices")
    text = _answer_text(doc, chat=ask.chat, delta=False)
    if not text:
        return "opaque", "2xx JSON without an answer"
    if not text.startswith(f"{ask.model}:"):
        return "wrong", f"answered by {text.split(':', 1)[0]}"
    return "ok", "complete"


def _has_choices(doc: Any) -> bool:
    """Whether a completion or a chunk carries a non-empty ``choices`` list."""
    return isinstance(doc, dict) and isinstance(doc.get("choices"), list) and bool(doc["choices"])


Verdict = tuple[str, str, str | None]  # kind, detail, message


def _stream_error(event: bytes) -> Verdict | None:
    """An error sent as the stream's last event (after the cold-load pings), if it is one."""
    try:
        doc = json.loads(event)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "error" not in doc:
        return None
    kind, detail, message = classify_error(0, "application/json", event)
    return kind, f"in-stream {detail.removeprefix('0 ')}", message


def _check_stream(ask: Ask, events: Sequence[bytes]) -> Verdict:
    """Kind, detail and message of a stream that reached its end (EOF without an error)."""
    if events and (error := _stream_error(events[-1])) is not None:
        return error
    if not events or events[-1] != b"[DONE]":
        return "cut", "stream ended without data: [DONE]", None
    try:
        first = json.loads(events[0])
    except ValueError:
        return "opaque", "stream chunk not JSON", None
    if ask.any_answer:
        ok = _has_choices(first)
        return ("ok", "complete", None) if ok else ("opaque", "stream chunk without choices", None)
    text = _answer_text(first, chat=ask.chat, delta=True)
    if not text.startswith(f"{ask.model}-"):
        return "wrong", f"streamed by {text.rsplit('-', 1)[0] or '?'}", None
    return "ok", "complete", None


@dataclass
class _Seen:
    """What a request learnt of its answer before something went wrong."""

    status: int | None = None
    request_id: str | None = None


def exchange(port: int, ask: Ask, timeout: float) -> Outcome:
    """Send ``ask`` to swapd on a new connection and classify what comes back."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    seen = _Seen()
    verdict: Verdict
    try:
        verdict = _converse(conn, ask, started + timeout, seen)
    except TimeoutError:
        verdict = ("hung", "no answer" if seen.status is None else "stream stalled", None)
    except http.client.IncompleteRead:
        verdict = ("cut" if ask.stream else "opaque", "connection cut mid-body", None)
    except http.client.RemoteDisconnected:
        verdict = ("opaque", "closed without an answer", None)
    except ConnectionResetError:
        if seen.status is not None and ask.stream:
            verdict = ("cut", "connection reset mid-stream", None)
        else:
            verdict = (
                "opaque",
                "reset" + (" without an answer" if seen.status is None else ""),
                None,
            )
    except (http.client.HTTPException, OSError) as exc:
        verdict = ("opaque", f"{type(exc).__name__}: {exc}", None)
    finally:
        conn.close()
    kind, detail, message = verdict
    return Outcome(
        kind,
        detail,
        ask.model,
        ask.stream,
        started,
        time.monotonic(),
        seen.status,
        seen.request_id,
        message,
    )


def _converse(conn: http.client.HTTPConnection, ask: Ask, deadline: float, seen: _Seen) -> Verdict:
    conn.request("POST", ask.path, json.dumps(ask.body()), {"Content-Type": "application/json"})
    if ask.hangup_early is not None:
        time.sleep(ask.hangup_early)
        return "hangup", "before the answer", None
    resp = conn.getresponse()
    seen.status = resp.status
    seen.request_id = resp.getheader("X-Request-Id")
    content_type = resp.getheader("Content-Type") or ""
    if not 200 <= resp.status < 300:
        return classify_error(resp.status, content_type, resp.read())
    if not ask.stream:
        return (*_check_body(ask, resp.read()), None)
    if not content_type.startswith("text/event-stream"):
        return "opaque", f"stream asked, got {content_type or 'no content type'}", None
    return _read_stream(resp, ask, deadline)


def _read_stream(resp: http.client.HTTPResponse, ask: Ask, deadline: float) -> Verdict:
    events: list[bytes] = []
    while line := resp.readline():
        if time.monotonic() > deadline:
            return "hung", "stream still running at the timeout", None
        if line.startswith(b"data:"):
            events.append(line[5:].strip())
            if ask.hangup_after is not None and len(events) > ask.hangup_after:
                return "hangup", "mid-stream", None
    return _check_stream(ask, events)


# ---------------------------------------------------------------- kills and attribution


@dataclass(frozen=True)
class Kill:
    """A backend killed on purpose: SIGKILL by the chaos thread, or a forced unload."""

    how: str
    model: str
    started: float
    ended: float
    pid: int | None = None
    state: str | None = None


def settle(outcome: Outcome, kills: Iterable[Kill]) -> Outcome:
    """A cut stream stays ``cut`` only when its model's backend was killed meanwhile."""
    if outcome.kind != "cut":
        return outcome
    for kill in kills:
        overlaps = kill.started <= outcome.ended and kill.ended >= outcome.started
        if kill.model == outcome.model and overlaps:
            return replace(outcome, detail=f"{outcome.detail} ({kill.how})")
    return replace(outcome, kind="opaque", detail=f"{outcome.detail}, no backend killed")


# ---------------------------------------------------------------- swapd's side


@dataclass
class RssSampler:
    """Samples the resident memory of swapd and of its reaper in a thread."""

    pid: int
    interval: float = 0.05
    first: int = 0
    peak: int = 0
    last: int = 0
    reaper_peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        """Start sampling."""
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Json:
        """Stop sampling; the figures in MiB."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        mib = 1024**2
        return {
            "swapd_first_mib": round(self.first / mib, 1),
            "swapd_peak_mib": round(self.peak / mib, 1),
            "swapd_last_mib": round(self.last / mib, 1),
            "reaper_peak_mib": round(self.reaper_peak / mib, 1),
            "samples": self.samples,
        }

    def _run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                rss = proc.memory_info().rss
                self.first = self.first or rss
                self.peak = max(self.peak, rss)
                self.last = rss
                self.samples += 1
                for child in proc.children():
                    with contextlib.suppress(psutil.Error):
                        if "swapd.reaper" in child.cmdline():
                            self.reaper_peak = max(self.reaper_peak, child.memory_info().rss)
            self._stop.wait(self.interval)


def swapd_pid(daemon: Daemon) -> int:
    """The pid of a started swapd."""
    if daemon.proc is None:
        raise RuntimeError("swapd is not started")
    return daemon.proc.pid


def held(daemon: Daemon) -> Json:
    """Requests swapd counts in flight at its backends and waiting for a load, summed."""
    _, status = daemon.get("/swapd/status")
    models = status["models"]
    return {
        "in_flight": sum(int(m["in_flight"]) for m in models),
        "waiting": sum(int(m["waiting"]) for m in models),
        "states": {m["name"]: m["state"] for m in models},
    }


def held_after(daemon: Daemon, settle_s: float = 10.0) -> Json:
    """What swapd holds right after the clients finished, and once settled (bounded).

    Settled: nothing in flight or waiting, and no model in a passing state (a restart or
    a stop that the last calls set going may still be under way right after).
    """
    first = held(daemon)
    deadline = time.monotonic() + settle_s
    now = first
    while _unsettled(now) and time.monotonic() < deadline:
        time.sleep(0.2)
        now = held(daemon)
    stuck = {name: state for name, state in now["states"].items() if state in TRANSIENT}
    return {"right_after": first, "settled": now, "stuck": stuck}


def _unsettled(held: Json) -> bool:
    passing = any(state in TRANSIENT for state in held["states"].values())
    return bool(held["in_flight"] + held["waiting"]) or passing


def log_summary(path: Path) -> Json:
    """Counts of swapd's log events, and every warning or error by event name."""
    events: collections.Counter[str] = collections.Counter()
    problems: collections.Counter[str] = collections.Counter()
    samples: dict[str, str] = {}
    unparsed = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            unparsed += 1
            samples.setdefault("(not JSON)", line[:300])
            continue
        if not isinstance(event, dict):
            continue
        name = str(event.get("event"))
        events[name] += 1
        if event.get("level") in ("warning", "error", "critical", "exception"):
            key = f"{event.get('level')} {name}"
            problems[key] += 1
            samples.setdefault(key, line[:400])
    return {
        "events": dict(events.most_common()),
        "problems": dict(problems.most_common()),
        "samples": samples,
        "unparsed_lines": unparsed,
    }


def shut_down(daemon: Daemon) -> Json:
    """SIGTERM swapd, time its exit, then list (and kill) any process it left behind."""
    started = time.monotonic()
    code = daemon.stop()
    stop_s = time.monotonic() - started
    left = wait_for_gone(daemon, timeout=10.0)
    orphans = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            orphans.append({"pid": proc.pid, "cmdline": " ".join(proc.cmdline())[:200]})
            proc.kill()
    return {"exit_code": code, "stop_s": round(stop_s, 2), "orphans": orphans}


# ---------------------------------------------------------------- reports


def count_outcomes(outcomes: Iterable[Outcome]) -> Json:
    """Counts by kind, by kind and detail, and one message per detail."""
    kinds: collections.Counter[str] = collections.Counter()
    details: collections.Counter[str] = collections.Counter()
    messages: dict[str, str] = {}
    for o in outcomes:
        kinds[o.kind] += 1
        key = f"{o.kind}: {o.detail}"
        details[key] += 1
        if o.message:
            messages.setdefault(key, o.message[:300])
    internal = sum(n for key, n in details.items() if key.endswith(INTERNAL_CODES))
    return {
        "internal": internal,
        "kinds": dict(kinds.most_common()),
        "details": dict(sorted(details.items())),
        "messages": messages,
    }


def print_counts(title: str, counts: Json) -> None:
    """The classified outcomes as an indented list."""
    kinds = ", ".join(f"{k} {v}" for k, v in counts["kinds"].items())
    print(f"{title}: {kinds} (errors from an exception inside swapd: {counts['internal']})")
    for key, n in counts["details"].items():
        message = counts["messages"].get(key)
        print(f"  {n:5d}  {key}" + (f"  ({message[:100]})" if message else ""))


def keep_log(daemon: Daemon, target: Path) -> None:
    """Copy swapd's log next to the JSON report."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(daemon.log_path, target)
    print(f"swapd's log: {target}")


def fake_presets(chunks: int, interval: float, extra: Mapping[str, Sequence[str]]) -> Json:
    """One ``command`` preset per model, each running the fake backend."""
    stream = ["--chunks", str(chunks), "--chunk-interval", str(interval)]
    return {name: fake_preset(name, *stream, *extra.get(name, ())) for name in MODELS}


def opaque_examples(outcomes: Iterable[Outcome], limit: int = 10) -> list[Json]:
    """A few opaque, wrong or hung outcomes in full, for a bug report."""
    bad = [asdict(o) for o in outcomes if o.kind not in (*NOT_ERRORS, "error")]
    return bad[:limit]


# ---------------------------------------------------------------- the storm


def parse_args() -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32, help="client threads")
    p.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests")
    p.add_argument("--max-running", type=int, default=1, help="swapd's max_running")
    p.add_argument("--chunks", type=int, default=8, help="chunks per streamed answer")
    p.add_argument("--chunk-interval", type=float, default=0.02, help="seconds between chunks")
    p.add_argument("--max-delay", type=float, default=0.1, help="fake_delay drawn up to this")
    p.add_argument("--timeout", type=float, default=300.0, help="client timeout: hung after")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "out" / "bench_storm.json")
    args = p.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256:
        p.error("--requests must be 1..100000 and --concurrency 1..256")
    return args


def storm_asks(args: argparse.Namespace) -> list[Ask]:
    """The requests, drawn from a seeded generator."""
    rng = random.Random(args.seed)
    return [
        Ask(
            model=rng.choice(MODELS),
            stream=rng.random() < args.stream_share,
            chat=rng.random() < 0.5,
            delay=rng.uniform(0, args.max_delay),
        )
        for _ in range(args.requests)
    ]


def main() -> None:
    """Run the storm and print and write the report."""
    args = parse_args()
    info = machine_info()
    print_machine(info)
    settings: Json = {"max_running": args.max_running}
    presets = fake_presets(args.chunks, args.chunk_interval, {})
    daemon = Daemon(Path(tempfile.mkdtemp(prefix="swapd-storm-")), presets, settings)
    asks = storm_asks(args)
    daemon.start()
    sampler = RssSampler(swapd_pid(daemon)).start()
    try:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            outcomes = list(pool.map(lambda a: exchange(daemon.port, a, args.timeout), asks))
        wall = time.monotonic() - started
        outcomes = [settle(o, ()) for o in outcomes]  # nothing is killed in a storm
        after = held_after(daemon)
    finally:
        rss = sampler.stop()
        ending = shut_down(daemon)
        keep_log(daemon, args.out.with_suffix(".log"))
    logs = log_summary(daemon.log_path)
    counts = count_outcomes(outcomes)
    ok = [o.seconds for o in outcomes if o.kind == "ok"]
    report: Json = {
        "machine": finish_info(info),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "settings": settings,
        "presets": presets,
        "wall_s": round(wall, 2),
        "outcomes": counts,
        "ok_latency_s": summarize(ok),
        "held_after": after,
        "rss": rss,
        "shutdown": ending,
        "log": logs,
        "examples": opaque_examples(outcomes),
    }
    write_json(args.out, report)
    loads = logs["events"].get("model.load.done", 0)
    print(f"settings: {settings}, presets: {', '.join(MODELS)} (fake backend, command)")
    print(f"{len(asks)} requests, {args.concurrency} clients, {wall:.1f} s, {loads} loads")
    print_counts("outcomes", counts)
    lat = report["ok_latency_s"]
    if ok:
        print(f"answered latency s: p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} max {lat['max']:.2f}")
    print(f"held after: {after}")
    print(f"rss: {rss}")
    print(f"shutdown: {ending}")
    print(f"log problems: {logs['problems']}")


if __name__ == "__main__":
    main()
