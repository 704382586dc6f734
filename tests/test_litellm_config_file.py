"""`swapd litellm-config -o`: how the config file is replaced.

Unit tests of :func:`swapd.litellm_config.write_if_changed`; no swapd, no LiteLLM.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapd.litellm_config import Node, build_config, render, write_if_changed

_NODE = Node("http://gpu1.lan:8080", "sk-literal-node-key")  # a literal key, as the docs allow


def _config_text(model: str) -> str:
    return render(build_config([(_NODE, [{"id": model}])]), [_NODE])


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask of a root shell or a systemd service."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask_022")
def test_a_new_config_holding_a_literal_key_is_not_readable_by_others(tmp_path: Path) -> None:
    """A literal ``--key`` must not land in a world-readable file.

    ``write_if_changed`` says "Created private: the file may hold node keys", yet a new
    file ends up ``0o666 & ~umask`` (0644 under the usual umask).
    """
    path = tmp_path / "config.yaml"
    text = _config_text("m")
    assert "sk-literal-node-key" in text
    assert write_if_changed(path, text)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o077 == 0, f"config holding a node key was created {mode:#o}"


def test_replacing_the_config_keeps_its_owner_and_group(tmp_path: Path) -> None:
    """The replaced config keeps the owner and group that let LiteLLM read it.

    The code keeps an existing file's mode "(... 0640 for a LiteLLM group)", but the new
    inode is owned by whoever runs the timer (root:root): a 0640 root:litellm or a 0600
    litellm-owned config becomes unreadable to LiteLLM at the first change, and the path
    unit then restarts LiteLLM onto a config it cannot read.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the file to another owner")
    path = tmp_path / "config.yaml"
    path.write_text(_config_text("old"), encoding="utf-8")
    os.chmod(path, 0o640)  # noqa: PTH101 - mirrors the operator's chmod
    os.chown(path, 4242, 4243)
    assert write_if_changed(path, _config_text("new"))
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (4242, 4243)


def test_the_new_config_reaches_the_disk_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new config is fsynced before it is renamed over the old one.

    Without it, a crash or power loss can leave config.yaml empty or truncated (XFS, ext4
    without auto_da_alloc), and LiteLLM then fails to start with no config at all.
    """
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "config.yaml"
    path.write_text(_config_text("old"), encoding="utf-8")
    assert write_if_changed(path, _config_text("new"))
    assert synced, "the new config was renamed into place without an fsync"


@pytest.mark.usefixtures("umask_022")
def test_a_temporary_file_a_killed_run_left_does_not_widen_the_new_config(tmp_path: Path) -> None:
    """A leftover ``.config.yaml.tmpPID`` (a SIGKILL, a pid reused) is replaced, not reused.

    Opened without ``O_EXCL`` it kept its own mode, and a link there was followed.
    """
    path = tmp_path / "config.yaml"
    leftover = tmp_path / f".config.yaml.tmp{os.getpid()}"
    leftover.write_text("half a config")
    leftover.chmod(0o666)
    assert write_if_changed(path, _config_text("m"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not leftover.exists()
