"""API and admin keys: validated where they are written, checked in constant time.

Keys come from the daemon config (``api_keys``, ``admin_keys``) or from files of
one key a line (``api_keys_file``, ``admin_keys_file``), so secrets can stay out
of the config. Errors name where a key was written and never the key itself.
The ring keeps only SHA-256 digests and compares a presented key with every one
of them, so neither the time taken nor an early exit tells which part matched.
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from swapd._yaml import yaml_kind
from swapd.errors import ConfigError, Location

Role = Literal["inference", "admin"]
# A key travels in a header: visible ASCII, no spaces, nothing a proxy could fold or strip.
_KEY = re.compile(r"^[\x21-\x7e]+$")
_KEY_RULE = "visible ASCII characters with no spaces"


def parse_keys(value: Any) -> tuple[str, ...]:
    """A YAML list of keys, each a quoted string (a bare ``0x1f`` would become a number)."""
    if not isinstance(value, list) or not value:
        raise ValueError('expected a list of one or more keys, like ["sk-..."]')
    for number, item in enumerate(value, start=1):
        if not isinstance(item, str):
            raise ValueError(f"key {number}: expected a quoted string, got {yaml_kind(item)}")
        if not _KEY.fullmatch(item):  # match() takes a final newline before its $
            raise ValueError(f"key {number}: expected {_KEY_RULE} (the key is not shown)")
    return tuple(value)


def read_keys_file(path: Path, key: str, where: Location) -> tuple[str, ...]:
    """The keys of a file, one a line; blank lines and lines starting with ``#`` are skipped.

    ``key`` and ``where`` are the config entry that names the file: errors about the file
    as a whole point there, errors about one line point at that line of the file.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(where, key, f"cannot read {path}: {exc.strerror}") from exc
    # Windows editors start a UTF-8 file with a byte order mark: not part of the first key.
    data = data.removeprefix(codecs.BOM_UTF8)
    keys: list[str] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        text = line.decode("ascii", "replace")
        if not _KEY.fullmatch(text):
            reason = f"expected a key of {_KEY_RULE} (the line is not shown)"
            raise ConfigError(Location(str(path), number, 1), key, reason)
        keys.append(text)
    if not keys:
        # An empty file must not quietly turn access control off.
        raise ConfigError(where, key, f"no keys in {path}; remove {key} to run without keys")
    return tuple(keys)


def loose_permissions(path: Path) -> str | None:
    """Why a keys file is readable by more than its owner, or None when it is not."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & 0o077:
        return f"{path} can be read by other users (mode {mode & 0o777:o}); chmod 600 it"
    return None


def _digests(keys: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(k.encode()).digest() for k in keys)


@dataclass(frozen=True)
class KeyRing:
    """Digests of the inference and admin keys; an admin key serves inference too."""

    inference: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, api_keys: Iterable[str], admin_keys: Iterable[str]) -> KeyRing:
        """A ring from plain keys, which it does not keep."""
        return cls(_digests(api_keys), _digests(admin_keys))

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (without keys, every caller is trusted)."""
        return bool(self.inference or self.admin)

    def role(self, presented: bytes | None) -> Role | None:
        """What a presented key may do, or None for no key or an unknown one."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented).digest()
        admin = inference = False
        # Every digest is compared, whatever matched before: `or` after the call.
        for known in self.admin:
            admin = hmac.compare_digest(known, digest) or admin
        for known in self.inference:
            inference = hmac.compare_digest(known, digest) or inference
        if admin:
            return "admin"
        return "inference" if inference else None
