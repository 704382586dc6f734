"""footprints.json as swapd finds it: hand-edited, foreign or torn entries never size a load."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from swapd.footprints import Footprints, fingerprint
from swapd.presets import Preset

PRESET = Preset(name="a", file="a.yaml", backend="command", cmd=("serve", "${PORT}"))


def _entry(**fields: object) -> dict[str, object]:
    good: dict[str, object] = {
        "fingerprint": fingerprint(PRESET),
        "device_kind": "cpu",
        "bytes": 300 * 1024**2,
        "measured_at": 1.0,
    }
    return {**good, **fields}


def _read(state: Path, data: object) -> tuple[Footprints, list[MutableMapping[str, Any]]]:
    (state / "footprints.json").write_text(json.dumps(data))
    with structlog.testing.capture_logs() as logs:
        footprints = Footprints(state)
    return footprints, [e for e in logs if e["event"] == "footprints.drop"]


def test_a_good_entry_is_kept(tmp_path: Path) -> None:
    """A well-formed entry for this launch sizes its next load."""
    footprints, drops = _read(tmp_path, {"a": _entry()})
    assert drops == []
    found = footprints.get(PRESET, "cpu")
    assert found is not None
    assert found.bytes == 300 * 1024**2


def test_fields_of_the_wrong_type_or_sign_are_dropped_with_a_warning(tmp_path: Path) -> None:
    """A negative or boolean size would admit anything beside it: never a need."""
    for bad in (
        {"bytes": -50 * 1024**3},
        {"bytes": True},
        {"bytes": "5GiB"},
        {"bytes": 1.5},
        {"measured_at": "yesterday"},
        {"fingerprint": 7},
        {"device_kind": None},
    ):
        footprints, drops = _read(tmp_path, {"a": _entry(**bad)})
        assert footprints.get(PRESET, "cpu") is None, bad
        assert [e["model"] for e in drops] == ["a"], bad


def test_a_file_that_is_not_json_is_dropped_with_a_warning(tmp_path: Path) -> None:
    """A torn file is said in the log, not passed over in silence."""
    (tmp_path / "footprints.json").write_text('{"a": {"bytes": 3')  # torn by a crash
    with structlog.testing.capture_logs() as logs:
        footprints = Footprints(tmp_path)
    assert footprints.get(PRESET, "cpu") is None
    assert [e["event"] for e in logs] == ["footprints.drop"]
