"""Hostile YAML: values that crashed, hung or were misread instead of a located error.

Each of these went through ``swapd check`` and ``swapd serve`` as a traceback, a read
that took minutes and gigabytes, a folder read as empty, an error at the wrong place, or
a refusal of what the README says to write.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from test_config_edges import _errors, _load

from swapd.config import load_config
from swapd.errors import ConfigErrors

OK_PRESET = 'backend: command\ncmd: ["true", "${PORT}"]\n'


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_a_number_too_long_to_read_is_a_config_error(tmp_path: Path) -> None:
    """An int of over 4,300 digits raised Python's ValueError out of the YAML loader."""
    got = _errors(tmp_path, "", {"m.yaml": OK_PRESET + "ttl: " + "9" * 5000 + "\n"})
    assert got == ["presets/m.yaml:3:6: ttl: a number written with more than 1,000 characters"]


def test_a_long_number_below_the_top_is_a_config_error(tmp_path: Path) -> None:
    """The same inside a list, and in the daemon's own file: at the number itself."""
    got = _errors(tmp_path, "devices: [0, " + "1" * 5000 + "]\n", {"m.yaml": OK_PRESET})
    assert got == ["swapd.yaml:1:14: devices: a number written with more than 1,000 characters"]


@pytest.mark.parametrize("key", ["model", "binary", "args", "cmd", "env"])
@pytest.mark.parametrize("where", ["preset", "defaults"])
def test_a_value_holding_an_alias_of_itself_is_a_config_error(
    tmp_path: Path, key: str, where: str
) -> None:
    """``&a [*a]`` ended in RecursionError where ``${env.NAME}`` macros are replaced.

    Under ``defaults:`` the error names it, at the place the value is written.
    """
    value = "&a [x, *a]" if key != "env" else "&a {A: *a}"
    preset = "backend: command\n" + ("" if key == "cmd" else 'cmd: ["true", "${PORT}"]\n')
    if where == "preset":
        got = _errors(tmp_path, "", {"m.yaml": preset + f"{key}: {value}\n"})
        line = 2 if key == "cmd" else 3
        where = f"presets/m.yaml:{line}:{len(key) + 3}"
        assert got == [f"{where}: {key}: holds an alias of itself, a value without end"]
    else:
        got = _errors(tmp_path, f"defaults:\n  {key}: {value}\n", {"m.yaml": preset})
        assert got == [
            f"swapd.yaml:2:{len(key) + 5}: defaults: holds an alias of itself, a value without end"
        ]


def test_a_self_holding_value_is_named_where_its_anchor_is(tmp_path: Path) -> None:
    """Below the top, the error points at the anchored value, not the key's whole value."""
    got = _errors(tmp_path, "", {"m.yaml": OK_PRESET + "metadata:\n  a: 1\n  b: &b [*b]\n"})
    assert got == ["presets/m.yaml:5:6: metadata: holds an alias of itself, a value without end"]


def test_an_anchor_many_keys_repeat_is_bounded_for_the_whole_file(tmp_path: Path) -> None:
    """The bound on expanded values held per key only: each key was built anew.

    A 1.5 MB file of keys that each name one anchor of 99,000 values took hours and
    tens of gigabytes before any unknown key was reported.
    """
    anchor = "[" + ", ".join(["x"] * 1000) + "]"
    config = f"a0: &a {anchor}\n" + "".join(f"k{i}: *a\n" for i in range(200))
    got = _errors(tmp_path, config, {"m.yaml": OK_PRESET})
    reason = "with the keys before it, stands for more than 100,000 values once their aliases"
    assert got == [f"swapd.yaml:100:1: k98: {reason} are expanded"]


@pytest.mark.parametrize("written", ["off", "'off'", "false"])
def test_backend_log_off_is_taken_as_the_readme_writes_it(tmp_path: Path, written: str) -> None:
    """Unquoted, ``backend_log: off`` is YAML 1.1's false: it was refused with "got False"."""
    assert _load(tmp_path, f"backend_log: {written}\n").backend_log == "off"


