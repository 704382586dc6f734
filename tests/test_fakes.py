"""The fakes behave as the daemon's tests rely on: real subprocesses, real HTTP, real files."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import pytest
from fakes import probe_file
from fakes.tiny_gguf import write_tiny_llama_gguf

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

UPSTREAM = Path(__file__).parent / "fakes" / "upstream.py"
TIMEOUT = 30.0  # generous: only reached when something is broken


@dataclass
class Upstream:
    """A running fake upstream and the port it bound."""

    proc: subprocess.Popen[bytes]
    port: int

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request and return the status and decoded JSON answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def wait_healthy(self) -> None:
        """Poll the health route until it answers 200."""
        deadline = time.monotonic() + TIMEOUT
        while self.call("GET", "/health")[0] != 200:
            assert time.monotonic() < deadline, "fake upstream never became healthy"
            time.sleep(0.05)


def read_until(stream: Any, marker: bytes) -> bytes:
    """Read a child's pipe until ``marker`` appears, without blocking past the timeout."""
    seen = b""
    deadline = time.monotonic() + TIMEOUT
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} not seen in {seen!r}"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, f"pipe closed before {marker!r}; got {seen!r}"
            seen += chunk
    return seen


@pytest.fixture
def start_upstream() -> Iterator[Callable[..., Upstream]]:
    """Start fake upstreams on free ports; kill their process groups afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Upstream:
        proc = subprocess.Popen(
            [sys.executable, str(UPSTREAM), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            # Its own group, so that cleanup also reaches a --fork-child grandchild.
            start_new_session=True,
        )
        procs.append(proc)
        line = read_until(proc.stdout, b"listening on").decode()
        port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        return Upstream(proc, port)

    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_health_is_503_while_loading_then_200(start_upstream: Callable[..., Upstream]) -> None:
    """With --start-delay the port answers at once, 503 "Loading model" until the delay ends."""
    up = start_upstream("--start-delay", "3")
    assert up.call("GET", "/health") == (
        503,
        {"error": {"code": 503, "message": "Loading model"}},
    )
    up.wait_healthy()
    assert up.call("GET", "/health") == (200, {"status": "ok"})


def test_stream_chunks_are_produced_apart_and_arrive_apart(
    start_upstream: Callable[..., Upstream],
) -> None:
    """Streamed chunks are produced --chunk-interval apart and written one by one."""
    interval = 0.1
    up = start_upstream("--name", "s", "--chunks", "5", "--chunk-interval", str(interval))
    conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=TIMEOUT)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
    response = conn.getresponse()
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    chunks: list[dict[str, Any]] = []
    arrived: list[float] = []
    while (line := response.readline()) != b"data: [DONE]\n":
        if line.startswith(b"data: "):
            chunks.append(json.loads(line[len(b"data: ") :]))
            arrived.append(time.time())
    conn.close()

    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [f"s-{i}" for i in range(5)]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    produced = [c["produced_at"] for c in chunks]
    # 10% slack for timer granularity; the sleeps between chunks are the interval itself.
    assert all(b - a >= interval * 0.9 for a, b in itertools.pairwise(produced))
    # Buffered chunks would arrive together; streamed ones spread over four intervals.
    assert arrived[-1] - arrived[0] >= interval


@pytest.mark.parametrize("listen_late", [False, True])
def test_exit_at_start_exits_with_the_code_and_says_why(listen_late: bool) -> None:
    """--exit-at-start exits with its code after the delay, with a fatal line on stderr."""
    late = ["--listen-late"] if listen_late else []
    argv = [sys.executable, str(UPSTREAM), "--port", "0", "--start-delay", "0.2", *late]
    proc = subprocess.Popen(
        [*argv, "--exit-at-start", "7"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 7
    assert b"fake-upstream: fatal: configured to exit with 7" in err
    # A vLLM-like backend dies before it ever binds; a llama-like one after.
    assert (b"listening on" in out) is not listen_late


def test_ignore_sigterm_survives_sigterm_until_sigkill(
    start_upstream: Callable[..., Upstream],
) -> None:
    """With --ignore-sigterm, SIGTERM is logged and ignored; only SIGKILL ends it."""
    up = start_upstream("--ignore-sigterm")
    up.wait_healthy()
    up.proc.send_signal(signal.SIGTERM)
    read_until(up.proc.stderr, b"fake-upstream: ignoring SIGTERM")
    assert up.call("GET", "/health")[0] == 200
    up.proc.kill()
    assert up.proc.wait(TIMEOUT) == -signal.SIGKILL


def test_probe_file_registers_when_ready_and_releases_late_on_sigterm(
    start_upstream: Callable[..., Upstream], tmp_path: Path
) -> None:
    """The fake registers its bytes on the visible GPU when ready; SIGTERM sets released_at."""
    probe = tmp_path / "probe.json"
    probe_file.write_devices(probe, {"gpu1": {"total": 10_000, "outside": 100}})
    up = start_upstream(
        "--probe-file", str(probe), "--mem-bytes", "1234", "--release-delay", "60",
        env={"CUDA_VISIBLE_DEVICES": "1,0"},
    )  # fmt: skip
    up.wait_healthy()
    entry = probe_file.read_state(probe)["processes"][str(up.proc.pid)]
    assert entry == {"device": "gpu1", "bytes": 1234, "released_at": None}
    assert probe_file.used_bytes(probe_file.read_state(probe)) == {"gpu1": 1334}

    before = time.time()
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(TIMEOUT) == 0
    state = probe_file.read_state(probe)
    released_at = state["processes"][str(up.proc.pid)]["released_at"]
    assert released_at >= before + 60
    # The process is gone, yet its memory counts until released_at has passed.
    assert probe_file.used_bytes(state) == {"gpu1": 1334}
    assert probe_file.used_bytes(state, now=released_at) == {"gpu1": 100}
    assert state["devices"] == {"gpu1": {"total": 10_000, "outside": 100}}


def test_sleep_holds_requests_and_shrinks_memory_until_wake_up(
    start_upstream: Callable[..., Upstream], tmp_path: Path
) -> None:
    """Asleep, the fake keeps only the residual bytes and holds completions until woken."""
    probe = tmp_path / "probe.json"
    up = start_upstream(
        "--probe-file", str(probe), "--mem-bytes", "1000", "--sleep-residual-bytes", "10"
    )
    up.wait_healthy()
    assert up.call("POST", "/sleep?level=1") == (200, {"status": "sleeping", "level": 1})
    assert up.call("GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert probe_file.read_state(probe)["processes"][str(up.proc.pid)]["bytes"] == 10

    conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "p"}))
    deadline = time.monotonic() + TIMEOUT
    while up.call("GET", "/fake/stats")[1]["in_flight"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert up.call("POST", "/wake_up") == (200, {"status": "awake"})
    assert conn.getresponse().status == 200
    conn.close()
    assert probe_file.read_state(probe)["processes"][str(up.proc.pid)]["bytes"] == 1000


def test_crash_after_dies_mid_request_with_code_3(
    start_upstream: Callable[..., Upstream],
) -> None:
    """--crash-after 1 answers one completion, then exits with 3 without answering."""
    up = start_upstream("--crash-after", "1")
    body = {"messages": [{"role": "user", "content": "x"}]}
    assert up.call("POST", "/v1/chat/completions", body)[0] == 200
    with pytest.raises(ConnectionError):  # http.client.RemoteDisconnected
        up.call("POST", "/v1/chat/completions", body)
    assert up.proc.wait(TIMEOUT) == 3


def test_fork_child_stays_in_the_process_group(start_upstream: Callable[..., Upstream]) -> None:
    """--fork-child starts a grandchild in the fake's group and reports its pid."""
    up = start_upstream("--fork-child")
    stats = up.call("GET", "/fake/stats")[1]
    assert stats["pid"] == up.proc.pid
    assert os.getpgid(stats["child_pid"]) == os.getpgid(up.proc.pid)


def test_tiny_gguf_is_a_readable_llama(tmp_path: Path) -> None:
    """The tiny GGUF is small, llama-architecture, with the requested layers and vocab."""
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", n_layers=3)
    assert path.stat().st_size < 2 * 1024**2
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 3
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 3 + 256
    assert sum(t.name.endswith("attn_q.weight") for t in reader.tensors) == 3
