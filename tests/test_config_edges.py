"""Config edges: empty values, defaults' backend errors, presets pinned outside the daemon.

Each error names the file, line and column where the user can fix it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from swapd.config import Config, load_config, parse_listen
from swapd.errors import ConfigErrors
from swapd.presets import Preset

OK_PRESET = 'backend: command\ncmd: ["true", "${PORT}"]\n'


def _write(root: Path, config: str, presets: dict[str, str]) -> Path:
    (root / "swapd.yaml").write_text(textwrap.dedent(config))
    (root / "presets").mkdir()
    for name, text in presets.items():
        (root / "presets" / name).write_text(text)
    return Path("swapd.yaml")


def _load(root: Path, config: str, preset: str = OK_PRESET) -> Config:
    return load_config(_write(root, config, {"m.yaml": preset}))


def _load_all(root: Path, config: str, presets: dict[str, str]) -> tuple[Preset, ...]:
    return load_config(_write(root, config, presets)).presets


def _errors(root: Path, config: str, presets: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_config(_write(root, config, presets))
    return [str(e) for e in info.value.errors]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("key", ["budget", "max_running", "ram_budget", "cache_budget"])
def test_an_empty_nullable_daemon_key_is_null(tmp_path: Path, key: str) -> None:
    """``budget:`` with no value is YAML's null, as ``budget: ~`` is (was a parser error)."""
    assert getattr(_load(tmp_path, f"{key}:\n"), key) is None


@pytest.mark.parametrize("key", ["concurrency", "max_queue", "request_timeout"])
def test_an_empty_nullable_preset_key_is_null(tmp_path: Path, key: str) -> None:
    """The same for the preset keys whose default is none."""
    [preset] = _load(tmp_path, "", OK_PRESET + f"{key}:\n").presets
    assert getattr(preset, key) is None


def test_an_empty_value_gets_the_keys_own_reason(tmp_path: Path) -> None:
    """A key that takes no null says what it expects, not what the YAML parser found."""
    assert _errors(tmp_path, "", {"m.yaml": OK_PRESET + "ttl:\n"}) == [
        'presets/m.yaml:3:5: ttl: expected a duration like "10m", got "None"'
    ]


def test_a_model_missing_under_a_default_backend_names_the_preset(tmp_path: Path) -> None:
    """With ``backend`` in ``defaults:``, a missing model is reported in the preset's file."""
    got = _errors(
        tmp_path,
        "defaults:\n  backend: llama-server\n",
        {"a.yaml": "ttl: 1m\n", "b.yaml": "ttl: 2m\n"},
    )
    assert got == [
        "presets/a.yaml:1:1: model: missing; llama-server needs a model",
        "presets/b.yaml:1:1: model: missing; llama-server needs a model",
    ]


def test_a_cmd_missing_under_a_default_backend_names_the_preset(tmp_path: Path) -> None:
    """The same for a command backend's ``cmd`` (was reported at swapd.yaml's defaults)."""
    got = _errors(tmp_path, "defaults:\n  backend: command\n", {"a.yaml": "ttl: 1m\n"})
    assert got == ["presets/a.yaml:1:1: cmd: missing; a command backend needs cmd"]


@pytest.mark.parametrize(
    ("daemon", "pinned"),
    [("devices: [0, 1]", "[3]"), ("devices: cpu", "[0]")],
)
def test_a_preset_pinned_outside_the_daemons_devices_is_refused(
    tmp_path: Path, daemon: str, pinned: str
) -> None:
    """Pinned where the daemon never offers a device: refused at check, not 503 on every load."""
    [error] = _errors(tmp_path, daemon + "\n", {"m.yaml": OK_PRESET + f"devices: {pinned}\n"})
    assert error.startswith("presets/m.yaml:3:10: devices: none of ")


def test_a_preset_pinned_partly_inside_the_daemons_devices_loads(tmp_path: Path) -> None:
    """One offered device is enough: the load can be placed there."""
    [preset] = _load(tmp_path, "devices: [0, 1]\n", OK_PRESET + "devices: [1, 5]\n").presets
    assert preset.devices == (1, 5)


def test_numbers_in_text_keys_stay_as_written(tmp_path: Path) -> None:
    """``env: {PYVER: 3.10}`` is "3.10" (was "3.1"), ``0777`` is "0777" (was "511")."""
    preset = 'backend: command\ncmd: ["true", "${PORT}", 0777, 1_000, 3.10]\n'
    [loaded] = _load(tmp_path, "", preset + "env: {PYVER: 3.10, N: 010}\nconcurrency: 2\n").presets
    assert loaded.cmd == ("true", "${PORT}", "0777", "1_000", "3.10")
    assert loaded.env == {"PYVER": "3.10", "N": "010"}
    assert loaded.concurrency == 2  # a number where a number is meant