def test_backend_log_on_is_still_refused(tmp_path: Path) -> None:
    """True is no mode: the error says which there are."""
    assert _errors(tmp_path, "backend_log: on\n", {"m.yaml": OK_PRESET}) == [
        "swapd.yaml:1:14: backend_log: expected one of info, debug, off, got True"
    ]


def test_a_presets_folder_that_cannot_be_listed_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder this user may not list (mode 0700, another owner) read as one with no files.

    ``swapd check`` said ok with 0 presets, and a reload dropped every model.
    """
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path).name == "presets":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    got = _errors(tmp_path, "max_body: 1MiB\n", {"m.yaml": OK_PRESET})
    assert got == ["swapd.yaml:1:1: presets: cannot read presets: Permission denied"]


def test_an_unset_env_macro_in_a_block_list_is_named_at_its_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README says where it is written; it was the start of the list or mapping."""
    monkeypatch.delenv("SWAPD_T_NOPE", raising=False)
    preset = (
        'backend: command\ncmd:\n  - "true"\n  - "${PORT}"\n  - "${env.SWAPD_T_NOPE}"\n'
        'env:\n  A: x\n  B: "${env.SWAPD_T_NOPE}"\n'
    )
    unset = "${env.SWAPD_T_NOPE}: swapd's environment has no SWAPD_T_NOPE"
    assert _errors(tmp_path, "", {"m.yaml": preset}) == [
        f"presets/m.yaml:5:5: cmd: {unset}",
        f"presets/m.yaml:8:6: env: {unset}",
    ]


def test_a_bad_item_of_a_list_or_mapping_is_named_where_it_is(tmp_path: Path) -> None:
    """Not a string, a name that is no name, an env name with ``=``: each at its item or key."""
    preset = (
        'backend: command\ncmd: ["true", "${PORT}", [1]]\n'
        "aliases:\n  - ok\n  - -bad\n"
        "env:\n  A: x\n  B=C: y\n  D: {e: 1}\n"
    )
    got = _errors(tmp_path, "", {"m.yaml": preset})
    assert got == [
        "presets/m.yaml:2:26: cmd: expected a non-empty string, got [1]",
        "presets/m.yaml:5:5: aliases: not a usable model name: '-bad'",
        "presets/m.yaml:8:3: env: not a usable variable name: 'B=C'",
        "presets/m.yaml:9:6: env: expected a non-empty string, got {'e': 1}",
    ]


def _alias_bomb(levels: int) -> str:
    """A flow list that stands for 10**levels values in a few hundred bytes."""
    text = "&l0 [" + ", ".join(["x"] * 10) + "]"
    for level in range(1, levels):
        text = f"&l{level} [{text}, " + ", ".join([f"*l{level - 1}"] * 9) + "]"
    return text


@pytest.mark.parametrize("where", ["config", "preset"])
def test_a_list_as_a_key_is_a_config_error_at_the_key(tmp_path: Path, where: str) -> None:
    """``? [a]`` was an unknown key named by the nodes' repr, ``[ScalarNode(tag=...)]``."""
    bad = "? [a]\n: 1\n"
    if where == "config":
        got = _errors(tmp_path, bad, {"m.yaml": OK_PRESET})
    else:
        got = _errors(tmp_path, "", {"m.yaml": bad + OK_PRESET})
    file = "swapd.yaml" if where == "config" else "presets/m.yaml"
    assert got == [f"{file}:1:3: (top level): a key is a name, not a list or a mapping"]


def test_an_alias_bomb_as_a_key_is_refused_without_expanding_it(tmp_path: Path) -> None:
    """The key's text was built from every value its aliases stand for.

    Ten levels (10**10 values) took a reload's thread to gigabytes and held the reload
    lock for good, so no later reload ran; six are 1,000,000 values and a 60 MB message.
    """
    got = _errors(tmp_path, "", {"m.yaml": f"? {_alias_bomb(6)}\n: 1\n" + OK_PRESET})
    assert got == ["presets/m.yaml:1:3: (top level): a key is a name, not a list or a mapping"]


