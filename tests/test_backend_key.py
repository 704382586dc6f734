"""A backend's own key: swapd gives each llama-server start a secret and sends it itself."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import psutil
import pytest
from conftest import StartDaemon

from swapd.backends import Placement, build_launch
from swapd.errors import ConfigErrors
from swapd.presets import Preset, load_presets

CLIENT_KEY = "client-key-0123456789abcdef"


def llama_preset(tmp_path: Path) -> Preset:
    """A llama-server preset whose binary is a stand-in (argv is all these tests read)."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    return Preset(name="m", file="m.yaml", backend="llama-server", model=model, binary="/bin/true")


def test_each_llama_start_gets_a_new_secret_in_its_environment(tmp_path: Path) -> None:
    """The key is in the child's environment (private), never its argv (public), and in headers."""
    first = build_launch(llama_preset(tmp_path), 8001)
    second = build_launch(llama_preset(tmp_path), 8002)
    secret = first.env["LLAMA_API_KEY"]
    assert len(secret) >= 32
    assert secret != second.env["LLAMA_API_KEY"]
    assert first.headers == ((b"Authorization", f"Bearer {secret}".encode()),)
    assert not any(secret in arg or "api-key" in arg for arg in first.argv)


def test_a_command_backend_gets_no_key() -> None:
    """swapd cannot know how an arbitrary server takes a key, so it sends none."""
    preset = Preset(name="c", file="c.yaml", backend="command", cmd=("/bin/true",))
    assert build_launch(preset, 8003).headers == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('args: ["--api-key", "mine"]\n', "args: --api-key is swapd's to set"),
        ('args: ["--api-key-file=/k"]\n', "args: --api-key-file is swapd's to set"),
        ("env: {LLAMA_API_KEY: mine}\n", "env: LLAMA_API_KEY is swapd's to set"),
    ],
)
def test_a_preset_may_not_set_the_backend_key(tmp_path: Path, text: str, expected: str) -> None:
    """Setting llama-server's own key in a preset is an error that names the key."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "m.yaml").write_text(f"backend: llama-server\nmodel: m.gguf\n{text}")
    with pytest.raises(ConfigErrors) as info:
        load_presets(tmp_path, {})
    assert expected in str(info.value)


@pytest.mark.llama
def test_the_backend_refuses_callers_without_swapds_key(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """A real llama-server answers swapd but 401s a local user who calls its port directly."""
    preset = {"backend": "llama-server", "model": str(tiny_gguf), "args": ["-c", "256"]}
    d = start_daemon({"tiny": preset}, {"admin_keys": [CLIENT_KEY]})
    key = {"Authorization": f"Bearer {CLIENT_KEY}"}
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 2}
    status, answer = d.request("POST", "/v1/completions", body, headers=key)
    assert status == 200, answer
    model = d.model("tiny", headers=key)
    conn = http.client.HTTPConnection("127.0.0.1", model["port"], timeout=30)
    try:
        for headers in ({}, key):
            conn.request("POST", "/v1/completions", json.dumps(body), headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 401
        conn.request("GET", "/health")
        health = conn.getresponse()
        health.read()
        assert health.status == 200  # readiness needs no key
    finally:
        conn.close()
    backend = psutil.Process(model["pid"])
    secret = backend.environ()["LLAMA_API_KEY"]  # readable by its owner only
    assert secret not in " ".join(backend.cmdline())
    assert secret not in d.log_path.read_text()
    assert CLIENT_KEY not in d.log_path.read_text()


@pytest.mark.parametrize("written", ["--api_key", "--api-ke", "--api_ke=mine"])
def test_vllm_spellings_of_its_key_flag_are_refused_too(tmp_path: Path, written: str) -> None:
    """vLLM's argparse reads ``--api_key`` and the cut ``--api-ke`` as ``--api-key``."""
    (tmp_path / "m").mkdir()
    args = json.dumps([written] if "=" in written else [written, "mine"])
    (tmp_path / "m.yaml").write_text(f"backend: vllm\nmodel: m\nargs: {args}\n")
    with pytest.raises(ConfigErrors) as info:
        load_presets(tmp_path, {})
    shown = written.split("=", 1)[0]
    assert f"args: {shown} (read as --api-key) is swapd's to set" in str(info.value)


def test_a_llama_flag_is_matched_as_written(tmp_path: Path) -> None:
    """llama-server's own parser takes no cut names: ``--api-ke`` is not its key flag."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "m.yaml").write_text('backend: llama-server\nmodel: m.gguf\nargs: ["--api-ke"]\n')
    assert [p.name for p in load_presets(tmp_path, {})] == ["m"]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--gpu_memory_utilization", "0.5"], "--gpu-memory-utilization"),
        (["--gpu-memory-util=0.5"], "--gpu-memory-utilization"),
        (["--served_model_name", "x"], "--served-model-name"),
        (["--enable_sleep_mode"], "--enable-sleep-mode"),
    ],
)
def test_vllm_keeps_a_flag_the_preset_set_in_another_spelling(
    tmp_path: Path, args: list[str], flag: str
) -> None:
    """swapd adds its own value only when vLLM would not read the preset's as the same flag."""
    model = tmp_path / "hf"
    model.mkdir()
    preset = Preset(
        name="v", file="v.yaml", backend="vllm", model=model, binary="/bin/true", args=tuple(args)
    )
    placement = Placement(gpu_fraction=0.25, sleep_level=1, sleep_flag=True)
    argv = build_launch(preset, 8004, placement).argv
    assert flag not in argv
    assert argv.count(args[0]) == 1
