"""The example config and preset that ship with swapd stay valid."""

from __future__ import annotations

import shutil
from pathlib import Path

from swapd.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_and_sample_preset_are_valid(tmp_path: Path) -> None:
    """swapd.example.yaml and the commented sample preset load without errors."""
    shutil.copy(ROOT / "swapd.example.yaml", tmp_path / "swapd.yaml")
    (tmp_path / "presets").mkdir()
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    sample = (ROOT / "presets" / "gemma-3-270m.yaml.sample").read_text()
    sample = sample.replace("~/.local/state/swapd/models/gemma-3-270m-it-Q4_K_M.gguf", str(model))
    (tmp_path / "presets" / "gemma-3-270m.yaml").write_text(sample)
    config = load_config(tmp_path / "swapd.yaml")
    preset = config.preset("default")
    assert preset is not None
    assert (preset.name, preset.model, preset.ttl) == ("gemma-3-270m", model, 600.0)
    assert config.queue_timeout == 120.0
    assert config.reserve == 512 * 1024**2
