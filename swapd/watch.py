"""``watch_config``: reload when the config, a preset or a key file changes, as SIGHUP does.

For files that something other than an operator rewrites: a Kubernetes ConfigMap (which
swaps a symbolic link), a bind mount edited on the host, keys rotated by a secret store.
Every ``watch_config`` the files are looked at with ``stat`` (size, mtime and inode, links
followed), never opened; a change reloads once they have stayed the same for one more
look, so a burst of writes (an editor, a sync of many presets) is one reload. A config the
reload refuses is logged (``config.reload.fail``) and the old one runs on; it is not tried
again until the files change again, the files it names included (a fix may land in a
presets folder only it reads). A reload can turn the watch on, off, or change its pace.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from swapd.config import Config, named_files
from swapd.logs import get_logger
from swapd.presets import preset_files

_log = get_logger("swapd.watch")
# While the watch is off, how often to look whether a reload turned it on.
_OFF_POLL = 1.0

Fingerprint = tuple[tuple[str, int, int, int], ...]


def watched_files(config: Config, refused: bool = False) -> list[Path]:
    """The files a reload reads: the config, the preset files, the key files.

    Only those: an editor's swap file beside the presets reloads nothing. ``refused``:
    the config file holds one a reload refused; the files it names are watched too.
    """
    keys = [f for f in (config.api_keys_file, config.admin_keys_file) if f is not None]
    files = _files(Path(config.source), config.presets_dir, keys)
    if refused:
        presets, named = named_files(Path(config.source))
        files += [f for f in _files(Path(config.source), presets, named) if f not in files]
    return files


def _files(source: Path, presets: Path, keys: list[Path]) -> list[Path]:
    files = [source]
    with contextlib.suppress(OSError):  # gone or unreadable: the reload says so
        files += preset_files(presets)
    return files + keys


def fingerprint(files: list[Path]) -> Fingerprint:
    """Size, mtime and inode of each file (-1s for one that cannot be read)."""
    found = []
    for file in files:
        try:
            st = file.stat()
        except (OSError, ValueError):  # ValueError: a NUL in a path a refused config named
            found.append((str(file), -1, -1, -1))
            continue
        found.append((str(file), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(found)


async def _look(config: Config, refused: bool) -> Fingerprint:
    return await asyncio.to_thread(lambda: fingerprint(watched_files(config, refused)))


async def watch(current: Callable[[], Config], reload: Callable[[], Awaitable[None]]) -> None:
    """Call ``reload`` whenever the files of ``current()`` change; until cancelled.

    Nothing ends it but the cancel: a failure no check foresaw is logged, and the watch
    starts again from what the files hold then.
    """
    while True:
        try:
            await _watch(current, reload)
        except Exception:  # noqa: BLE001 - the watch must outlive any failure, logged
            _log.exception("config.watch.fail")
            await asyncio.sleep(_OFF_POLL)


async def _watch(current: Callable[[], Config], reload: Callable[[], Awaitable[None]]) -> None:
    seen: Fingerprint | None = None
    refused = False  # the config file holds a config a reload refused
    while True:
        config = current()
        every = config.watch_config
        if every <= 0:
            if seen is not None:
                _log.info("config.watch.off")
            seen, refused = None, False  # turned on later: from what the files hold then
            await asyncio.sleep(_OFF_POLL)
            continue
        now = await _look(config, refused)
        if seen is None:
            _log.info("config.watch.on", every_s=every, files=len(now))
        elif now != seen:
            await asyncio.sleep(every)
            if await _look(config, refused) != now:
                continue  # still being written: wait until it settles
            _log.info("config.watch.change", files=_changed(seen, now))
            await reload()
            refused = current() is config  # a reload that took it runs a new Config
            # What the reload read (its presets folder may move), or what it would have.
            now = await _look(current(), refused)
        seen = now
        await asyncio.sleep(every)


def _changed(before: Fingerprint, after: Fingerprint) -> list[str]:
    """The files added, removed or changed between two looks."""
    old = {entry[0]: entry for entry in before}
    new = {entry[0]: entry for entry in after}
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
