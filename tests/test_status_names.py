"""Every status /v1/models can report, and every field /swapd/status gives, is named in README."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import StartDaemon
from daemon import fake_preset

README = Path(__file__).resolve().parent.parent / "README.md"


def _documented_statuses() -> set[str]:
    row = next(
        line for line in README.read_text().splitlines() if line.startswith("| `GET /v1/models` |")
    )
    listed = re.search(r"`status` \(([^)]*)\)", row)
    assert listed, row
    return set(re.findall(r"`([a-z]+)`", listed.group(1)))


def test_a_failed_start_shows_a_documented_status(start_daemon: StartDaemon) -> None:
    """A model backing off after a failed start shows a status README's list names."""
    d = start_daemon({"a": fake_preset("A", "--exit-at-start", "3")})
    status, _ = d.chat("a")
    assert status == 502
    _, models = d.get("/v1/models")
    [model] = models["data"]
    assert model["status"] in _documented_statuses(), model


def test_the_model_list_names_each_models_state_as_the_core_issue_and_status_do(
    start_daemon: StartDaemon,
) -> None:
    """/v1/models gives each model's ``state``, as /swapd/status does, and keeps ``status``."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    assert d.chat("a")[0] == 200
    _, models = d.get("/v1/models")
    assert {(m["id"], m["state"], m["status"]) for m in models["data"]} == {
        ("a", "ready", "ready"),
        ("b", "stopped", "stopped"),
    }
    _, one = d.get("/v1/models/b")
    assert one["state"] == d.model("b")["state"] == "stopped"


def _keys(value: object) -> set[str]:
    """Every key of a JSON value, at any depth."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_every_field_of_the_status_route_is_named_in_the_readme(
    start_daemon: StartDaemon,
) -> None:
    """Each key /swapd/status answers with, at any depth, is named in README's row for it.

    The row had lost ``connections.closed_for_room`` and the top-level ``config``.
    """
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    _, status = d.get("/swapd/status")
    row = next(
        line
        for line in README.read_text().splitlines()
        if line.startswith("| `GET /swapd/status` |")
    )
    named = set(re.findall(r"[a-z_]+", row))
    assert sorted(_keys(status) - {"models"} - named) == []
