"""A sleeping vLLM going down to disk is not on the device while it stops."""

from __future__ import annotations

from pathlib import Path

from conftest import StartDaemon
from daemon import wait_for
from test_tiers import vllm_preset


def test_an_asleep_model_stopping_on_ram_ttl_is_not_reported_on_the_device(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """While its stop lasts, its tier is ram, and the device's bytes do not count it."""
    preset = vllm_preset(vllm_binary, tmp_path / "m", ttl="1s", ram_ttl="2s", stop_timeout="5s")
    # The fake ignores SIGTERM: the stop lasts stop_timeout, long enough to be seen.
    d = start_daemon({"v": preset}, env={"FAKE_VLLM_UPSTREAM_ARGS": "--ignore-sigterm"})
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    _, status = wait_for(
        lambda: (s := d.get("/swapd/status"))[1]["models"][0]["state"] == "stopping" and s,
        timeout=40,
        interval=0.02,
    )
    model = status["models"][0]
    # The weights are in host RAM (sleep level 1), not on the device: README's tier table.
    assert model["tier"] != "device", model
    assert status["tiers"]["device"]["bytes"] == 0, status["tiers"]
    wait_for(lambda: d.model("v")["state"] == "stopped", timeout=40)
