"""Config and preset loading: every mistake is reported as file:line:column: key: reason."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from swapd.config import Config, load_config
from swapd.errors import ConfigErrors
from swapd.presets import CONVERTERS
from swapd.probe import DEVICE_VARIABLES
from swapd.probe._amdsmi import amd_env
from swapd.probe._nvml import nvidia_env

PRESET_KEYS = ", ".join(sorted(CONVERTERS))
DEFAULT_KEYS = ", ".join(sorted(CONVERTERS))
BACKENDS = "llama-server, vllm, command"
# Expectations ending in this are compared as prefixes (messages that list every known key).
PREFIX = "..."
# Replaced by the real directory, for messages that name a resolved absolute path.
ROOT = "{root}"
OK_PRESET = 'backend: command\ncmd: ["true", "${PORT}"]\n'


def write_tree(root: Path, config: str, presets: Mapping[str, str] | None) -> Path:
    """Write swapd.yaml and presets/<file> under ``root``; ``None`` leaves out presets/.

    Returns the config path relative to ``root``, as a user in that directory would type it.
    """
    (root / "swapd.yaml").write_text(textwrap.dedent(config), encoding="utf-8")
    if presets is not None:
        (root / "presets").mkdir()
        for name, text in presets.items():
            (root / "presets" / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return Path("swapd.yaml")


def load(root: Path, config: str, presets: Mapping[str, str] | None) -> Config:
    """Write a tree under ``root`` (the working directory) and load it as the user would."""
    return load_config(write_tree(root, config, presets))


def error_lines(root: Path, config: str, presets: Mapping[str, str] | None) -> list[str]:
    """The str() of each ConfigError that loading the tree reports."""
    with pytest.raises(ConfigErrors) as info:
        load(root, config, presets)
    return [str(e) for e in info.value.errors]


def comparable(got: list[str], want: list[str]) -> list[str]:
    """``got`` cut to the expected prefixes, so a list comparison shows the whole difference."""
    out = []
    for index, line in enumerate(got):
        expected = want[index] if index < len(want) else ""
        if expected.endswith(PREFIX) and line.startswith(expected.removesuffix(PREFIX)):
            out.append(expected)
        else:
            out.append(line)
    return out


def expand(expected: list[str], root: Path) -> list[str]:
    """Expected lines with ROOT replaced by the resolved test directory."""
    return [line.replace(ROOT, str(root.resolve())) for line in expected]


def _alias_bomb(levels: int) -> str:
    """A YAML value of a few hundred bytes that stands for 10 ** levels strings."""
    parts = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


PRESET_ERRORS = [
    pytest.param(
        {
            "qwen.yaml": """\
            backend: command
            cmd: ["true", "${PORT}"]
            aliases: [q]
            health: /health
            pin: false
            preload: false
            ttl: ten
            """
        },
        ['presets/qwen.yaml:7:6: ttl: expected a duration like "10m", got "ten"'],
        id="bad-ttl",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "colour: blue\n"},
        [f"presets/m.yaml:3:1: colour: unknown key; known keys: {PRESET_KEYS}"],
        id="unknown-key-lists-known-keys",
    ),
    pytest.param(
        {"m.yaml": "backend: ollama\n"},
        [f"presets/m.yaml:1:10: backend: expected one of {BACKENDS}, got 'ollama'"],
        id="bad-backend",
    ),
    pytest.param(
        {"m.yaml": 'cmd: ["true", "${PORT}"]\n'},
        [f"presets/m.yaml:1:1: backend: missing; one of {BACKENDS}"],
        id="missing-backend",
    ),
    pytest.param(
        {"m.yaml": ""},
        [f"presets/m.yaml:1:1: backend: missing; one of {BACKENDS}"],
        id="empty-file-missing-backend",
    ),
    pytest.param(
        {"m.yaml": "backend: llama-server\nargs: [--ctx-size, '4096']\n"},
        ["presets/m.yaml:1:10: model: missing; llama-server needs a model"],
        id="llama-server-without-model",
    ),
    pytest.param(
        {"m.yaml": "backend: vllm\n"},
        ["presets/m.yaml:1:10: model: missing; vllm needs a model"],
        id="vllm-without-model",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "binary: /usr/bin/server\n"},
        [
            (
                "presets/m.yaml:3:1: binary: a command backend never reads it: cmd is run as "
                "written; put the program first in cmd"
            )
        ],
        id="binary-on-a-command-backend",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "args: [--threads, '4']\n"},
        [
            (
                "presets/m.yaml:3:1: args: a command backend never reads it: cmd is run as "
                "written; put the arguments in cmd"
            )
        ],
        id="args-on-a-command-backend",
    ),
    pytest.param(
        {"m.yaml": "backend: vllm\nmodel: .\ncmd: [vllm, serve]\n"},
        [
            (
                "presets/m.yaml:3:1: cmd: a vllm backend never reads it: only a command "
                "backend runs cmd; vLLM's own options go in args"
            )
        ],
        id="cmd-on-a-vllm-backend",
    ),
    pytest.param(
        {"m.yaml": "backend: llama-server\nmodel: missing.gguf\n"},
        [f"presets/m.yaml:2:8: model: not found: {ROOT}/presets/missing.gguf"],
        id="model-file-not-found",
    ),
    pytest.param(
        {"m.yaml": "backend: command\nargs: [--port, '9000']\n"},
        [
            "presets/m.yaml:1:10: cmd: missing; a command backend needs cmd",
            (
                "presets/m.yaml:2:1: args: a command backend never reads it: cmd is run as "
                "written; put the arguments in cmd"
            ),
        ],
        id="command-without-cmd",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "args: --verbose\n"},
        ["presets/m.yaml:3:7: args: expected a list of strings, got str"],
        id="args-not-a-list",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "args: 5\naliases: 2.5\nenv: 4\n"},
        [
            "presets/m.yaml:3:7: args: expected a list of strings, got int",
            "presets/m.yaml:4:10: aliases: expected a list of strings, got float",
            "presets/m.yaml:5:6: env: expected a mapping of NAME: value, got int",
        ],
        id="list-and-mapping-keys-given-a-number",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "args: [--ctx, [1, 2]]\n"},
        ["presets/m.yaml:3:15: args: expected a non-empty string, got [1, 2]"],
        id="args-item-not-a-string",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "env: [A=1]\n"},
        ["presets/m.yaml:3:6: env: expected a mapping of NAME: value, got list"],
        id="env-not-a-mapping",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "health: health\n"},
        ['presets/m.yaml:3:9: health: expected a URL path starting with "/" or none, got "health"'],
        id="health-without-leading-slash",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "start_timeout: 0\n"},
        ["presets/m.yaml:3:16: start_timeout: expected a duration above zero, like 10s, got 0"],
        id="start-timeout-zero",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "stop_timeout: 0s\n"},
        ["presets/m.yaml:3:15: stop_timeout: expected a duration above zero, like 10s, got '0s'"],
        id="stop-timeout-zero-with-unit",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "memory: lots\n"},
        ['presets/m.yaml:3:9: memory: expected a size like "6GiB", got "lots"'],
        id="memory-lots",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + 'pin: "yes"\n'},
        [
            (
                "presets/m.yaml:3:6: pin: expected true or false, got 'yes' (a quoted string: "
                "write it without quotes)"
            )
        ],
        id="pin-quoted-yes",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "devices: [-1]\n"},
        [
            (
                "presets/m.yaml:3:10: devices: expected a device index or a list of them, "
                "like [0, 1], got [-1]"
            ),
        ],
        id="devices-negative",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "devices: []\n"},
        [
            (
                "presets/m.yaml:3:10: devices: expected a device index or a list of them, "
                "like [0, 1], got []"
            ),
        ],
        id="devices-empty",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "name: my model\n"},
        ["presets/m.yaml:3:7: name: not a usable model name: 'my model'"],
        id="name-with-space",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "ttl: 5m\nttl: 10m\n"},
        ["presets/m.yaml:4:1: ttl: key is given twice"],
        id="duplicate-key",
    ),
    pytest.param(
        {"m.yaml": "backend: command\n  cmd: x\n"},
        ["presets/m.yaml:2:6: (yaml): mapping values are not allowed here"],
        id="yaml-syntax-error",
    ),
    pytest.param(
        {"m.yaml": "- backend: command\n- cmd: [x]\n"},
        ["presets/m.yaml:1:1: (top level): expected a mapping of keys"],
        id="top-level-list",
    ),
    pytest.param(
        {"a.yaml": OK_PRESET + "name: qwen\n", "b.yaml": OK_PRESET + "name: qwen\n"},
        ["presets/b.yaml:3:7: name: 'qwen' is already used by presets/a.yaml"],
        id="two-presets-same-name",
    ),
    pytest.param(
        {"qwen.yaml": OK_PRESET, "qwen.yml": OK_PRESET},
        ["presets/qwen.yml:1:1: name: 'qwen' is already used by presets/qwen.yaml"],
        id="two-presets-same-stem",
    ),
    pytest.param(
        {"a.yaml": OK_PRESET, "b.yaml": OK_PRESET + "aliases: [fast, a]\n"},
        ["presets/b.yaml:3:17: aliases: 'a' is already used by presets/a.yaml"],
        id="alias-clashes-with-other-name",
    ),
    pytest.param(
        {"a.yaml": OK_PRESET + "aliases: [q]\n", "b.yaml": OK_PRESET + "aliases: [q]\n"},
        ["presets/b.yaml:3:11: aliases: 'q' is already used by presets/a.yaml"],
        id="alias-clashes-with-other-alias",
    ),
    pytest.param(
        {"a.yaml": OK_PRESET, "b.yaml": OK_PRESET + "aliases:\n  - fast\n  - a\n"},
        ["presets/b.yaml:5:5: aliases: 'a' is already used by presets/a.yaml"],
        id="alias-clash-points-at-its-item-in-a-block-list",
    ),
    pytest.param(
        {
            "m.yaml": """\
            backend: command
            ttl: ten
            cmd: ["true", "${PORT}"]
            memory: lots
            colour: blue
            pin: 1
            """
        },
        [
            'presets/m.yaml:2:6: ttl: expected a duration like "10m", got "ten"',
            'presets/m.yaml:4:9: memory: expected a size like "6GiB", got "lots"',
            f"presets/m.yaml:5:1: colour: unknown key; known keys: {PRESET_KEYS}",
            "presets/m.yaml:6:6: pin: expected true or false, got 1",
        ],
        id="several-errors-in-one-file",
    ),
    pytest.param(
        {
            "a.yaml": OK_PRESET + "ttl: ten\n",
            "b.yaml": "backend: ollama\n",
            "c.yaml": OK_PRESET,
        },
        [
            'presets/a.yaml:3:6: ttl: expected a duration like "10m", got "ten"',
            f"presets/b.yaml:1:10: backend: expected one of {BACKENDS}, got 'ollama'",
        ],
        id="errors-in-two-files",
    ),
    pytest.param(
        {"m.yaml": 'backend: command\ncmd: [server, --port, "8999"]\n'},
        [
            (
                "presets/m.yaml:2:6: cmd: no argument holds ${PORT}, the port swapd picks at "
                "each start (--port ${PORT})"
            )
        ],
        id="command-without-its-port",
    ),
    pytest.param(
        {"m.yaml": "backend: command\ncmd: []\n"},
        [
            (
                "presets/m.yaml:2:6: cmd: no argument holds ${PORT}, the port swapd picks at "
                "each start (--port ${PORT})"
            )
        ],
        id="command-with-an-empty-cmd",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + 'env: {"A=B": x}\n'},
        ["presets/m.yaml:3:7: env: not a usable variable name: 'A=B'"],
        id="env-name-with-equals",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + 'args: ["a\\0b"]\n'},
        ["presets/m.yaml:3:8: args: a NUL character in 'a\\x00b'"],
        id="nul-in-an-argument",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + f"ttl: {'9' * 400}s\n"},
        [
            (
                "presets/m.yaml:3:6: ttl: expected a duration from 0 to 100 years, got "
                f'"{"9" * 40}... (401 characters)"'
            )
        ],
        id="duration-too-long-for-a-float",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + f"ttl: {_alias_bomb(8)}\n"},
        ["presets/m.yaml:3:6: ttl: stands for more than 100,000 values once its aliases are ..."],
        id="aliases-that-expand-a-hundred-million-fold",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + "env:\n  A: 1\n  A: 2\n"},
        ["presets/m.yaml:5:3: A: key is given twice"],
        id="duplicate-key-below-the-top",
    ),
    pytest.param(
        {
            "m.yaml": "backend: llama-server\nmodel: m.gguf\nhealth: none\n",
            "c.yaml": OK_PRESET + "health: ready\n",
        },
        [
            (
                'presets/c.yaml:3:9: health: expected a URL path starting with "/" or none, '
                'got "ready"'
            ),
            f"presets/m.yaml:2:8: model: not found: {ROOT}/presets/m.gguf",
            (
                "presets/m.yaml:3:9: health: llama-server answers /health once it has loaded; "
                "none is for command backends"
            ),
        ],
        id="health-none-for-engines-only",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + 'unlisted: "yes"\nmetadata: [a]\n'},
        [
            (
                "presets/m.yaml:3:11: unlisted: expected true or false, got 'yes' (a quoted "
                "string: write it without quotes)"
            ),
            "presets/m.yaml:4:11: metadata: expected a mapping, got list",
        ],
        id="model-list-keys",
    ),
    pytest.param(
        {"m.yaml": OK_PRESET + 'name: "evil\\n"\n'},
        ["presets/m.yaml:3:7: name: not a usable model name: 'evil\\n'"],
        id="name-ending-in-a-newline",
    ),
]


@pytest.mark.parametrize(("presets", "expected"), PRESET_ERRORS)
def test_preset_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    presets: dict[str, str],
    expected: list[str],
) -> None:
    """Each bad preset is reported with file:line:column: key: reason, every one of them."""
    monkeypatch.chdir(tmp_path)
    want = expand(expected, tmp_path)
    assert comparable(error_lines(tmp_path, "", presets), want) == want


def test_errors_name_the_whole_path_when_swapd_runs_from_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A system unit's working folder is /: a relative name would only drop the slash."""
    config = tmp_path / write_tree(tmp_path, "", {"m.yaml": OK_PRESET + "ttl: ten\n"})
    monkeypatch.chdir("/")
    with pytest.raises(ConfigErrors) as info:
        load_config(config)
    [line] = [str(e) for e in info.value.errors]
    assert line.startswith(f"{tmp_path.resolve() / 'presets' / 'm.yaml'}:3:6: ttl: ")


