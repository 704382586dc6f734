"""The swapd layout an import writes: ``swapd.yaml`` and ``presets/<model-id>.yaml``.

A preset swapd would refuse as written is kept aside as ``<id>.yaml.disabled``
(swapd reads ``*.yaml`` and ``*.yml`` only), so one model that needs a hand
does not keep ``swapd serve`` from starting the others. Every file written
starts with :data:`MARK`: a later ``--force`` replaces those files, and only
those. A file of the user's where the import would write stops it before it
writes anything.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from swapd.llama_swap.importer import Imported, render_yaml
from swapd.llama_swap.model import Draft

MARK = "# Written by `swapd import-llama-swap`"
CONFIG = "swapd.yaml"
PRESETS = "presets"
DISABLED = ".disabled"
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+-]")  # what a file name should not hold ("/" above all)


def holds_files(out: Path) -> bool:
    """Whether ``out`` exists with anything in it."""
    return out.is_dir() and any(out.iterdir())


def write(found: Imported, out: Path, source: Path) -> list[str]:
    """Write the layout under ``out``; warnings about files left there from before.

    :class:`FileExistsError`, before anything is written, where a file the import
    did not write is in the way.
    """
    files = _files(found, out)
    for path in files:
        _refuse_if_not_ours(path)
    (out / PRESETS).mkdir(parents=True, exist_ok=True)
    _write(out / CONFIG, _config_text(found, source), private="api_keys" in found.daemon)
    for path, draft in files.items():
        if draft is not None:
            _write(path, _preset_text(draft, source), private=False)
    return _clear_earlier(out, set(files))


def _files(found: Imported, out: Path) -> dict[Path, Draft | None]:
    """Each file the import writes, and the model it holds (None: swapd.yaml)."""
    files: dict[Path, Draft | None] = {out / CONFIG: None}
    stems: set[str] = set()
    for draft in found.drafts:
        stem = _stem(draft.model_id, stems)
        if stem != draft.model_id:
            draft.values["name"] = draft.model_id
        files[out / PRESETS / (f"{stem}.yaml" + (DISABLED if draft.refused else ""))] = draft
    return files


def _refuse_if_not_ours(path: Path) -> None:
    """Never replace a file the user wrote: the docs promise to leave it in place."""
    if path.exists() and not _ours(path):
        why = "not written by swapd import-llama-swap; move it away or pick another --out"
        raise FileExistsError(errno.EEXIST, why, str(path))


def preset_files(out: Path) -> list[Path]:
    """The preset files and those kept aside, by name."""
    return sorted(p for p in (out / PRESETS).iterdir() if p.is_file())


def _stem(model_id: str, taken: set[str]) -> str:
    stem = _UNSAFE.sub("_", model_id).lstrip(".") or "model"
    unique, n = stem, 1
    while unique in taken:
        n += 1
        unique = f"{stem}-{n}"
    taken.add(unique)
    return unique


def _config_text(found: Imported, source: Path) -> str:
    lines = [
        f"{MARK} from {source}.",
        "# llama-swap's -listen was a command-line flag: swapd's default address is kept.",
        "# listen: 127.0.0.1:8080",
    ]
    values = {"presets": PRESETS, **found.daemon}
    return "\n".join(lines) + "\n" + render_yaml(values)


def _preset_text(draft: Draft, source: Path) -> str:
    lines = [f"{MARK} from {source}, models.{draft.model_id} (line {draft.line})."]
    if draft.refused:
        lines.append(f"# Kept aside: {draft.refused}. Fix it, then drop the {DISABLED} suffix.")
    lines += [f"# line {n.line}: {n.key}: {n.why}" for n in sorted(draft.notes)]
    return "\n".join(lines) + "\n" + render_yaml(draft.ordered())


def _write(path: Path, text: str, *, private: bool) -> None:
    """Write ``path`` whole; 0600 where it holds keys (as config.yaml held them)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        if private:
            os.fchmod(file.fileno(), 0o600)  # a file from before keeps its mode otherwise
        file.write(text)


def _clear_earlier(out: Path, written: set[Path]) -> list[str]:
    """Remove what an earlier import wrote and this one did not; warn of other presets."""
    warnings = []
    for path in [out / CONFIG, *preset_files(out)]:
        if path in written or not path.exists():
            continue
        if _ours(path):
            path.unlink()
        elif path.suffix in (".yaml", ".yml"):
            warnings.append(f"{path}: not written by this import; swapd reads it too")
    return warnings


def _ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as file:
            return file.readline().startswith(MARK)
    except (OSError, UnicodeDecodeError):
        return False
