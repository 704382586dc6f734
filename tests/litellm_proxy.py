"""Run a real LiteLLM proxy (PyPI's ``litellm[proxy]``, from scripts/litellm-env) as a subprocess.

LiteLLM lives in a venv of its own under ``$SWAPD_CACHE``: its dependencies
would clash with swapd's. It runs offline: the model cost map is the copy in
the package, ``.env`` files are not read, and nothing phones home.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import build_cache, free_port, wait_for

AFFINITY_HOOK = Path(__file__).resolve().parent.parent / "deploy" / "litellm" / "swapd_affinity.py"
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else it downloads the price list at import
    "LITELLM_MODE": "PRODUCTION",  # no .env from the working folder
    "LITELLM_TELEMETRY": "False",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "NO_PROXY": "127.0.0.1,localhost",
}


def litellm_binary() -> Path | None:
    """The ``litellm`` that scripts/litellm-env installed, or None where it has not run."""
    venv = build_cache() / "litellm-venv"
    binary = venv / "bin" / "litellm"
    return binary if binary.exists() and (venv / ".swapd-ready").exists() else None


def litellm_config(*args: str) -> str:
    """Run ``swapd litellm-config`` with ``args``; its YAML (fails the test on a non-zero exit)."""
    out = subprocess.run(
        [sys.executable, "-m", "swapd", "litellm-config", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@dataclass(frozen=True)
class Answer:
    """What the proxy answered: status, JSON body, headers (lower-cased names)."""

    status: int
    body: Any
    raw_headers: Mapping[str, str]

    @property
    def served_by(self) -> str:
        """Which fake upstream wrote the reply: its ``--name``, which the text begins with."""
        text: str = self.body["choices"][0]["message"]["content"]
        return text.partition(":")[0]

    @property
    def retries(self) -> int:
        """How often LiteLLM retried before this answer (``x-litellm-attempted-retries``)."""
        headers = {k.lower(): v for k, v in self.raw_headers.items()}
        return int(headers.get("x-litellm-attempted-retries", "0"))


@dataclass
class LiteLLM:
    """A LiteLLM proxy on a loopback port, with its config file and log in ``root``."""

    binary: Path
    root: Path
    config: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the proxy."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the proxy's output goes."""
        return self.root / "litellm.log"

    def start(self, env: Mapping[str, str] | None = None) -> LiteLLM:
        """Write the config (and the affinity hook beside it) and wait until LiteLLM is ready."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yaml"
        config.write_text(self.config)
        (self.root / AFFINITY_HOOK.name).write_text(AFFINITY_HOOK.read_text())
        argv = [str(self.binary), "--config", str(config), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--num_workers", "1"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env={**os.environ, **OFFLINE_ENV, **(env or {})},
                start_new_session=True,
            )
        wait_for(self._ready, timeout=120, interval=0.2)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            msg = f"litellm exited with {self.proc.returncode}:\n{self.log_path.read_text()}"
            raise AssertionError(msg)
        try:
            ready = f"{self.url}/health/readiness"
            with urllib.request.urlopen(ready, timeout=2) as resp:  # noqa: S310 - loopback
                return bool(resp.status == 200)
        except OSError:
            return False

    def chat(self, model: str, content: str = "hi", timeout: float = 60) -> Answer:
        """POST a chat completion through the proxy."""
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        req = urllib.request.Request(  # noqa: S310 - loopback URL built here
            f"{self.url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                return Answer(resp.status, json.loads(resp.read()), dict(resp.headers))
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, json.loads(exc.read()), dict(exc.headers))

    def stop(self) -> None:
        """SIGTERM the proxy's process group and wait; SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def node_args(urls: Sequence[str]) -> list[str]:
    """``--node URL`` for each URL."""
    return [arg for url in urls for arg in ("--node", url)]
