"""Access and edge settings in the daemon config: keys, key files, hosts, origins, limits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from swapd.auth import HostGuard, access_warnings
from swapd.config import load_config
from swapd.errors import ConfigErrors
from swapd.keys import KeyRing

OK_PRESET = 'backend: command\ncmd: ["true", "${PORT}"]\n'
SECRET = "s3cret-key-never-printed"  # noqa: S105 - a test key, checked never to be printed


def write(root: Path, config: str, preset: bytes = OK_PRESET.encode()) -> Path:
    """swapd.yaml and presets/m.yaml under ``root``; the config path."""
    (root / "presets").mkdir(exist_ok=True)
    (root / "presets" / "m.yaml").write_bytes(preset)
    path = root / "swapd.yaml"
    path.write_text(config)
    return path


def errors(path: Path) -> list[str]:
    """Every error loading ``path`` reports."""
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    return [str(e) for e in info.value.errors]


def test_defaults_bind_loopback_with_no_keys_and_finite_timeouts(tmp_path: Path) -> None:
    """Without settings swapd listens on 127.0.0.1, needs no key and bounds every wait."""
    config = load_config(write(tmp_path, ""))
    assert (config.host, config.api_keys, config.admin_keys) == ("127.0.0.1", (), ())
    assert (config.allowed_hosts, config.cors_origins, config.metrics_public) == ((), (), False)
    assert config.max_connections == 1024
    assert (config.header_timeout, config.body_timeout, config.keepalive_timeout) == (
        10.0,
        120.0,
        75.0,
    )


def test_key_files_join_inline_keys_relative_to_the_config(tmp_path: Path) -> None:
    """Keys come from the lists and from files of one key a line (comments and blanks skipped)."""
    (tmp_path / "api.keys").write_text("# team a\nkey-from-file-1\n\n  key-from-file-2  \n")
    (tmp_path / "admin.keys").write_text("admin-from-file\n")
    path = write(
        tmp_path,
        'api_keys: ["inline-key"]\napi_keys_file: api.keys\nadmin_keys_file: admin.keys\n',
    )
    config = load_config(path)
    assert config.api_keys == ("inline-key", "key-from-file-1", "key-from-file-2")
    assert config.admin_keys == ("admin-from-file",)
    assert config.admin_keys_file == tmp_path / "admin.keys"
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("api_keys: []\n", "swapd.yaml:1:11: api_keys: expected a list of one or more keys"),
        ("api_keys: [12345]\n", "swapd.yaml:1:11: api_keys: key 1: expected a quoted string"),
        (
            f'admin_keys: ["ok-key", "{SECRET} x"]\n',
            "swapd.yaml:1:13: admin_keys: key 2: expected visible ASCII characters",
        ),
        ("api_keys_file: nowhere.keys\n", "swapd.yaml:1:16: api_keys_file: cannot read"),
        ("allowed_hosts: [http://x.example]\n", "swapd.yaml:1:16: allowed_hosts: expected a host"),
        ("cors_origins: [x.example]\n", "swapd.yaml:1:15: cors_origins: expected an origin"),
        ('cors_origins: ["null"]\n', "swapd.yaml:1:15: cors_origins: expected an origin"),
        ("metrics_public: yes please\n", "swapd.yaml:1:17: metrics_public: expected true or false"),
        ("max_connections: 0\n", "swapd.yaml:1:18: max_connections: expected a whole number"),
        ("header_timeout: 0s\n", "swapd.yaml:1:17: header_timeout: expected a duration above"),
    ],
)
def test_bad_access_settings_name_file_line_column_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, expected: str
) -> None:
    """Each bad setting is one error at its place; a key's value is never printed."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, config)
    found = errors(Path("swapd.yaml"))
    assert len(found) == 1
    assert found[0].startswith(expected), found
    assert SECRET not in found[0]


