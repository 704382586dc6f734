"""The systemd unit and scripts/install-service: verified by systemd-analyze, traps avoided."""

from __future__ import annotations

import grp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swapd.config import Config
from swapd.presets import Preset

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "swapd.service"
ANALYZE = shutil.which("systemd-analyze")
# Each of these makes systemd set NoNewPrivileges for a service with User= (systemd.exec(5)),
# which stops the setuid nvidia-modprobe.
IMPLY_NO_NEW_PRIVILEGES = (
    "NoNewPrivileges",
    "PrivateDevices",
    "ProtectHostname",
    "ProtectClock",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "SystemCallFilter",
    "SystemCallArchitectures",
    "SystemCallLog",
)


def settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in order (keys may repeat)."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def install(root: Path) -> subprocess.CompletedProcess[str]:
    """scripts/install-service into a staging root, the venv being this checkout's."""
    return subprocess.run(
        [str(ROOT / "scripts" / "install-service"), "--root", str(root), "--prefix", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.systemd
@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is missing (apt-get install systemd)")
def test_systemd_analyze_verifies_the_installed_unit(tmp_path: Path) -> None:
    """The unit install-service writes passes systemd-analyze verify with no warning at all."""
    assert install(tmp_path).returncode == 0
    unit = tmp_path / "etc" / "systemd" / "system" / "swapd.service"
    assert ANALYZE is not None
    verify = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=120
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


def test_the_unit_is_notify_with_a_watchdog_reload_and_room_to_stop() -> None:
    """Type=notify, a watchdog, reload by SIGHUP, and a stop timeout above swapd's drain.

    Not notify-reload: the systemd of Debian 12 (252) refuses it.
    """
    unit = settings(UNIT.read_text())
    single = {key: values[-1] for key, values in unit.items()}
    assert single["Type"] == "notify"
    assert single["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(single["WatchdogSec"]) > 0
    drain = Config("x").shutdown_timeout + Preset("x", "x", "command").stop_timeout
    assert int(single["TimeoutStopSec"]) > drain
    assert single["Restart"] == "always"  # any exit systemd did not ask for
    assert (single["KillMode"], single["OOMPolicy"]) == ("mixed", "continue")
    assert (single["StateDirectory"], single["CacheDirectory"]) == ("swapd", "swapd")
    assert single["LimitMEMLOCK"] == "infinity"
    path = next(v for v in unit["Environment"] if v.startswith("PATH="))
    venv_bin = str(Path(single["ExecStart"].split()[0]).parent)
    assert path.removeprefix("PATH=").split(":")[0] == venv_bin


def test_the_unit_keeps_setuid_helpers_working() -> None:
    """No NoNewPrivileges, nor any option that implies it, nor an empty bounding set."""
    unit = settings(UNIT.read_text())
    assert not [key for key in IMPLY_NO_NEW_PRIVILEGES if key in unit]
    assert "CapabilityBoundingSet" not in unit
    assert "SupplementaryGroups" not in unit  # in the drop-in, for the groups that exist


def test_install_service_adds_only_the_device_groups_that_exist(tmp_path: Path) -> None:
    """The drop-in names video and render where they exist; the config it writes checks out."""
    done = install(tmp_path)
    assert done.returncode == 0, done.stderr
    wanted = []
    for name in ("video", "render"):
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        wanted.append(name)
    drop_in = tmp_path / "etc" / "systemd" / "system" / "swapd.service.d" / "devices.conf"
    if wanted:
        assert settings(drop_in.read_text())["SupplementaryGroups"] == [" ".join(wanted)]
    else:
        assert not drop_in.exists()
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "swapd",
            "check",
            "--config",
            str(tmp_path / "etc/swapd/swapd.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert "no presets" in check.stderr  # until the operator adds one
    again = install(tmp_path)  # a second run keeps the operator's config
    assert again.returncode == 0
    assert "writing" not in again.stderr


def test_install_service_refuses_a_prefix_the_unit_cannot_hold(tmp_path: Path) -> None:
    """A prefix with & broke the sed that writes ExecStart=; with a space, ExecStart itself."""
    for prefix in ("/srv/a&b", "/srv/a b", "relative/path", "/srv/50%"):
        done = subprocess.run(
            [
                str(ROOT / "scripts" / "install-service"),
                "--root",
                str(tmp_path),
                "--prefix",
                prefix,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 2, prefix
        assert "--prefix must be an absolute path" in done.stderr
    assert not (tmp_path / "etc").exists()  # refused before writing anything


def test_install_service_writes_a_config_others_cannot_read(tmp_path: Path) -> None:
    """Keys may be written inline in swapd.yaml: 0640, not world-readable."""
    assert install(tmp_path).returncode == 0
    assert (tmp_path / "etc" / "swapd" / "swapd.yaml").stat().st_mode & 0o777 == 0o640


def test_install_service_puts_the_cli_on_path(tmp_path: Path) -> None:
    """`swapd check`, `swapd status` and `swapd reload` run as written after an install.

    The venv's swapd is linked as /usr/local/bin/swapd; a second run keeps the link, and a
    file of another install there is left alone.
    """
    venv_swapd = str(ROOT / ".venv" / "bin" / "swapd")
    link = tmp_path / "usr" / "local" / "bin" / "swapd"
    for _ in range(2):
        assert install(tmp_path).returncode == 0
        assert link.is_symlink()
        assert str(link.readlink()) == venv_swapd
    link.unlink()
    link.write_text("#!/bin/sh\n")
    done = install(tmp_path)
    assert done.returncode == 0, done.stderr
    assert not link.is_symlink()
    assert "left as it is" in done.stderr
