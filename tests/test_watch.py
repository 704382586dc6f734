"""``watch_config``: a change to the config, a preset or a key file reloads, as SIGHUP does."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import StartDaemon
from daemon import fake_preset, wait_for

from swapd.config import stamp_files
from swapd.watch import _changed

WATCH = {"watch_config": "0.2s"}


def test_a_preset_changed_added_or_removed_on_disk_is_reloaded(start_daemon: StartDaemon) -> None:
    """No reload asked for: the files changing is enough, in place where the change allows."""
    d = start_daemon({"a": fake_preset("A")}, WATCH)
    [on] = wait_for(lambda: d.events("config.watch.on"))
    assert (on["every_s"], on["files"]) == (0.2, 2)  # swapd.yaml and a.yaml
    assert d.chat("a")[0] == 200
    pid = d.model("a")["pid"]
    (d.root / "presets" / ".a.yaml.swp").write_bytes(b"an editor's")  # not a preset
    d.presets = {"a": fake_preset("A", ttl="5m"), "b": fake_preset("B")}
    d.write()
    wait_for(lambda: d.events("config.reload"))
    assert (d.model("a")["ttl"], d.model("a")["pid"]) == (300, pid)
    assert d.chat("b")[0] == 200
    [change] = d.events("config.watch.change")  # the swap file was no change of its own
    assert str(d.root / "presets" / "b.yaml") in change["files"]
    assert not any(name.endswith(".swp") for name in change["files"])
    (d.root / "presets" / "b.yaml").unlink()
    wait_for(lambda: len(d.events("config.reload")) == 2)
    assert d.chat("b")[0] == 404


def test_a_refused_config_is_tried_once_until_it_changes_again(start_daemon: StartDaemon) -> None:
    """A bad edit: one config.reload.fail, the old config serves; the fix is then taken."""
    d = start_daemon({"a": fake_preset("A")}, WATCH)
    wait_for(lambda: d.events("config.watch.on"))
    preset = d.root / "presets" / "a.yaml"
    good = preset.read_text()
    preset.write_text(good + "ttl: ten\n")
    wait_for(lambda: d.events("config.reload.fail"))
    assert d.chat("a")[0] == 200  # the running config stays
    # Each look finds the same refused files: no second try while they stay so. The fix
    # that follows is taken, and it is the next reload event either way.
    preset.write_text(good + "ttl: 10m\n")
    wait_for(lambda: d.events("config.reload"))
    assert len(d.events("config.reload.fail")) == 1
    assert d.model("a")["ttl"] == 600


def test_a_fix_in_the_folder_a_refused_config_moved_to_is_taken(
    start_daemon: StartDaemon,
) -> None:
    """presets: moved to a folder with a bad preset: refused; fixing that preset reloads.

    The fix lands in a file only the refused config reads, not the running one.
    """
    d = start_daemon({"a": fake_preset("A")}, WATCH)
    wait_for(lambda: d.events("config.watch.on"))
    moved = d.root / "moved"
    moved.mkdir()
    good = (d.root / "presets" / "a.yaml").read_text()
    (moved / "b.yaml").write_text(good + "ttl: ten\n")
    d.settings = {**d.settings, "presets": "moved"}
    d.write()  # writes presets/ again too; the config now names moved/
    wait_for(lambda: d.events("config.reload.fail"))
    (moved / "b.yaml").write_text(good + "ttl: 10m\n")
    wait_for(lambda: d.events("config.reload"))
    wait_for(lambda: d.model("b")["ttl"] == 600)


def test_a_refused_config_naming_a_path_with_a_nul_leaves_the_watch_running(
    start_daemon: StartDaemon,
) -> None:
    """A path no stat can take (a NUL in it) is a refusal like any, not the watch's end."""
    d = start_daemon({"a": fake_preset("A")}, WATCH)
    wait_for(lambda: d.events("config.watch.on"))
    d.settings = {**d.settings, "api_keys_file": "keys\0x"}
    d.write()
    wait_for(lambda: d.events("config.reload.fail"))
    d.settings = dict(WATCH)
    d.presets = {"a": fake_preset("A", ttl="2m")}
    d.write()
    wait_for(lambda: d.model("a")["ttl"] == 120)


