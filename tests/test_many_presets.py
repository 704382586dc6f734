"""Hundreds of presets: what a request, an idle feed and an idle swapd cost stays flat.

Each test counts work (a walk of the presets, a snapshot of a model) rather than time:
a request or a tick that reads every configured model costs hundreds of times more
with hundreds of presets.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from swapd.config import load_config

MODELS = 40


class CountedPresets(tuple[Any, ...]):
    """The config's presets, counting each walk of them."""

    __slots__ = ()
    walks = 0

    def __iter__(self) -> Any:
        CountedPresets.walks += 1
        return super().__iter__()


def test_a_name_lookup_does_not_walk_the_presets(tmp_path: Path) -> None:
    """``Config.preset`` (asked on every request) and the deepest name are indexed, not walked."""
    folder = tmp_path / "presets"
    folder.mkdir()
    for i in range(MODELS):
        (folder / f"m{i:03d}.yaml").write_text(
            f'backend: command\ncmd: ["true", "${{PORT}}"]\naliases: [org/a{i}]\n'
        )
    (tmp_path / "swapd.yaml").write_text("")
    loaded = load_config(tmp_path / "swapd.yaml")
    config = replace(loaded, presets=CountedPresets(loaded.presets))
    CountedPresets.walks = 0
    last = f"m{MODELS - 1:03d}"
    for _ in range(100):
        found = config.preset(last)
        assert found is not None
        assert found.name == last
        assert config.preset(f"org/a{MODELS - 1}") is found
        assert config.preset("nobody") is None
    assert CountedPresets.walks <= 1
    walks = CountedPresets.walks
    for _ in range(100):
        assert config.deepest_name == 2  # /upstream/org/a1/... is split at most this deep
    assert CountedPresets.walks - walks <= 1
