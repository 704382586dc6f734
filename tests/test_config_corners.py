"""Config corners: dead allowed_hosts and cors_origins entries, defaults' errors, and more.

Also the litellm-config file's mode and the scale-out docs against the generator. Each
test was written against a way the code departed from the README.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_config_edges import _errors

from swapd.auth import HostGuard, parse_allowed_hosts, parse_origins
from swapd.litellm_config import Node, build_config, write_if_changed

ROOT = Path(__file__).resolve().parent.parent
OK_PRESET = 'backend: command\ncmd: ["true", "${PORT}"]\n'


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("entry", ["192.168.1.10:8080", "10.0.0.5:80", "cafe.be:8080"])
def test_an_allowed_host_with_a_port_is_refused_like_any_other(entry: str) -> None:
    """An address or hex-letter name with a port was taken as an IPv6 literal.

    The Host check strips the port before comparing, so the entry never matched: the
    config loaded and requests got 421.
    """
    guard = HostGuard("127.0.0.1", (entry,))
    assert not guard.allows(entry)  # the entry is dead: it can never admit anything
    with pytest.raises(ValueError, match="without scheme or port"):
        parse_allowed_hosts([entry])


def test_ip_literals_are_still_taken() -> None:
    """IPv4 and IPv6 addresses without a port stay valid entries."""
    assert parse_allowed_hosts(["10.0.0.5", "::1", "fd00::5"]) == ("10.0.0.5", "::1", "fd00::5")


def test_an_allowed_host_with_a_port_is_a_config_error(tmp_path: Path) -> None:
    """The same through the loader: one error, with file, line and column."""
    got = _errors(tmp_path, 'allowed_hosts: ["192.168.1.10:8080"]\n', {"m.yaml": OK_PRESET})
    assert len(got) == 1
    assert got[0].startswith("swapd.yaml:1:16: allowed_hosts: expected a host name")


@pytest.mark.parametrize("entry", ["http://chat.example.com:99999", "https://chat.example.com:0"])
def test_an_origin_with_an_impossible_port_is_refused(entry: str) -> None:
    """Any 1-5 digits were a port: 0 and 65536-99999 are none, so no Origin ever matched."""
    with pytest.raises(ValueError, match="expected an origin"):
        parse_origins([entry])


def test_an_invalid_default_backend_is_one_error_not_one_per_preset(tmp_path: Path) -> None:
    """Each preset that took the invalid default also said ``backend: missing`` at its 1:1."""
    got = _errors(
        tmp_path,
        "defaults:\n  backend: ollama\n",
        {"a.yaml": 'cmd: ["x", "${PORT}"]\n', "b.yaml": 'cmd: ["y", "${PORT}"]\n'},
    )
    assert got == [
        "swapd.yaml:2:12: backend: expected one of llama-server, vllm, command, got 'ollama'"
    ]


def test_a_default_key_error_is_reported_once(tmp_path: Path) -> None:
    """A problem in ``defaults:`` was printed once per preset, each at the same place."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    preset = f"backend: llama-server\nmodel: {model}\n"
    got = _errors(
        tmp_path,
        'defaults:\n  args: ["--api-key", "x"]\n',
        {"a.yaml": preset, "b.yaml": preset, "c.yaml": preset},
    )
    assert len(got) == 1, got


def test_litellm_config_output_keeps_the_files_permissions(tmp_path: Path) -> None:
    """``-o FILE`` made a 0600 file (it may hold literal node keys) 0644 at each rewrite."""
    out = tmp_path / "config.yaml"
    out.write_text("old\n")
    out.chmod(0o600)
    old_umask = os.umask(0o022)
    try:
        config = build_config([(Node("http://gpu1:8080", "sk-literal-secret"), [{"id": "q"}])])
        assert write_if_changed(out, str(config)) is True
    finally:
        os.umask(old_umask)
    assert "sk-literal-secret" in out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left


def test_scale_out_docs_agree_on_aliases_with_the_generator() -> None:
    """The docs said both that aliases are model names of their own and not exported."""
    config = build_config([(Node("http://gpu1:8080"), [{"id": "qwen", "aliases": ["q"]}])])
    assert "q" in {d["model_name"] for d in config["model_list"]}  # aliases are exported
    docs = (ROOT / "docs" / "scale-out.md").read_text()
    assert "Aliases are not exported" not in docs
