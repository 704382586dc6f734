"""How swapd decides that a backend refused ``--enable-sleep-mode``.

Each test runs the fake vLLM (``tests/fakes/fake_vllm.py``) behind a small shell wrapper
that stands for one real vLLM behaviour.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from conftest import FAKE_VLLM, StartDaemon
from daemon import wait_for

FLAG = "--enable-sleep-mode"
# What vLLM's CUDA build logs on every start with the flag (vllm/config/model.py:660).
CUMEM_LINE = (
    "(APIServer pid=1) INFO 11-27 05:09:30 [model.py:660] "
    "Enabling cumem allocator because sleep mode requires it."
)


def _wrapper(path: Path, body: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\n{body}\nexec {sys.executable} {FAKE_VLLM} "$@"\n')
    path.chmod(0o755)
    return str(path)


def _preset(binary: str, model_dir: Path, **keys: Any) -> dict[str, Any]:
    model_dir.mkdir(exist_ok=True)
    (model_dir / "weights.safetensors").write_bytes(b"\0" * 1024)
    return {"backend": "vllm", "model": str(model_dir), "binary": binary, "sleep": 1, **keys}


def test_an_unrelated_crash_after_vllms_cumem_line_is_not_a_refusal(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A start that dies (SIGKILL: the OOM killer, say) after vLLM's usual cumem line.

    The backend accepted --enable-sleep-mode; it died for another reason, once. swapd
    must not start it again without the flag, nor remember a refusal for the launch.
    """
    once = tmp_path / "crashed-once"
    binary = _wrapper(
        tmp_path / "bin" / "vllm",
        f'if [ ! -e {once} ]; then touch {once}; echo "{CUMEM_LINE}"; '
        'echo "Loading safetensors checkpoint shards:   0% Completed | 0/4"; kill -9 $$; fi',
    )
    d = start_daemon({"v": _preset(binary, tmp_path / "m")})
    d.chat("v")  # the first start dies, whatever swapd answers
    assert d.events("model.sleep.refused") == []
    if d.model("v")["state"] != "ready":
        assert d.request("POST", "/swapd/models/v/load")[0] == 200
    spawns = d.events("backend.spawn")
    assert all(FLAG in s["argv"] for s in spawns), [s["argv"][-8:] for s in spawns]
    assert d.model("v")["sleep"]["note"] is None


def test_vllm_without_the_flag_refusing_it_by_argparse_is_retried(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A vLLM that predates the flag exits 2 with argparse's 'unrecognized arguments'.

    That is the flag refused at start: README says swapd starts it again without it.
    """
    binary = _wrapper(
        tmp_path / "bin" / "vllm",
        'for a in "$@"; do if [ "$a" = "--enable-sleep-mode" ]; then '
        'echo "usage: vllm serve [model_tag] [options]" >&2; '
        'echo "vllm serve: error: unrecognized arguments: --enable-sleep-mode" >&2; '
        "exit 2; fi; done",
    )
    d = start_daemon({"v": _preset(binary, tmp_path / "m")})
    status, body = d.chat("v")
    assert status == 200, body
    spawns = d.events("backend.spawn")
    assert [FLAG in s["argv"] for s in spawns] == [True, False]
    assert "refused --enable-sleep-mode" in d.model("v")["sleep"]["note"]


def test_a_reload_to_a_binary_that_takes_the_flag_starts_it_with_sleep_mode(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The refusal is remembered per launch; a new ``binary:`` is a new launch.

    The operator moves the preset from a CPU build (refuses the flag) to a build that
    takes it: the reload restarts the model, which must get --enable-sleep-mode again.
    """
    refusing = _wrapper(tmp_path / "cpu" / "vllm", "export FAKE_VLLM_REFUSE_SLEEP_MODE=1")
    accepting = _wrapper(tmp_path / "gpu" / "vllm", ":")
    d = start_daemon({"v": _preset(refusing, tmp_path / "m")})
    assert d.chat("v")[0] == 200
    assert [FLAG in s["argv"] for s in d.events("backend.spawn")] == [True, False]
    d.presets = {"v": {**d.presets["v"], "binary": accepting}}
    d.write()
    status, plan = d.request("POST", "/swapd/reload")
    assert (status, plan["restarted"]) == (200, ["v"]), plan
    wait_for(lambda: len(d.events("backend.spawn")) >= 3, timeout=30)
    wait_for(lambda: d.model("v")["state"] == "ready", timeout=30)
    third = d.events("backend.spawn")[2]
    assert third["argv"][0] == accepting
    assert FLAG in third["argv"]
    assert d.model("v")["sleep"]["note"] is None


def test_a_missing_sleep_api_fails_one_demotion_then_the_model_goes_down_to_disk(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A vLLM whose /sleep answers 404 (no dev mode, here unset by its wrapper).

    The first demotion fails (the process is ended, the model shows the error). From then
    on the launch starts without sleep mode, says why in ``sleep.note``, and a demotion
    stops it to disk instead of failing every time the same way.
    """
    no_dev_mode = _wrapper(tmp_path / "bin" / "vllm", "export VLLM_SERVER_DEV_MODE=0")
    plain = _wrapper(tmp_path / "plain" / "vllm", "")
    d = start_daemon(
        {"v": _preset(no_dev_mode, tmp_path / "m"), "w": _preset(plain, tmp_path / "n")},
        {"max_running": 1},
    )
    assert d.chat("v")[0] == 200
    assert d.chat("w")[0] == 200  # v's sleep fails: v is ended
    assert d.model("v")["state"] == "failed"
    assert "could not sleep" in d.model("v")["error"]
    [missing] = d.events("model.sleep.missing")
    assert "HTTP 404" in missing["reason"]

    assert d.chat("v")[0] == 200  # w sleeps; v starts without sleep mode
    assert "sleep API is missing" in d.model("v")["sleep"]["note"]
    assert d.model("v")["sleep"]["level"] == 0
    v_spawns = [s for s in d.events("backend.spawn") if s["model"] == "v"]
    assert [FLAG in s["argv"] for s in v_spawns] == [True, False]

    assert d.chat("w")[0] == 200  # v is demoted again: stopped this time, not failed
    wait_for(lambda: d.model("v")["state"] == "stopped")
    assert d.model("v")["tier"] == "disk"
    assert len(d.events("model.sleep.missing")) == 1
    assert d.model("w")["state"] == "ready"
