"""Run a real swapd as a subprocess for end-to-end tests, and find what it leaves behind.

Every process a test daemon starts inherits ``SWAPD_TEST_MARK``; scanning the
process table for it finds leftovers however they were spawned.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

FAKE_UPSTREAM = Path(__file__).resolve().parent / "fakes" / "upstream.py"


def free_port() -> int:
    """A loopback port that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fake_preset(name: str, *extra: str, **keys: Any) -> dict[str, Any]:
    """A ``backend: command`` preset running the fake upstream with extra options."""
    cmd = [sys.executable, str(FAKE_UPSTREAM), "--port", "${PORT}", "--name", name, *extra]
    return {"backend": "command", "cmd": cmd, **keys}


def fake_stats(port: int) -> dict[str, Any]:
    """What a fake upstream on ``port`` reports about itself (requests, cancels, child pid)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/fake/stats", timeout=5) as resp:
        stats: dict[str, Any] = json.load(resp)
    return stats


def write_layout(
    root: Path,
    port: int,
    presets: Mapping[str, Mapping[str, Any]],
    settings: Mapping[str, Any],
) -> Path:
    """Write ``root/swapd.yaml`` (loopback, state in root, host RAM) and one file per preset."""
    folder = root / "presets"
    folder.mkdir(parents=True, exist_ok=True)
    for name, preset in presets.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(dict(preset)))
    config = {"listen": f"127.0.0.1:{port}", "state_dir": "state", "devices": "cpu", **settings}
    path = root / "swapd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def hook_env(hook: Path, source: str) -> dict[str, str]:
    """The environment of a swapd whose interpreters run ``source`` first.

    ``source`` is written to ``hook/sitecustomize.py`` (the folder is made), and the
    folder goes first on ``PYTHONPATH``: a delay or a fault loaded into the real daemon.
    """
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(source)
    return {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}


def marked(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``mark`` (zombies excluded)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("SWAPD_TEST_MARK") == mark:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            msg = f"condition not met within {timeout}s"
            raise AssertionError(msg)
        time.sleep(interval)


@dataclass
class Daemon:
    """A swapd subprocess with its own config, presets, state and log."""

    root: Path
    presets: Mapping[str, Mapping[str, Any]]
    settings: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the daemon."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the daemon's stdout and stderr go."""
        return self.root / "swapd.log"

    @property
    def config_path(self) -> Path:
        """The daemon config file."""
        return self.root / "swapd.yaml"

    def write(self) -> None:
        """Write the config and one preset file per model."""
        write_layout(self.root, self.port, self.presets, self.settings)

    def start(self) -> Daemon:
        """Start swapd and wait until /health answers."""
        self.write()
        env = {**os.environ, "SWAPD_TEST_MARK": self.mark, **self.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "swapd", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
            )
        wait_for(self._healthy, timeout=30)
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            msg = f"swapd exited with {self.proc.returncode}:\n{self.log_path.read_text()}"
            raise AssertionError(msg)
        try:
            return self.get("/health")[0] == 200
        except OSError:
            return False

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One HTTP exchange with the daemon; JSON in and out where given; extra headers."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - loopback URL built here
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """GET a path."""
        return self.request("GET", path, headers=headers)

    def chat(self, model: str, content: str = "hi", **extra: Any) -> tuple[int, Any]:
        """POST a chat completion."""
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        return self.request("POST", "/v1/chat/completions", body)

    def model(self, name: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """This model's entry in /swapd/status (``headers`` carry a key where one is needed)."""
        _, status = self.get("/swapd/status", headers)
        return next(m for m in status["models"] if m["name"] == name)

    def events(self, name: str) -> list[dict[str, Any]]:
        """Structured log events called ``name``, in order."""
        found = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == name:
                    found.append(event)
        return found

    def stop(self) -> int:
        """SIGTERM swapd and wait for it; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def leftovers(self) -> list[psutil.Process]:
        """Processes this daemon started that are still alive."""
        running = self.proc is not None and self.proc.poll() is None
        return [
            p
            for p in marked(self.mark)
            if not (self.proc is not None and p.pid == self.proc.pid)
            and not (running and _is_reaper(p))
        ]

    def cleanup(self) -> list[int]:
        """Stop swapd, kill any leftover (and report it, so a test can fail on it)."""
        self.stop()
        left = wait_for_gone(self)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return [p.pid for p in left]


def _is_reaper(proc: psutil.Process) -> bool:
    # swapd's own watchdog lives as long as swapd does; it is not a backend.
    try:
        return "swapd.reaper" in proc.cmdline()
    except psutil.Error:
        return False


def queue_behind(
    daemon: Daemon, pool: ThreadPoolExecutor, busy: str, waiting: str, seconds: float
) -> tuple[Future[tuple[int, Any]], Future[tuple[int, Any]]]:
    """Keep ``busy`` serving one request for ``seconds``; queue one for ``waiting`` behind it.

    Returns both requests' futures once the second is ``queued`` (``max_running: 1``).
    """
    long = pool.submit(daemon.chat, busy, "long", fake_delay=seconds)
    wait_for(lambda: daemon.model(busy)["in_flight"] == 1)
    queued = pool.submit(daemon.chat, waiting)
    wait_for(lambda: daemon.model(waiting)["state"] == "queued")
    return long, queued


def wait_for_gone(daemon: Daemon, timeout: float = 10.0) -> list[psutil.Process]:
    """Wait until no marked process is left; return those that stayed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = daemon.leftovers()
        if not left:
            return []
        time.sleep(0.05)
    return daemon.leftovers()


def build_cache() -> Path:
    """Where the set-up scripts keep the builds, venvs and models they make once."""
    cache = os.environ.get("SWAPD_CACHE")
    if cache:
        return Path(cache)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swapd-build"
