"""``swapd check`` and reloads report every independent problem, located, in file order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import StartDaemon
from daemon import fake_preset

# A config and presets with several independent mistakes each (what each line says is
# in EXPECTED). ``{port}``: the daemon's, where a running one reloads it.
CONFIG = """\
listen: 127.0.0.1:{port}
state_dir: state
devices: cpu
max_running: 0
defaults:
  ttl: forever
  colour: red
frob: 1
log_level: loud
"""
PRESETS = {
    # A command preset with both keys a command never reads.
    "a.yaml": 'backend: command\ncmd: ["true", "${PORT}"]\nargs: [--verbose]\nbinary: /bin/true\n',
    # Both filters a preset may not set.
    "b.yaml": (
        'backend: command\ncmd: ["true", "${PORT}"]\n'
        "filters:\n  strip_params: [model]\n  set_params: {stream: true}\n"
    ),
    # Eight at once: a missing model, a bad duration, an unknown key, a wrong type, a bad
    # sleep, a key the backend never reads, health none on an engine, a device not offered.
    "c.yaml": (
        "backend: llama-server\n"
        "model: missing.gguf\n"
        "ttl: ten\n"
        "colour: blue\n"
        'pin: "yes"\n'
        "sleep: 3\n"
        "cmd: [llama-server]\n"
        "health: none\n"
        "devices: [5]\n"
    ),
}
EXPECTED = [
    "swapd.yaml:4:14: max_running: expected a whole number of 1 or more (or null), got 0",
    'swapd.yaml:6:8: ttl: expected a duration like "10m", got "forever"',
    "swapd.yaml:7:3: colour: unknown key",
    "swapd.yaml:8:1: frob: unknown key",
    "swapd.yaml:9:12: log_level: expected one of debug, info, warning, error, got 'loud'",
    (
        "presets/a.yaml:3:1: args: a command backend never reads it: cmd is run as written; "
        "put the arguments in cmd"
    ),
    (
        "presets/a.yaml:4:1: binary: a command backend never reads it: cmd is run as written; "
        "put the program first in cmd"
    ),
    (
        "presets/b.yaml:4:18: filters.strip_params: model cannot be stripped; use_model_name "
        "sets the model the backend receives"
    ),
    (
        "presets/b.yaml:5:16: filters.set_params: stream cannot be set here; the client "
        "chooses whether its answer streams"
    ),
    "presets/c.yaml:2:8: model: not found: {root}/presets/missing.gguf",
    'presets/c.yaml:3:6: ttl: expected a duration like "10m", got "ten"',
    "presets/c.yaml:4:1: colour: unknown key",
    (
        "presets/c.yaml:5:6: pin: expected true or false, got 'yes' (a quoted string: write it "
        "without quotes)"
    ),
    "presets/c.yaml:6:8: sleep: expected auto, 0, 1 or 2, got 3",
    (
        "presets/c.yaml:7:1: cmd: a llama-server backend never reads it: only a command backend "
        "runs cmd; llama-server's own options go in args"
    ),
    (
        "presets/c.yaml:8:9: health: llama-server answers /health once it has loaded; none is "
        "for command backends"
    ),
    "presets/c.yaml:9:10: devices: none of [5] is among the daemon's devices: cpu",
]


def write_tree(root: Path, port: int, config: str, presets: dict[str, str]) -> None:
    """``root/swapd.yaml`` and ``root/presets/<file>``, written as given."""
    (root / "presets").mkdir(parents=True, exist_ok=True)
    (root / "swapd.yaml").write_text(config.format(port=port))
    for name, text in presets.items():
        (root / "presets" / name).write_text(text)


def swapd(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``swapd ARGS`` in a fresh interpreter, run in ``root``."""
    return subprocess.run(
        [sys.executable, "-m", "swapd", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def short(lines: list[str]) -> list[str]:
    """Each line with the list of known keys an unknown key's error gives cut off."""
    return [line.split("; known keys: ")[0] for line in lines]


def expected(root: Path) -> list[str]:
    """EXPECTED, with the folder a resolved path names."""
    return [line.replace("{root}", str(root.resolve())) for line in EXPECTED]


def test_check_prints_every_independent_problem_once_located_in_file_order(
    tmp_path: Path,
) -> None:
    """Not the first problem of a preset or of the config: each, once, where it was written.

    The config's own first (its ``defaults:`` among its keys, by line), then each preset file
    in name order, each by line and column.
    """
    write_tree(tmp_path, 8080, CONFIG, PRESETS)
    done = swapd(tmp_path, "check", "--config", "swapd.yaml")
    assert done.returncode == 1
    assert short(done.stderr.splitlines()) == expected(tmp_path)
    assert done.stdout == ""


def test_a_reload_refuses_with_every_problem_that_check_prints(
    start_daemon: StartDaemon,
) -> None:
    """``POST /swapd/reload`` lists the same problems as ``swapd check``, and so does the CLI."""
    d = start_daemon({"ok": fake_preset("OK")})
    write_tree(d.root, d.port, CONFIG, PRESETS)
    # The config named as the daemon names it: by its whole path.
    checked = swapd(d.root, "check", "--config", str(d.config_path)).stderr.splitlines()
    assert short([line.removeprefix(f"{d.root}/") for line in checked]) == expected(d.root)
    status, body = d.request("POST", "/swapd/reload")
    assert (status, body["error"]["code"]) == (400, "config_invalid")
    assert body["errors"] == checked
    cli = swapd(d.root, "reload", "--url", d.url)
    assert cli.returncode == 1
    assert cli.stderr.splitlines()[:-1] == checked
    assert d.chat("ok")[0] == 200  # the running config stays


def test_a_value_that_did_not_convert_is_one_error_and_checks_nothing_else(
    tmp_path: Path,
) -> None:
    """A key whose value is refused is not also "missing", nor read in its default's place.

    ``presets: [x]`` does not make a missing presets folder; a bad ``cache_dir`` is not
    missing for a staged preset; a bad model in ``defaults:`` is not missing in a preset.
    """
    (tmp_path / "swapd.yaml").write_text("presets: [x]\n")
    done = swapd(tmp_path, "check", "--config", "swapd.yaml")
    assert done.stderr.splitlines() == ["swapd.yaml:1:10: presets: expected a path, got ['x']"]
    staged = 'backend: command\ncmd: ["true", "${PORT}"]\nmodel: ../swapd.yaml\nstage: true\n'
    write_tree(tmp_path, 0, "cache_dir: [1]\n", {"staged.yaml": staged})
    done = swapd(tmp_path, "check", "--config", "swapd.yaml")
    assert done.stderr.splitlines() == ["swapd.yaml:1:12: cache_dir: expected a path, got [1]"]
    (tmp_path / "presets" / "staged.yaml").unlink()
    engine = "backend: llama-server\nttl: 5m\n"
    write_tree(tmp_path, 0, "defaults:\n  model: [1]\n", {"engine.yaml": engine})
    done = swapd(tmp_path, "check", "--config", "swapd.yaml")
    assert done.stderr.splitlines() == [
        "swapd.yaml:2:10: model: expected a non-empty string, got [1]"
    ]


def test_a_program_given_as_a_path_is_said_missing_or_not_executable_there(
    tmp_path: Path,
) -> None:
    """A path in ``cmd`` or ``binary:`` was not searched for on PATH: the warning says why.

    Missing at an absolute path, missing at a relative one (and where that is from the
    working folder), a file that may not be run, a folder; only a bare name searched PATH.
    """
    (tmp_path / "plain").write_text("#!/bin/sh\n")
    (tmp_path / "plain").chmod(0o644)
    presets = {
        "abs.yaml": 'backend: command\ncmd: ["/nowhere/server", "${PORT}"]\n',
        "bare.yaml": 'backend: command\ncmd: ["no-such-server-here", "${PORT}"]\n',
        "bin.yaml": "backend: vllm\nmodel: .\nbinary: ./gone/vllm\n",
        "folder.yaml": 'backend: command\ncmd: ["/", "${PORT}"]\n',
        "mode.yaml": 'backend: command\ncmd: ["./plain", "${PORT}"]\n',
    }
    write_tree(tmp_path, 8080, "listen: 127.0.0.1:8080\n", presets)
    done = swapd(tmp_path, "check", "--config", "swapd.yaml")
    assert done.returncode == 0, done.stderr
    here = tmp_path.resolve()
    warnings = done.stderr.splitlines()
    assert warnings[0] == (
        "warning: presets/abs.yaml: abs: command '/nowhere/server' not found: "
        "no file at /nowhere/server"
    )
    assert warnings[1].startswith(
        "warning: presets/bare.yaml: bare: command 'no-such-server-here' not found or not "
        "executable (searched PATH="
    )
    assert warnings[2:] == [
        (
            "warning: presets/bin.yaml: bin: binary './gone/vllm' not found: no file at "
            f"./gone/vllm (from the working folder: {here}/gone/vllm); fix binary: in "
            "presets/bin.yaml"
        ),
        "warning: presets/folder.yaml: folder: command '/' is a directory, not a program: /",
        (
            "warning: presets/mode.yaml: mode: command './plain' is not executable: the file "
            f"at ./plain (from the working folder: {here}/plain) may not be run (chmod +x it)"
        ),
    ]