def test_a_reload_turns_the_watch_on_and_off(start_daemon: StartDaemon) -> None:
    """Off by default; a config that sets watch_config, once reloaded, is watched."""
    d = start_daemon({"a": fake_preset("A")})
    d.settings = {**d.settings, **WATCH}
    d.write()
    assert d.events("config.watch.on") == []
    assert d.request("POST", "/swapd/reload")[0] == 200
    wait_for(lambda: d.events("config.watch.on"))  # it has read the files as they are
    assert d.events("config.watch.change") == []
    d.presets = {"a": fake_preset("A", ttl="2m")}
    d.write()
    wait_for(lambda: d.events("config.watch.change"))
    wait_for(lambda: d.model("a")["ttl"] == 120)
    d.settings = {**d.settings, "watch_config": 0}
    d.write()  # the watch takes this one itself, and is off after it
    wait_for(lambda: d.events("config.watch.off"))


def test_a_key_file_rotated_is_reloaded(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A key file replaced by a rename (a secret store's rotation) takes effect."""
    keys = tmp_path / "keys"
    keys.write_text("old-key-0123456789abcdef\n")
    settings = {**WATCH, "api_keys_file": str(keys), "admin_keys": ["admin-0123456789abcdef"]}
    d = start_daemon({"a": fake_preset("A")}, settings)
    wait_for(lambda: d.events("config.watch.on"))
    ask = {"model": "a", "messages": [{"role": "user", "content": "x"}]}

    def chat(key: str) -> int:
        status, _ = d.request("POST", "/v1/chat/completions", ask, headers={"x-api-key": key})
        return status

    assert chat("old-key-0123456789abcdef") == 200
    fresh = tmp_path / "keys.new"
    fresh.write_text("new-key-0123456789abcdef\n")
    fresh.replace(keys)
    wait_for(lambda: chat("new-key-0123456789abcdef") == 200)
    assert chat("old-key-0123456789abcdef") == 401


def test_a_file_replaced_by_a_rename_changes_the_fingerprint(tmp_path: Path) -> None:
    """Same size and mtime (a ConfigMap's swap can keep both): the inode tells them apart."""
    config = tmp_path / "swapd.yaml"
    config.write_text("a: 1\n")
    before = stamp_files([config])
    other = tmp_path / "other"
    other.write_text("a: 2\n")
    stat = config.stat()
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    other.replace(config)
    after = stamp_files([config])
    assert after != before
    assert _changed(before, after) == [str(config)]
    assert stamp_files([tmp_path / "missing"]) == {str(tmp_path / "missing"): (-1, -1, -1)}


def test_a_watch_faster_than_100ms_is_refused_with_where_it_is_written(
    start_daemon: StartDaemon,
) -> None:
    """``watch_config: 1ms`` (``1m`` mistyped?) is an error at its line, not a busy loop.

    It was taken: every file was looked at a thousand times a second, for good. The
    running watch stays at its pace; 100ms, and 0 (off), are taken.
    """
    d = start_daemon({"a": fake_preset("A")}, WATCH)
    wait_for(lambda: d.events("config.watch.on"))
    d.settings = {"watch_config": "1ms"}
    d.write()
    [fail] = wait_for(lambda: d.events("config.reload.fail"))
    [error] = fail["errors"]
    assert error == (
        f"{d.config_path}:4:15: watch_config: expected 0 (off) or a duration of at least"
        ' 100ms, got "1ms"'
    )
    status, body = d.request("POST", "/swapd/reload")
    assert (status, body["errors"]) == (400, [error])
    d.settings = {"watch_config": "100ms"}
    d.write()
    [reloaded] = wait_for(lambda: d.events("config.reload"))
    assert reloaded["restart_needed"] == []
    d.settings = {"watch_config": 0}
    d.write()
    wait_for(lambda: d.events("config.watch.off"))