@pytest.mark.parametrize("key", ["presets", "state_dir", "cache_dir", "api_keys_file"])
def test_a_nul_in_a_daemon_path_is_a_config_error(tmp_path: Path, key: str) -> None:
    """``swapd check`` and the start ended in a ValueError traceback (embedded null byte)."""
    got = _errors(tmp_path, f'{key}: "a\\0b"\n', {"m.yaml": OK_PRESET})
    assert got == [f"swapd.yaml:1:{len(key) + 3}: {key}: a NUL character in 'a\\x00b'"]


LONE = "an escape of a lone surrogate (\\ud800 to \\udfff) is no character"


@pytest.mark.parametrize("key", ["presets", "state_dir", "cache_dir", "admin_keys_file"])
def test_a_lone_surrogate_in_a_daemon_value_is_a_config_error(tmp_path: Path, key: str) -> None:
    """A lone surrogate is no character: a UnicodeEncodeError traceback where a path was used."""
    got = _errors(tmp_path, f'{key}: "x\\ud800"\n', {"m.yaml": OK_PRESET})
    assert got == [
        f"swapd.yaml:1:{len(key) + 3}: {key}: {LONE}; write one above \\uffff as \\U0001F600"
    ]


def test_a_lone_surrogate_in_a_preset_is_named_where_it_is(tmp_path: Path) -> None:
    """A model path ended ``swapd check`` in a traceback; an argument or an env value was taken.

    Each is named at the string, also inside a list or a mapping.
    """
    presets = {
        "a.yaml": 'backend: command\ncmd: ["true", "${PORT}", "\\udfff"]\n',
        "b.yaml": OK_PRESET + 'model: "m\\ud800"\n',
        "c.yaml": OK_PRESET + 'env: {A: "\\ud800x"}\n',
        "d.yaml": OK_PRESET + '"k\\ud800": 1\n',
    }
    got = _errors(tmp_path, "", presets)
    assert [line.split(": an escape")[0] for line in got] == [
        "presets/a.yaml:2:26: cmd",
        "presets/b.yaml:3:8: model",
        "presets/c.yaml:3:10: env",
        "presets/d.yaml:3:1: (top level)",
    ]


def test_an_escaped_surrogate_pair_is_the_character_it_stands_for(tmp_path: Path) -> None:
    """As JSON writes a character above U+FFFF: taken, joined, not refused."""
    preset = OK_PRESET + 'description: "hi \\ud83d\\ude00"\n'
    assert _load(tmp_path, "", preset).presets[0].description == "hi \U0001f600"


