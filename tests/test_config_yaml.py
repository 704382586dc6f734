"""Hostile YAML: values that crashed, hung or were misread instead of a located error.

Each of these went through ``swapd check`` and ``swapd serve`` as a traceback, a read
that took minutes and gigabytes, or a refusal of what the README says to write.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config_edges import _errors

OK_PRESET = 'backend: command\ncmd: ["true", "${PORT}"]\n'


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_a_number_too_long_to_read_is_a_config_error(tmp_path: Path) -> None:
    """An int of over 4,300 digits raised Python's ValueError out of the YAML loader."""
    got = _errors(tmp_path, "", {"m.yaml": OK_PRESET + "ttl: " + "9" * 5000 + "\n"})
    assert got == ["presets/m.yaml:3:6: ttl: a number written with more than 1,000 characters"]


def test_a_long_number_below_the_top_is_a_config_error(tmp_path: Path) -> None:
    """The same inside a list, and in the daemon's own file."""
    got = _errors(tmp_path, "devices: [0, " + "1" * 5000 + "]\n", {"m.yaml": OK_PRESET})
    assert got == ["swapd.yaml:1:10: devices: a number written with more than 1,000 characters"]
