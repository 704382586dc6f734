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
from collections.abc import Awaitable, Callable
from pathlib import Path

from swapd.config import Config, Stamps, named_files, read_files, stamp_files
from swapd.logs import get_logger

_log = get_logger("swapd.watch")
# While the watch is off, how often to look whether a reload turned it on.
_OFF_POLL = 1.0


def watched_files(config: Config, refused: bool = False) -> list[Path]:
    """The files a reload reads: the config, the preset files, the key files.

    Only those: an editor's swap file beside the presets reloads nothing. ``refused``:
    the config file holds one a reload refused; the files it names are watched too.
    """
    keys = [f for f in (config.api_keys_file, config.admin_keys_file) if f is not None]
    files = read_files(Path(config.source), config.presets_dir, keys)
    if refused:
        presets, named = named_files(Path(config.source))
        files += [f for f in read_files(Path(config.source), presets, named) if f not in files]
    return files


async def _look(config: Config, refused: bool) -> dict[str, tuple[int, int, int]]:
    return await asyncio.to_thread(lambda: stamp_files(watched_files(config, refused)))


def _as_read(read: Stamps, now: Stamps) -> Stamps:
    """What the files held when a load read them (``read``), for each file looked at ``now``.

    A file the load never stamped (named by a config a reload refused) counts as it is now.
    """
    return {name: read.get(name, stamp) for name, stamp in now.items()}


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
    seen: Stamps | None = None
    based_on: Config | None = None  # the running config ``seen`` was taken for
    refused = False  # the config file holds a config a reload refused
    while True:
        config = current()
        every = config.watch_config
        if every <= 0:
            if seen is not None:
                _log.info("config.watch.off")
            seen, based_on, refused = None, None, False
            await asyncio.sleep(_OFF_POLL)
            continue
        now = await _look(config, refused)
        if seen is None or config is not based_on:
            # Started, or a reload (the watch's, SIGHUP's, the route's) runs a new config:
            # compared with what the files held as it read them, so that nothing written
            # since, even while it read them, is missed, and what it read is not read again.
            if seen is None:
                _log.info("config.watch.on", every_s=every, files=len(now))
            seen, based_on, refused = _as_read(config.stamps, now), config, False
        if now != seen:
            await asyncio.sleep(every)
            if await _look(config, refused) != now:
                continue  # still being written: wait until it settles
            _log.info("config.watch.change", files=_changed(seen, now))
            await reload()
            if current() is config:
                # Refused: the old config runs on. Compared from here on with what the
                # reload read (as settled before it), the files the refused one names
                # included: it is tried again when any of them changes, even during it.
                refused = True
                seen = _as_read(now, await _look(config, refused))
            continue
        await asyncio.sleep(every)


def _changed(before: Stamps, after: Stamps) -> list[str]:
    """The files added, removed or changed between two looks."""
    return sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )
