"""The example config and preset that ship with swapd stay valid."""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil
from pathlib import Path

from swapd.auth import HostGuard
from swapd.config import _DAEMON_KEYS as DAEMON_KEYS
from swapd.config import DEFAULT_LISTEN, Config, load_config

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
    assert (config.max_connections, config.header_timeout) == (1024, 10.0)


def test_the_unit_raises_the_descriptor_limit() -> None:
    """The systemd unit leaves room for max_connections at two descriptors each."""
    unit = (ROOT / "systemd" / "swapd.service").read_text()
    limit = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert limit is not None
    assert int(limit.group(1)) >= 2 * 1024 + 256


def test_the_nginx_snippet_sends_an_accepted_host_and_keeps_control_local() -> None:
    """The Host Nginx sends passes swapd's default Host check; /swapd/ is local-only."""
    conf = (ROOT / "systemd" / "nginx-swapd.conf").read_text()
    host = re.search(r"proxy_set_header Host (\S+);", conf)
    assert host is not None
    assert HostGuard(DEFAULT_LISTEN[0]).allows(host.group(1))
    control = re.search(r"location /swapd/ \{(.*?)\}", conf, re.DOTALL)
    assert control is not None
    rules = [line.split("#")[0].strip() for line in control.group(1).splitlines()]
    assert "deny all;" in rules
    assert {rule for rule in rules if rule.startswith("allow")} == {
        "allow 127.0.0.1;",
        "allow ::1;",
    }


def test_the_example_config_names_every_daemon_key_with_its_default(tmp_path: Path) -> None:
    """swapd.example.yaml says it shows every key with its default; both hold.

    Seven keys were missing from it (send_timeout, max_wait, hold_max, hold_busy,
    default_memory, shutdown_timeout, cgroups), which the unit's config points users to.
    """
    text = (ROOT / "swapd.example.yaml").read_text()
    written = set(re.findall(r"^#? ?([a-z_]+):", text, re.MULTILINE))
    assert sorted(set(DAEMON_KEYS) - written) == []
    shutil.copy(ROOT / "swapd.example.yaml", tmp_path / "swapd.yaml")
    (tmp_path / "presets").mkdir()
    shown = load_config(tmp_path / "swapd.yaml")
    default = Config(source="default")
    different = [
        f.name
        for f in dataclasses.fields(Config)
        # Not keys: where it was read from, and what its files held when read.
        if f.name not in {"source", "presets_dir", "state_dir", "stamps", "empty"}
        and getattr(shown, f.name) != getattr(default, f.name)
    ]
    assert different == []


def test_the_readme_module_map_names_every_module() -> None:
    """Each module and package of swapd has its line in the README's module map."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Module map") :]
    table = table[: table.index("\n## ")]
    named = set(re.findall(r"`swapd/([\w/.]+)`", table))
    package = ROOT / "swapd"
    modules = {
        p.name if p.is_file() else f"{p.name}/"
        for p in package.iterdir()
        if (p.suffix == ".py" and not p.name.startswith("__")) or (p / "__init__.py").is_file()
    }
    assert sorted(modules - named) == []
    assert sorted(named - modules) == []


def _error_codes_answered() -> set[str]:
    """Every ``code`` swapd puts in an error envelope, read from the source.

    Three spellings: a class's ``code = "..."``, a code handed to an error's constructor
    (``Forbidden(message, "origin_not_allowed")``), and an envelope written by hand
    (``{"code": "internal_error", ...}``).
    """
    codes: set[str] = set()
    for path in (ROOT / "swapd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "code" for t in node.targets
            ):
                values = [node.value]
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "Forbidden":
                values = node.args[1:2] + [k.value for k in node.keywords if k.arg == "code"]
            elif isinstance(node, ast.Dict):
                values = [
                    v
                    for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and k.value == "code"
                ]
            else:
                continue
            codes |= {
                v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)
            }
    return codes


def test_the_readme_error_table_names_every_error_code() -> None:
    """The README's table of error answers lists each code swapd sends, and no other.

    Clients and alerts match on these codes. The table had lost two that swapd sends:
    403 ``upstream_route_reserved`` and 500 ``internal_error``.
    """
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| status | code | when |") :]
    table = table[: table.index("\n\n")]
    listed = set(re.findall(r"^\|[^|]*\|\s*`([a-z_]+)`\s*\|", table, re.MULTILINE))
    answered = _error_codes_answered()
    assert sorted(answered - listed) == []
    assert sorted(listed - answered) == []