def test_a_key_written_as_a_number_is_named_by_its_yaml_kind(tmp_path: Path) -> None:
    """A bare number in a key list says int or float, as YAML reads it, never its value."""
    found = errors(write(tmp_path, "api_keys: [12345]\nadmin_keys: [1.5]\n"))
    assert found == [
        f"{tmp_path}/swapd.yaml:1:11: api_keys: key 1: expected a quoted string, got int",
        f"{tmp_path}/swapd.yaml:2:13: admin_keys: key 1: expected a quoted string, got float",
    ]


def test_a_bad_line_in_a_keys_file_points_at_that_line(tmp_path: Path) -> None:
    """A key file line with a space is reported at file:line:1, without the line's text."""
    keys = tmp_path / "api.keys"
    keys.write_text(f"good-key\n# note\n{SECRET} oops\n")
    found = errors(write(tmp_path, "api_keys_file: api.keys\n"))
    assert found == [
        (
            f"{keys}:3:1: api_keys_file: expected a key of visible ASCII characters with no "
            "spaces (the line is not shown)"
        )
    ]


def test_a_keys_file_saved_with_a_byte_order_mark_and_crlf_is_read(tmp_path: Path) -> None:
    """As Notepad saves it: the mark made the first key "not visible ASCII"."""
    (tmp_path / "api.keys").write_bytes(b"\xef\xbb\xbfkey-one\r\nkey-two\r\n")
    config = load_config(write(tmp_path, "api_keys_file: api.keys\n"))
    assert config.api_keys == ("key-one", "key-two")


def test_an_empty_keys_file_is_an_error_not_open_access(tmp_path: Path) -> None:
    """A keys file with no keys must not quietly turn access control off."""
    (tmp_path / "admin.keys").write_text("# nothing yet\n\n")
    found = errors(write(tmp_path, "admin_keys_file: admin.keys\n"))
    assert len(found) == 1
    assert "admin_keys_file: no keys in" in found[0]


def test_hosts_and_origins_are_normalised(tmp_path: Path) -> None:
    """Host names are lower-cased; origins lose a trailing slash and their default port."""
    path = write(
        tmp_path,
        "allowed_hosts: [LLM.Example.com., '*.corp.example']\n"
        "cors_origins: ['https://Chat.example.com:443/', 'http://localhost:3000', '*']\n",
    )
    config = load_config(path)
    assert config.allowed_hosts == ("llm.example.com", "*.corp.example")
    assert config.cors_origins == ("https://chat.example.com", "http://localhost:3000", "*")


@pytest.mark.parametrize(
    ("listen", "allowed", "host", "ok"),
    [
        ("127.0.0.1", (), "127.0.0.1:8080", True),
        ("127.0.0.1", (), "localhost:8080", True),
        ("127.0.0.1", (), "[::1]:8080", True),
        ("127.0.0.1", (), "[::1]", True),
        # Only [addr] or [addr]:port name the address; text around it is another name.
        ("127.0.0.1", (), "[::1]evil.example", False),
        ("127.0.0.1", (), "[::1].evil.example:80", False),
        ("127.0.0.1", (), "[127.0.0.1", False),
        ("127.0.0.1", (), "[::1]:", False),
        ("127.0.0.1", (), "evil.example", False),
        ("127.0.0.1", (), "192.168.1.5:8080", False),
        ("0.0.0.0", (), "192.168.1.5:8080", True),
        ("0.0.0.0", (), "[fe80::1]:8080", True),
        ("0.0.0.0", (), "gpu-box.lan", False),
        # ":8080", every address of both families: IP literals pass, no name is its own.
        ("", (), "192.168.1.5:8080", True),
        ("", (), "[fe80::1]:8080", True),
        ("", (), "localhost:8080", True),
        ("", (), "", False),
        ("", (), ":8080", False),
        ("192.168.1.5", ("gpu-box.lan",), "GPU-box.lan.:8080", True),
        ("127.0.0.1", ("*.corp.example",), "corp.example", False),
        ("127.0.0.1", ("*.corp.example",), "a.b.corp.example", True),
        ("127.0.0.1", ("*",), "anything.example", True),
    ],
)
def test_the_host_guard(listen: str, allowed: tuple[str, ...], host: str, ok: bool) -> None:
    """The listen address, localhost, loopback and allowed_hosts pass; other names do not."""
    assert HostGuard(listen, allowed).allows(host) is ok