def test_presets_beside_the_config_leave_the_config_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``presets: .`` reads the other YAML files there, not swapd.yaml as a preset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.yaml").write_text(OK_PRESET)
    (tmp_path / "swapd.yaml").write_text("presets: .\n")
    config = load_config(tmp_path / "swapd.yaml")
    assert [p.name for p in config.presets] == ["m"]


def test_a_preset_that_is_not_a_regular_file_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO named *.yaml would block a check or a reload forever on its open."""
    monkeypatch.chdir(tmp_path)
    config = write_tree(tmp_path, "", {"m.yaml": OK_PRESET})
    os.mkfifo(tmp_path / "presets" / "pipe.yaml")
    with pytest.raises(ConfigErrors) as info:
        load_config(config)
    assert [str(e) for e in info.value.errors] == [
        "presets/pipe.yaml:1:1: (file): not a regular file (a FIFO, a device or a folder)"
    ]


DAEMON_ERRORS = [
    pytest.param(
        "listen: 127.0.0.1:8080\nport: 8080\n",
        {},
        ["swapd.yaml:2:1: port: unknown key; known keys: admin_keys, admin_keys_file" + PREFIX],
        id="unknown-key",
    ),
    pytest.param(
        "listen: localhost\n",
        {},
        [
            (
                'swapd.yaml:1:9: listen: expected "host:port" like "127.0.0.1:8080" or '
                '"[::1]:8080", got "localhost"'
            )
        ],
        id="listen-without-port",
    ),
    pytest.param(
        "listen: 127.0.0.1:70000\n",
        {},
        [
            (
                'swapd.yaml:1:9: listen: expected "host:port" like "127.0.0.1:8080" or '
                '"[::1]:8080", got "127.0.0.1:70000"'
            ),
        ],
        id="listen-port-out-of-range",
    ),
    pytest.param(
        'listen: "::1"\n',
        {},
        [
            (
                'swapd.yaml:1:9: listen: expected "host:port" like "127.0.0.1:8080" or '
                '"[::1]:8080", got "::1"'
            )
        ],
        id="listen-ipv6-without-brackets",
    ),
    pytest.param(
        "max_running: 0\n",
        {},
        ["swapd.yaml:1:14: max_running: expected a whole number of 1 or more (or null), got 0"],
        id="max-running-zero",
    ),
    pytest.param(
        "devices: gpu\n",
        {},
        [
            (
                "swapd.yaml:1:10: devices: expected auto, cpu or a list of device indices "
                "like [0, 1], got 'gpu'"
            ),
        ],
        id="devices-gpu",
    ),
    pytest.param(
        "log_level: loud\n",
        {},
        ["swapd.yaml:1:12: log_level: expected one of debug, info, warning, error, got 'loud'"],
        id="bad-log-level",
    ),
    pytest.param(
        "reserve: lots\nqueue_timeout: forever\n",
        {},
        [
            'swapd.yaml:1:10: reserve: expected a size like "6GiB", got "lots"',
            'swapd.yaml:2:16: queue_timeout: expected a duration like "10m", got "forever"',
        ],
        id="several-daemon-errors",
    ),
    pytest.param(
        "listen: :8080\npresets: nowhere\n",
        {},
        ["swapd.yaml:2:10: presets: not a directory: nowhere"],
        id="presets-dir-named-but-missing",
    ),
    pytest.param(
        "listen: :8080\n",
        None,
        ["swapd.yaml:1:1: presets: not a directory: presets"],
        id="default-presets-dir-missing",
    ),
    pytest.param(
        """\
        listen: 127.0.0.1:8080
        defaults:
          ttl: 10m
          memory: lots
        """,
        {"m.yaml": OK_PRESET},
        ['swapd.yaml:4:11: memory: expected a size like "6GiB", got "lots"'],
        id="bad-value-inside-defaults",
    ),
    pytest.param(
        "defaults:\n  colour: blue\n",
        {"m.yaml": OK_PRESET},
        [f"swapd.yaml:2:3: colour: unknown key; known keys: {DEFAULT_KEYS}"],
        id="unknown-key-inside-defaults",
    ),
    pytest.param(
        "defaults: 5m\n",
        {"m.yaml": OK_PRESET},
        ["swapd.yaml:1:11: defaults: expected a mapping of keys"],
        id="defaults-not-a-mapping",
    ),
    pytest.param(
        "defaults:\n  ttl: 5m\n  ttl: 6m\n",
        {"m.yaml": OK_PRESET},
        ["swapd.yaml:3:3: ttl: key is given twice"],
        id="duplicate-key-inside-defaults",
    ),
    pytest.param(
        "state_dir: ~\n",
        {"m.yaml": OK_PRESET},
        [
            (
                "swapd.yaml:1:12: state_dir: expected a path, got null (in YAML, ~ alone is "
                "null: write ~/ or the full path)"
            )
        ],
        id="state-dir-tilde-is-null",
    ),
    pytest.param(
        f"max_body: {'9' * 400}GiB\n",
        {"m.yaml": OK_PRESET},
        [
            (
                "swapd.yaml:1:11: max_body: expected a size from 0 to 8 EiB, got "
                f'"{"9" * 40}... (403 characters)"'
            )
        ],
        id="size-too-large-for-a-float",
    ),
    pytest.param(
        "max_running: 0\n",
        {"m.yaml": OK_PRESET + "ttl: ten\n"},
        [
            "swapd.yaml:1:14: max_running: expected a whole number of 1 or more (or null), got 0",
            'presets/m.yaml:3:6: ttl: expected a duration like "10m", got "ten"',
        ],
        id="daemon-and-preset-errors-together",
    ),
    pytest.param(
        "defaults:\n  aliases: [shared]\n",
        {"a.yaml": OK_PRESET, "b.yaml": OK_PRESET},
        ["swapd.yaml:2:12: aliases: 'shared' is already used by presets/a.yaml"],
        id="an-alias-in-defaults-clashes-where-defaults-set-it",
    ),
]


@pytest.mark.parametrize(("config", "presets", "expected"), DAEMON_ERRORS)
def test_daemon_config_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: str,
    presets: dict[str, str] | None,
    expected: list[str],
) -> None:
    """Each bad daemon setting is reported with its location, alongside any preset errors."""
    monkeypatch.chdir(tmp_path)
    want = expand(expected, tmp_path)
    assert comparable(error_lines(tmp_path, config, presets), want) == want


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(
            "listen: :8080\n  log_level: info\n",
            "swapd.yaml:2:12: (yaml): mapping values are not allowed here",
            id="yaml-syntax-error",
        ),
        pytest.param(
            "listen: :8080\nlisten: :9090\n",
            "swapd.yaml:2:1: listen: key is given twice",
            id="duplicate-key",
        ),
        pytest.param(
            "- listen: :8080\n",
            "swapd.yaml:1:1: (top level): expected a mapping of keys",
            id="top-level-list",
        ),
        pytest.param(
            'listen: ":8080"\nmax_body: 10MiB\nlog_level: "in\x07fo"\n',
            "swapd.yaml:3:15: (yaml): unacceptable character #x0007: special characters are not"
            " allowed",
            id="a-character-yaml-does-not-allow-at-its-place",
        ),
    ],
)
def test_daemon_file_problems_are_config_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, expected: str
) -> None:
    """A daemon file that cannot be parsed raises ConfigErrors too, as load_config promises."""
    monkeypatch.chdir(tmp_path)
    assert error_lines(tmp_path, config, {"m.yaml": OK_PRESET}) == [expected]


def test_defaults_may_hold_keys_some_backends_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``args`` in defaults is for the llama-servers; a command preset beside them still loads."""
    monkeypatch.chdir(tmp_path)
    config = load(
        tmp_path,
        "defaults:\n  args: [--threads, '4']\n",
        {"plain.yaml": OK_PRESET},
    )
    assert [p.name for p in config.presets] == ["plain"]


