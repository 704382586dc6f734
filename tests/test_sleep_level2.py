"""Waking a vLLM from sleep level 2.

Level 2 discards the weights (vLLM's CuMemBackend.suspend offloads only "runtime" and
"cudagraph" at level 2; CuMemBackend.resume and Executor.wake_up only re-map memory).
A plain ``POST /wake_up`` therefore leaves uninitialised weights: vLLM's documented
level-2 wake is ``/wake_up?tags=weights``, ``POST /collective_rpc
{"method": "reload_weights"}``, ``/wake_up?tags=kv_cache``. The fake vLLM
(``tests/fakes/fake_vllm.py``) does the same: after a level-2 sleep it answers garbage
until ``reload_weights`` has run, and it serves only once both tags are awake.
"""

from __future__ import annotations

from pathlib import Path

from conftest import StartDaemon
from daemon import hook_env, wait_for

# Loaded into the daemon only: its cap on one sleep-API call, made short so a reload a
# few seconds long outlasts it (a real one may outlast the 120 s of the real cap).
SHORT_CALL_CAP = """
import sys
if sys.argv[:2] == ["-m", "serve"]:
    import swapd.backends.vllm
    swapd.backends.vllm._CALL_TIMEOUT = 1.0
"""


def _model(tmp_path: Path) -> Path:
    model = tmp_path / "m"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"\0" * 1024)
    return model


def test_a_vllm_woken_from_sleep_level_2_serves_its_model(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """sleep: 2, TTL demotes it, the next request wakes it: the answer must be the model's."""
    d = start_daemon(
        {
            "v": {
                "backend": "vllm",
                "model": str(_model(tmp_path)),
                "binary": vllm_binary,
                "sleep": 2,
                "ttl": "1s",
            }
        }
    )
    status, body = d.chat("v", "before")
    assert status == 200, body
    assert (status, body["choices"][0]["message"]["content"]) == (200, "v: before")
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    assert [e["sleep_level"] for e in d.events("model.sleep")] == [2]
    status, body = d.chat("v", "after")
    assert status == 200, body
    assert [e["how"] for e in d.events("model.load.done")] == ["start", "wake"]
    assert body["choices"][0]["message"]["content"] == "v: after"


def test_a_level_2_wake_without_collective_rpc_fails_once_then_the_model_goes_to_disk(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """sleep: 2 on a vLLM whose /collective_rpc answers 404 (a build without it).

    Its /sleep works, so the missing endpoint shows only at the wake: that wake fails
    (the process is ended). As for a missing /sleep, the launch then starts without sleep
    mode and its demotions stop it to disk; before, each TTL put it to sleep again and
    each next request's wake failed with 502 the same way.
    """
    model = _model(tmp_path)
    preset = {"backend": "vllm", "model": str(model), "binary": vllm_binary, "sleep": 2}
    d = start_daemon({"v": {**preset, "ttl": "1s"}}, env={"FAKE_VLLM_NO_RPC": "1"})
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    status, body = d.chat("v")
    assert status == 502, body
    assert "/collective_rpc: HTTP 404" in body["error"]["message"]
    [missing] = d.events("model.sleep.missing")
    assert "HTTP 404" in missing["reason"]

    wait_for(lambda: d.model("v")["state"] == "failed")  # the backoff is over
    assert d.chat("v")[0] == 200  # started afresh, without sleep mode
    assert "sleep API is missing" in d.model("v")["sleep"]["note"]
    assert d.model("v")["sleep"]["level"] == 0
    wait_for(lambda: d.model("v")["state"] in ("stopped", "asleep"), timeout=40)  # the TTL
    assert d.model("v")["state"] == "stopped"
    assert d.chat("v")[0] == 200
    assert len(d.events("model.sleep.missing")) == 1


def test_a_level_2_wake_whose_reload_outlasts_one_calls_cap_is_bounded_by_start_timeout(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """The reload of a level-2 wake reads the whole model again: as long as a start's load.

    It is bounded by the preset's ``start_timeout``, as a start is. Before, each call of
    the wake had the cap of one sleep-API call (120 s) too: a model whose reload took
    longer failed its wake (502) and was ended, however long its ``start_timeout``.
    """
    preset = {"backend": "vllm", "model": str(_model(tmp_path)), "binary": vllm_binary}
    d = start_daemon(
        {"v": {**preset, "sleep": 2, "ttl": "1s", "start_timeout": "2m"}},
        env={
            "FAKE_VLLM_RELOAD_DELAY": "3",
            **hook_env(tmp_path / "hook", SHORT_CALL_CAP),
        },
    )
    assert d.chat("v", "before")[0] == 200
    pid = d.model("v")["pid"]
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    status, body = d.chat("v", "after")
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "v: after"
    assert d.model("v")["pid"] == pid
    assert [e["how"] for e in d.events("model.load.done")] == ["start", "wake"]


def test_a_level_2_sleeper_without_sleep_mode_wakes_without_reloading_its_weights(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """sleep: 2 where the backend refused --enable-sleep-mode (vLLM's CPU build).

    Its /sleep only paused the engine, its weights never left: the wake is a plain
    /wake_up. Before, it ran reload_weights too, reading the whole model again for nothing.
    """
    preset = {"backend": "vllm", "model": str(_model(tmp_path)), "binary": vllm_binary}
    d = start_daemon(
        {"v": {**preset, "sleep": 2, "ttl": "1s"}}, env={"FAKE_VLLM_REFUSE_SLEEP_MODE": "1"}
    )
    assert d.chat("v", "before")[0] == 200
    assert len(d.events("model.sleep.refused")) == 1
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    status, body = d.chat("v", "after")
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "v: after"
    assert [e["how"] for e in d.events("model.load.done")] == ["start", "wake"]
    _, logs = d.get("/swapd/models/v/logs")
    assert "reload_weights" not in str(logs)