def test_a_preset_that_is_a_link_is_named_as_the_folder_lists_it(tmp_path: Path) -> None:
    """Errors named the link's target: a file not in the presets folder, or not there at all.

    A ConfigMap's presets are links into a folder named for each update's time.
    """
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "base.yaml").write_text(OK_PRESET + "ttl: 5x\n")
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "qwen.yaml").symlink_to("../shared/base.yaml")
    (folder / "gone.yaml").symlink_to("missing.yaml")
    (tmp_path / "swapd.yaml").write_text("presets: presets\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(Path("swapd.yaml"))
    assert [str(e) for e in info.value.errors] == [
        "presets/gone.yaml:1:1: (file): cannot read: No such file or directory",
        'presets/qwen.yaml:3:6: ttl: expected a duration like "10m", got "5x"',
    ]


def test_a_yes_or_on_where_text_goes_says_to_quote_it(tmp_path: Path) -> None:
    """``args: [-fa, on]`` was refused with "got True", which the file never said."""
    preset = 'backend: command\ncmd: ["true", "${PORT}", "-fa", on]\n'
    quote = "YAML reads yes, no, on and off unquoted as true or false; quote it"
    got = _errors(tmp_path, "", {"m.yaml": preset, "n.yaml": OK_PRESET + "env: {A: no}\n"})
    assert got == [
        f"presets/m.yaml:2:33: cmd: expected a non-empty string, got true: {quote}",
        f"presets/n.yaml:3:10: env: expected a non-empty string, got false: {quote}",
    ]


def test_a_home_of_no_such_user_is_a_config_error(tmp_path: Path) -> None:
    """``~nobody-here/...`` ended ``swapd check`` and the start in a RuntimeError traceback."""
    user = "~swapd-no-such-user"
    no_home = f"cannot expand {user}: no such user's home here"
    got = _errors(
        tmp_path,
        f"state_dir: {user}/state\n",
        {"m.yaml": f"backend: llama-server\nmodel: {user}/m.gguf\n"},
    )
    assert got == [
        f"swapd.yaml:1:12: state_dir: {no_home}",
        f"presets/m.yaml:2:8: model: {no_home}",
    ]


def test_a_file_name_that_is_no_model_name_says_it_is_the_files(tmp_path: Path) -> None:
    """``my model.yaml`` was refused at 1:1 for a ``name`` the file never wrote."""
    got = _errors(tmp_path, "", {"my model.yaml": OK_PRESET})
    where = "presets/my model.yaml:1:1: name"
    hint = "it is the file's name: rename the file or set name:"
    assert got == [f"{where}: not a usable model name: 'my model'; {hint}"]


@pytest.mark.parametrize("flow", [True, False])
def test_a_value_nested_too_deeply_to_read_is_named_where_it_gets_too_deep(
    tmp_path: Path, flow: bool
) -> None:
    """It was named at 1:1 of the file, whatever line the nesting was on."""
    if flow:
        nested = "metadata: " + "[" * 5000 + "]" * 5000 + "\n"
        where = "presets/m.yaml:3:210"
    else:
        nested = "metadata:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 700))
        where = "presets/m.yaml:203:401"
    got = _errors(tmp_path, "", {"m.yaml": OK_PRESET + nested + "ttl: 1m\n"})
    assert got == [f"{where}: (yaml): nested more than 200 levels deep: too deep to read"]


@pytest.mark.parametrize("path", ["/health x", "/hé", "/health\\r\\nX-Probe: 1"])
def test_a_health_path_no_request_line_carries_is_refused(tmp_path: Path, path: str) -> None:
    """``swapd check`` said ok; each start then waited start_timeout (5 minutes) and failed.

    The backend answered the probe 400 (a space, a non-ASCII letter), or the line break
    wrote a header of its own into swapd's probe.
    """
    got = _errors(tmp_path, "", {"m.yaml": OK_PRESET + f'health: "{path}"\n'})
    [error] = got
    assert error.startswith(
        "presets/m.yaml:3:9: health: expected a URL path of visible ASCII characters"
    )


def test_a_percent_encoded_health_path_is_taken(tmp_path: Path) -> None:
    """What a URL carries, a query too, is kept as written."""
    [preset] = _load(tmp_path, "", OK_PRESET + "health: /h%C3%A9?ready=1\n").presets
    assert preset.health == "/h%C3%A9?ready=1"


@pytest.mark.parametrize("text", ["env:\n\tA: x\n", "ttl:\t1m\n"])
def test_a_tab_says_yaml_takes_spaces(tmp_path: Path, text: str) -> None:
    """PyYAML's "found character ... that cannot start any token" alone named no cause."""
    [error] = _errors(tmp_path, "", {"m.yaml": OK_PRESET + text})
    assert error.startswith("presets/m.yaml:")
    assert error.endswith(": YAML indents and separates with spaces, not tabs")


def test_a_model_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    """A backend opening a FIFO blocks until start_timeout; ``swapd check`` passed it."""
    os.mkfifo(tmp_path / "pipe.gguf")
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "m.yaml").write_text("backend: llama-server\nmodel: ../pipe.gguf\n")
    (tmp_path / "swapd.yaml").write_text("presets: presets\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(Path("swapd.yaml"))
    assert [str(e) for e in info.value.errors] == [
        f"presets/m.yaml:2:8: model: neither a file nor a directory: {tmp_path}/pipe.gguf"
    ]