def test_an_empty_key_a_backend_never_reads_asks_for_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``args: []`` on a command preset (a template's leftover) is not refused: nothing is lost."""
    monkeypatch.chdir(tmp_path)
    config = load(tmp_path, "", {"plain.yaml": OK_PRESET + "args: []\n"})
    assert [p.name for p in config.presets] == ["plain"]


def test_defaults_apply_and_presets_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key in ``defaults:`` fills every preset that leaves it out; a preset's own value wins."""
    monkeypatch.chdir(tmp_path)
    config = load(
        tmp_path,
        """\
        defaults:
          backend: command
          ttl: 10m
          memory: 2GiB
        """,
        {
            "plain.yaml": 'cmd: ["true", "${PORT}"]\n',
            "own.yaml": 'cmd: ["true", "${PORT}"]\nttl: 1m\npin: true\n',
        },
    )
    plain, own = config.preset("plain"), config.preset("own")
    assert plain is not None
    assert own is not None
    assert (plain.backend, plain.ttl, plain.memory, plain.pin) == (
        "command",
        600.0,
        2 * 1024**3,
        False,
    )
    assert (own.backend, own.ttl, own.memory, own.pin) == ("command", 60.0, 2 * 1024**3, True)


def test_names_come_from_file_stem_or_name_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preset is named after its file unless it says ``name:``; both are labelled by file."""
    monkeypatch.chdir(tmp_path)
    config = load(
        tmp_path,
        "",
        {"qwen2.5-7b.yaml": OK_PRESET, "other.yml": OK_PRESET + "name: gemma:2b\n"},
    )
    assert [(p.name, p.file) for p in config.presets] == [
        ("gemma:2b", "presets/other.yml"),
        ("qwen2.5-7b", "presets/qwen2.5-7b.yaml"),
    ]
    assert config.preset("other") is None


def test_relative_model_path_resolves_against_preset_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model:`` relative paths are relative to the preset file, not the working directory."""
    site = tmp_path / "site"
    (site / "presets").mkdir(parents=True)
    (site / "models").mkdir()
    (site / "models" / "tiny.gguf").write_bytes(b"GGUF")
    (site / "presets" / "tiny.yaml").write_text(
        "backend: llama-server\nmodel: ../models/tiny.gguf\n", encoding="utf-8"
    )
    (site / "presets" / "tool.yaml").write_text(
        'backend: command\ncmd: ["true", "${PORT}"]\nmodel: weights.bin\n', encoding="utf-8"
    )
    (site / "swapd.yaml").write_text("", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(site / "swapd.yaml")
    tiny, tool = config.preset("tiny"), config.preset("tool")
    assert tiny is not None
    assert tool is not None
    assert tiny.model == (site / "models" / "tiny.gguf").resolve()
    assert tool.model == (site / "presets" / "weights.bin").resolve()


def test_aliases_resolve_to_their_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Config.preset() finds a preset by its name or any alias, and None for anything else."""
    monkeypatch.chdir(tmp_path)
    config = load(
        tmp_path,
        "",
        {"qwen.yaml": OK_PRESET + "aliases: [q, gpt-4o]\n", "gemma.yaml": OK_PRESET},
    )
    qwen = config.preset("qwen")
    assert qwen is not None
    assert config.preset("q") is qwen
    assert config.preset("gpt-4o") is qwen
    assert config.preset("gemma") is not qwen
    assert config.preset("gemma") is not None
    assert config.preset("llama") is None


def test_daemon_settings_are_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon keys become typed settings; paths are relative to the config file's directory."""
    monkeypatch.chdir(tmp_path)
    config = load(
        tmp_path,
        """\
        listen: :9000
        state_dir: state
        max_running: 2
        devices: [0, 1]
        reserve: 1GiB
        budget: 20GiB
        queue_timeout: 30s
        log_level: debug
        """,
        {"m.yaml": OK_PRESET},
    )
    assert (config.host, config.port) == ("", 9000)  # every address
    assert config.state_dir == Path("state")
    assert config.presets_dir == Path("presets")
    assert (config.max_running, config.devices) == (2, (0, 1))
    assert (config.reserve, config.budget) == (1024**3, 20 * 1024**3)
    assert (config.queue_timeout, config.log_level) == (30.0, "debug")


def run_check(cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """``swapd check --config <config>`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "swapd", "check", "--config", str(config)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_cli_reports_every_error(tmp_path: Path) -> None:
    """``swapd check`` exits 1 and prints each error as one file:line:column line on stderr."""
    write_tree(
        tmp_path,
        "max_running: 0\n",
        {"a.yaml": OK_PRESET + "ttl: ten\n", "b.yaml": "backend: ollama\n"},
    )
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "swapd.yaml:1:14: max_running: expected a whole number of 1 or more (or null), got 0",
        'presets/a.yaml:3:6: ttl: expected a duration like "10m", got "ten"',
        f"presets/b.yaml:1:10: backend: expected one of {BACKENDS}, got 'ollama'",
    ]
    assert done.stdout == ""


def test_check_cli_accepts_good_config(tmp_path: Path) -> None:
    """``swapd check`` exits 0 and says ok, naming the presets, for a valid config."""
    write_tree(
        tmp_path,
        "listen: 127.0.0.1:8181\ndefaults:\n  ttl: 5m\n",
        {
            "tiny.yaml": "backend: llama-server\nmodel: tiny.gguf\nargs: [--ctx-size, '512']\n",
            "echo.yaml": OK_PRESET + "aliases: [e]\n",
        },
    )
    (tmp_path / "presets" / "tiny.gguf").write_bytes(b"GGUF")
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["swapd.yaml: ok, 2 preset(s): echo, tiny"]
    assert done.stderr == ""


def test_check_cli_warns_when_there_are_no_presets(tmp_path: Path) -> None:
    """``swapd check`` on an empty presets directory exits 0 but warns that every request 404s."""
    write_tree(tmp_path, "listen: 127.0.0.1:8181\n", {})
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 0
    assert "warning: swapd.yaml: no presets in" in done.stderr
    assert "every request will 404" in done.stderr


def test_check_cli_warns_about_a_binary_that_is_not_installed(tmp_path: Path) -> None:
    """A preset whose executable is missing is named in a warning that says where swapd looked."""
    write_tree(
        tmp_path,
        "listen: 127.0.0.1:8181\n",
        {
            "gone.yaml": 'backend: command\ncmd: ["no-such-backend-binary", "${PORT}"]\n',
            "bin.yaml": "backend: vllm\nmodel: m\nbinary: /nowhere/vllm\n",
            "ok.yaml": OK_PRESET,
        },
    )
    (tmp_path / "presets" / "m").mkdir()
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.splitlines()
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(
        "warning: presets/bin.yaml: bin: binary '/nowhere/vllm' not found"
    )
    assert warnings[1].startswith(
        "warning: presets/gone.yaml: gone: command 'no-such-backend-binary' not found"
    )
    assert "searched PATH=" in warnings[1]


def test_tier_keys_are_validated_with_their_location(tmp_path: Path) -> None:
    """sleep, ram_ttl, stage and sha256 are checked like every key; stage needs cache_dir."""
    write_tree(
        tmp_path,
        "ram_budget: lots\n",
        {
            "a.yaml": OK_PRESET + "sleep: 3\nram_ttl: soon\n",
            "b.yaml": OK_PRESET + "sha256: abc\nstage: yes please\n",
        },
    )
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        'swapd.yaml:1:13: ram_budget: expected a size like "6GiB", got "lots"',
        "presets/a.yaml:3:8: sleep: expected auto, 0, 1 or 2, got 3",
        'presets/a.yaml:4:10: ram_ttl: expected a duration like "10m", got "soon"',
        "presets/b.yaml:3:9: sha256: expected 64 hexadecimal digits, got 'abc'",
        "presets/b.yaml:4:8: stage: expected true or false, got 'yes please'",
    ]


def test_check_warns_that_a_sha256_without_stage_is_never_checked(tmp_path: Path) -> None:
    """sha256 is checked when staging only: without stage: true it vouched for nothing, silently."""
    digest = "ab" * 32
    write_tree(
        tmp_path,
        "listen: 127.0.0.1:8181\ncache_dir: cache\n",
        {
            "plain.yaml": OK_PRESET + f"model: m.gguf\nsha256: {digest}\n",
            "staged.yaml": OK_PRESET + f"model: m.gguf\nsha256: {digest}\nstage: true\n",
        },
    )
    (tmp_path / "presets" / "m.gguf").write_bytes(b"GGUF")
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 0, done.stderr
    unchecked = "sha256 is checked only when the model is staged (stage: true)"
    assert done.stderr.splitlines() == [
        f"warning: presets/plain.yaml: plain: {unchecked}; it is never checked here",
    ]


def test_check_warns_that_a_preset_env_naming_a_gpu_is_overridden(tmp_path: Path) -> None:
    """A preset's CUDA_VISIBLE_DEVICES is replaced by the placement's: ``swapd check`` says so."""
    write_tree(
        tmp_path,
        "listen: 127.0.0.1:8181\n",
        {
            "pinned.yaml": OK_PRESET + "env:\n  CUDA_VISIBLE_DEVICES: '1'\n  OTHER: x\n",
            # What swapd sets it to anyway (llama-swap configs often carry it): no warning.
            "ordered.yaml": OK_PRESET + "env:\n  CUDA_DEVICE_ORDER: PCI_BUS_ID\n",
        },
    )
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 0, done.stderr
    why = "env CUDA_VISIBLE_DEVICES is swapd's to set (the GPU it places the model on)"
    assert done.stderr.splitlines() == [
        f"warning: presets/pinned.yaml: pinned: {why}; pin with devices:",
    ]


@pytest.mark.parametrize(
    ("devices", "warned"), [("", True), ("devices: [0, 1]\n", True), ("devices: cpu\n", False)]
)
def test_check_warns_that_a_vllm_asking_for_several_gpus_cannot_start_on_one(
    tmp_path: Path, devices: str, *, warned: bool
) -> None:
    """swapd places a model on one GPU: ``-tp 2`` there fails at start (on a CPU it runs)."""
    model = tmp_path / "m"
    model.mkdir()
    preset = f"backend: vllm\nmodel: {model}\nbinary: /bin/true\nargs: [-tp, '2', -pp, '2']\n"
    write_tree(tmp_path, f"listen: 127.0.0.1:8181\n{devices}", {"tp.yaml": preset})
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 0, done.stderr
    why = "its args ask for 4 GPUs at once; swapd places a model on one GPU"
    expected = [f"warning: presets/tp.yaml: tp: {why}, so its start fails there"]
    assert done.stderr.splitlines() == (expected if warned else [])


def test_every_variable_a_gpu_sets_is_one_swapd_keeps_for_itself() -> None:
    """The variables the probes set for a GPU are those a preset's env cannot override."""
    set_by_gpus = {*nvidia_env(0), *amd_env(0)}
    assert set_by_gpus == DEVICE_VARIABLES


def test_check_warns_that_a_cache_budget_without_cache_dir_does_nothing(tmp_path: Path) -> None:
    """cache_budget caps the staging cache; with no cache_dir there is none, and it was silent."""
    write_tree(tmp_path, "listen: 127.0.0.1:8181\ncache_budget: 10GiB\n", {"a.yaml": OK_PRESET})
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "warning: swapd.yaml: cache_budget has no effect without cache_dir (no staging cache)",
    ]


def test_stage_needs_a_model_to_copy(tmp_path: Path) -> None:
    """A command preset with stage: true and no model: passed check, then every load was a 500.

    The load failed with a bare "AssertionError" and the model showed tier store for good.
    """
    write_tree(tmp_path, "cache_dir: cache\n", {"c.yaml": OK_PRESET + "stage: true\n"})
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "presets/c.yaml:3:8: stage: true needs model:, the file or folder to copy into the cache",
    ]


def test_a_staged_command_model_must_be_there_to_copy(tmp_path: Path) -> None:
    """A command preset's model is not checked (``${MODEL}`` may be a name), but staged it is.

    ``swapd check`` said ok, and every request then failed 500 ``stage_failed``.
    """
    staged = OK_PRESET + "model: Qwen/Qwen3-8B\nstage: true\n"
    write_tree(
        tmp_path, "cache_dir: cache\n", {"c.yaml": staged, "n.yaml": OK_PRESET + "model: x/y\n"}
    )
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 1
    missing = tmp_path.resolve() / "presets" / "Qwen" / "Qwen3-8B"
    assert done.stderr.splitlines() == [
        f"presets/c.yaml:3:8: model: not found: {missing} (stage: true copies it into the cache)",
    ]


def test_stage_in_defaults_is_for_the_presets_with_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``defaults: stage: true`` stages the llama-servers; a command preset beside them loads.

    It is not staged (it has nothing to copy), as ``args`` in defaults is not run by it:
    the whole config used to be refused, at the defaults' line, naming no preset.
    """
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    config = load(
        tmp_path,
        "cache_dir: cache\ndefaults:\n  stage: true\n",
        {"plain.yaml": OK_PRESET, "llm.yaml": f"backend: llama-server\nmodel: {model}\n"},
    )
    assert {p.name: p.stage for p in config.presets} == {"llm": True, "plain": False}


def test_stage_needs_a_cache_dir(tmp_path: Path) -> None:
    """A preset with stage: true and no cache_dir in the daemon config is an error."""
    staged = OK_PRESET + "model: m.gguf\nstage: true\n"
    write_tree(tmp_path, "listen: 127.0.0.1:8181\n", {"c.yaml": staged, "m.gguf": "GGUF"})
    done = run_check(tmp_path, Path("swapd.yaml"))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "swapd.yaml:1:1: cache_dir: missing; presets with stage: true need a cache directory: c",
    ]


def test_env_macros_take_swapds_environment_where_a_launch_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``${env.NAME}`` in model, args, cmd, binary and env values; an unset NAME is an error."""
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    (models / "qwen.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("SWAPD_T_MODELS", str(models))
    monkeypatch.setenv("SWAPD_T_CTX", "8192")
    preset = """\
        backend: llama-server
        model: ${env.SWAPD_T_MODELS}/qwen.gguf
        binary: ${env.SWAPD_T_MODELS}/bin/llama-server
        args: [-c, "${env.SWAPD_T_CTX}", --alias, "${PORT}-${env.SWAPD_T_CTX}"]
        env: {HF_HOME: "${env.SWAPD_T_MODELS}/hf", N: 1}
        """
    config = load(tmp_path, "", {"m.yaml": textwrap.dedent(preset)})
    [m] = config.presets
    assert m.model == models / "qwen.gguf"
    assert m.binary == f"{models}/bin/llama-server"
    assert m.args == ("-c", "8192", "--alias", "${PORT}-8192")
    assert dict(m.env) == {"HF_HOME": f"{models}/hf", "N": "1"}


def test_an_env_macro_naming_an_unset_variable_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where it is written, with the variable's name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWAPD_T_NOPE", raising=False)
    unset = 'backend: command\ncmd: [srv, "${PORT}", "${env.SWAPD_T_NOPE}"]\n'
    assert error_lines(tmp_path, "", {"m.yaml": unset}) == [
        "presets/m.yaml:2:23: cmd: ${env.SWAPD_T_NOPE}: swapd's environment has no SWAPD_T_NOPE"
    ]