@pytest.mark.parametrize("alias", ["--trust-remote-code", "x y", "-"])
def test_an_alias_must_be_a_usable_name(tmp_path: Path, alias: str) -> None:
    """An alias goes on vLLM's command line after --served-model-name: no flag, no space."""
    got = _errors(tmp_path, "", {"m.yaml": OK_PRESET + f"aliases: [{alias!r}]\n"})
    assert got == [f"presets/m.yaml:3:11: aliases: not a usable model name: {alias!r}"]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("[::1]:8080", ("::1", 8080)),
        (":8080", ("", 8080)),
        ("10.0.0.2:80", ("10.0.0.2", 80)),
    ],
)
def test_listen_takes_ipv6_in_brackets(written: str, expected: tuple[str, int]) -> None:
    """An IPv6 address is written in brackets, as in a URL."""
    assert parse_listen(written) == expected


@pytest.mark.parametrize("port", ["\u00b2", "\u0663"])
def test_a_port_in_digits_other_than_ascii_is_refused_with_the_usual_message(port: str) -> None:
    """``²`` or an Arabic-Indic digit count as digits to Python, not to int(): the usual error."""
    with pytest.raises(ValueError, match=r'expected "host:port"'):
        parse_listen(f"127.0.0.1:{port}")


SUM = "ab" * 32


@pytest.mark.parametrize(
    ("layout", "model", "what"),
    [
        (
            ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"],
            "m-00001-of-00002.gguf",
            "the first of 2 files of a split GGUF",
        ),
        (["hf/config.json"], "hf", "a directory"),
    ],
)
def test_a_sha256_that_would_check_part_of_the_model_is_refused(
    tmp_path: Path, layout: list[str], model: str, what: str
) -> None:
    """One digest checks one file: on a split GGUF or a folder it would vouch for a part."""
    for rel in layout:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"GGUF")
    preset = f"backend: vllm\nmodel: {tmp_path / model}\nsha256: {SUM}\n"
    assert _errors(tmp_path, "", {"m.yaml": preset}) == [
        (
            f"presets/m.yaml:3:9: sha256: is checked for a single file, and {tmp_path / model} "
            f"is {what}; remove it"
        )
    ]


def test_a_sha256_of_a_single_file_is_taken(tmp_path: Path) -> None:
    """The plain case still loads."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    preset = f"backend: llama-server\nmodel: {tmp_path / 'm.gguf'}\nsha256: {SUM}\n"
    [loaded] = _load(tmp_path, "", preset).presets
    assert loaded.sha256 == SUM


@pytest.mark.parametrize("name", ["org/../m", "org/./m", "org//m", "org/m/"])
def test_a_name_a_url_would_resolve_to_another_is_refused(tmp_path: Path, name: str) -> None:
    """Clients fold ``.``, ``..`` and empty parts of a URL's path: /v1/models/org/../m is m."""
    preset = f'backend: command\ncmd: ["true", "${{PORT}}"]\nname: "{name}"\n'
    assert _errors(tmp_path, "", {"m.yaml": preset}) == [
        f"presets/m.yaml:3:7: name: not a usable model name: {name!r}"
    ]


def test_a_sha256_in_a_block_scalar_is_its_64_digits(tmp_path: Path) -> None:
    """``sha256: |`` keeps a final newline; the digest is the digits, not the newline."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    preset = f"backend: llama-server\nmodel: {tmp_path / 'm.gguf'}\nsha256: |\n  {SUM.upper()}\n"
    [loaded] = _load(tmp_path, "", preset).presets
    assert loaded.sha256 == SUM


def test_a_split_gguf_missing_a_shard_is_a_config_error(tmp_path: Path) -> None:
    """Every shard must be there when the config is read, as the first file must."""
    first = tmp_path / "m-00001-of-00003.gguf"
    first.write_bytes(b"GGUF")
    (tmp_path / "m-00003-of-00003.gguf").write_bytes(b"GGUF")
    preset = f"backend: llama-server\nmodel: {first}\n"
    assert _errors(tmp_path, "", {"m.yaml": preset}) == [
        (
            f"presets/m.yaml:2:8: model: a split GGUF of 3 files lacks m-00002-of-00003.gguf "
            f"beside {first}"
        )
    ]


def test_defaults_hold_any_preset_key(tmp_path: Path) -> None:
    """``model`` and ``cmd`` too (a shared model, relative to swapd.yaml; a shared command)."""
    (tmp_path / "shared.gguf").write_bytes(b"GGUF")
    config = (
        "defaults:\n  backend: command\n  model: shared.gguf\n"
        '  cmd: ["srv", "${MODEL}", "${PORT}"]\n'
    )
    presets = _load_all(tmp_path, config, {"a.yaml": "ttl: 1m\n", "b.yaml": "ttl: 2m\n"})
    assert [(p.name, p.model, p.cmd[0]) for p in presets] == [
        ("a", tmp_path / "shared.gguf", "srv"),
        ("b", tmp_path / "shared.gguf", "srv"),
    ]


def test_a_name_in_defaults_is_every_presets_and_so_a_clash(tmp_path: Path) -> None:
    """A shared ``name`` is taken, and two presets with it are the usual duplicate error."""
    got = _errors(tmp_path, "defaults:\n  name: same\n", {"a.yaml": OK_PRESET, "b.yaml": OK_PRESET})
    assert len(got) == 1
    assert "same" in got[0]