def test_the_key_ring_tells_roles_apart() -> None:
    """An admin key serves both roles; an inference key one; anything else none."""
    ring = KeyRing.of(["inference-1"], ["admin-1"])
    assert ring.enabled
    assert ring.role(b"admin-1") == "admin"
    assert ring.role(b"inference-1") == "inference"
    assert ring.role(b"inference-") is None
    assert ring.role(None) is None
    assert not KeyRing.of([], []).enabled


def test_access_warnings() -> None:
    """Listening beyond loopback without keys, api keys without admin keys, and CORS * warn."""
    assert (
        access_warnings(
            listen="127.0.0.1", port=8080, api_keys=False, admin_keys=False, cors_origins=()
        )
        == []
    )
    exposed = access_warnings(
        listen="0.0.0.0", port=8080, api_keys=False, admin_keys=False, cors_origins=("*",)
    )
    assert len(exposed) == 2
    assert "0.0.0.0:8080 without api_keys or admin_keys" in exposed[0]
    only_api = access_warnings(
        listen="0.0.0.0", port=8080, api_keys=True, admin_keys=False, cors_origins=()
    )
    assert only_api == [
        (
            "api_keys without admin_keys: every key is refused on /swapd/* (status, load, "
            "unload, logs) and `swapd status`"
        )
    ]


def test_allowed_hosts_star_without_keys_warns_of_dns_rebinding() -> None:
    """``allowed_hosts: ["*"]`` on loopback without keys turns the Host check off: a warning."""
    star = access_warnings(
        listen="127.0.0.1",
        port=8080,
        api_keys=False,
        admin_keys=False,
        cors_origins=(),
        allowed_hosts=("*",),
    )
    assert len(star) == 1
    assert "DNS rebinding" in star[0]
    keyed = access_warnings(
        listen="127.0.0.1",
        port=8080,
        api_keys=True,
        admin_keys=True,
        cors_origins=(),
        allowed_hosts=("*",),
    )
    assert keyed == []


def test_check_warns_about_exposure_and_loose_key_files(tmp_path: Path) -> None:
    """`swapd check` warns when swapd would listen beyond loopback without keys, and more."""
    (tmp_path / "admin.keys").write_text("short\n")
    (tmp_path / "admin.keys").chmod(0o644)
    path = write(tmp_path, "listen: 0.0.0.0:8080\n")
    done = subprocess.run(
        [sys.executable, "-m", "swapd", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert "0.0.0.0:8080 without api_keys or admin_keys" in done.stderr
    path.write_text("listen: 0.0.0.0:8080\nadmin_keys_file: admin.keys\n")
    done = subprocess.run(
        [sys.executable, "-m", "swapd", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert "without api_keys" not in done.stderr
    assert "can be read by other users (mode 644)" in done.stderr
    assert "1 key(s) shorter than 16 characters" in done.stderr
    assert "short" not in done.stdout


def test_a_preset_that_is_not_utf8_is_an_encoding_error(tmp_path: Path) -> None:
    """A preset in Latin-1 is reported as file:line:col: encoding, and serve exits 2."""
    preset = b'backend: command\ncmd: ["true", "${PORT}"]\n# caf\xe9\n'
    path = write(tmp_path, "", preset)
    found = errors(path)
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'presets' / 'm.yaml'}:3:6: encoding: not UTF-8")
    done = subprocess.run(
        [sys.executable, "-m", "swapd", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "encoding: not UTF-8: byte 0xe9" in done.stderr
    assert "Traceback" not in done.stderr
