"""The daemon's current config and what a reload swaps with it.

A reload (SIGHUP, ``systemctl reload``, ``swapd reload``, ``POST /swapd/reload``)
re-reads the config file and every preset. A config with any error is refused
whole and the running one stays. Otherwise the manager takes the new presets
(see :mod:`swapd.reload` for what restarts), and the access checks, the body
limits and the names metrics count under are rebuilt. Keys bound at start (the
listen address, the edge's timers, logging) keep their running values and are
reported as needing a restart. Reloads run one at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from swapd.auth import Access
from swapd.config import Config
from swapd.errors import ConfigError, ConfigErrors, Location, SwapdError, Unavailable
from swapd.logs import get_logger
from swapd.manager import Manager
from swapd.metrics import Metrics
from swapd.notify import Notifier, status_line
from swapd.proxy import Proxy
from swapd.reload import LaunchKey, ReloadPlan, diff, keep_at_start, launch_keys

_log = get_logger("swapd.reload")


def build_access(config: Config) -> Access:
    """The Host, Origin and key checks of a config."""
    return Access.build(
        listen=config.host,
        api_keys=config.api_keys,
        admin_keys=config.admin_keys,
        allowed_hosts=config.allowed_hosts,
        cors_origins=config.cors_origins,
        metrics_public=config.metrics_public,
    )


def model_names(config: Config) -> dict[str, str]:
    """Every name and alias, to the model's name."""
    return {name: p.name for p in config.presets for name in (p.name, *p.aliases)}


@dataclass
class Runtime:
    """The running config, and the pieces of the app that follow it."""

    config: Config
    load: Callable[[], Config]  # reads the config again, with the command line's overrides
    metrics: Metrics = field(default_factory=Metrics)
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    manager: Manager | None = None
    proxy: Proxy | None = None
    access: Access = field(init=False)
    names: dict[str, str] = field(init=False)
    # Each preset's launch as it was when the running config was read (see swapd.reload).
    keys: dict[str, LaunchKey] | None = None
    # READY=1 has gone out (the preloads are done); until then a reload says nothing to
    # systemd, whose start a READY=1 from a reload would end early.
    started: bool = False
    # Shutdown began (STOPPING=1 went out): a reload would only rebuild what is taken down.
    stopping: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    def __post_init__(self) -> None:
        self._follow(self.config)

    def _follow(self, config: Config) -> None:
        self.access = build_access(config)
        self.names = model_names(config)
        if self.proxy is not None:
            self.proxy.max_body = config.max_body
            self.proxy.body_timeout = config.body_timeout
            self.proxy.send_timeout = config.send_timeout

    def allows(self, request: web.Request) -> bool:
        """Whether the running config's checks let ``request`` in: a stream's, after a reload."""
        return self.access.allows(request)

    async def remember_launches(self) -> None:
        """Read every preset's launch key, for the first reload to compare with."""
        self.keys = await asyncio.to_thread(launch_keys, self.config)

    async def reload(self) -> ReloadPlan:
        """Re-read the config; raise :class:`SwapdError` (the running config stays) when bad."""
        async with self._lock:
            if self.stopping:
                raise _skipped()
            if self.started:
                self.notifier.reloading()
            try:
                plan = await self._reload()
            except Unavailable:
                raise  # shutdown began while the files were read: nothing applied, no READY=1
            except SwapdError as exc:
                errors = exc.errors if isinstance(exc, ConfigErrors) else (exc,)
                _log.error("config.reload.fail", errors=[str(e) for e in errors])
                self._ready(f"reload refused ({len(errors)} error(s)); running the old config")
                raise
            except Exception as exc:
                # Reading the files failed in a way no check foresaw: still a refusal, with
                # the reason, and systemd hears READY=1 after its RELOADING=1.
                reason = f"the config could not be read: {type(exc).__name__}: {exc}"
                _log.exception("config.reload.fail", errors=[reason])
                self._ready("reload refused (1 error(s)); running the old config")
                raise SwapdError(reason) from exc
            self._ready(None)
            return plan

    async def _reload(self) -> ReloadPlan:
        new = await asyncio.to_thread(self.load)
        if new.empty and not self.config.empty:
            raise ConfigErrors([_empty(new.source)])
        plan, keys = await asyncio.to_thread(diff, self.config, new, self.keys)
        if self.stopping:
            raise _skipped()
        self.keys = keys
        new = keep_at_start(self.config, new)
        if self.manager is not None:
            self.manager.reload(new, plan)
        self.config = new
        self._follow(new)
        _log.info("config.reload", source=new.source, **plan.as_json())
        if plan.restart_needed:
            _log.warning("config.reload.restart_needed", keys=list(plan.restart_needed))
        return plan

    def _ready(self, note: str | None) -> None:
        line = status_line(self.manager.views()) if self.manager is not None else "starting"
        status = f"{line}; {note}" if note else line
        if self.started:
            self.notifier.ready(status)
        else:
            self.notifier.send(f"STATUS={status}")


def _empty(source: str) -> ConfigError:
    # A file caught half written (truncated, then written again): read as every default, it
    # would drop the keys and switch the watch off before the rest arrived.
    reason = (
        "sets no key (caught while being written?); the running config stays. To run on"
        " every default, set one key to its default, as `log_level: info`"
    )
    return ConfigError(Location(source, 1, 1), "(file)", reason)


def _skipped() -> Unavailable:
    _log.info("config.reload.skipped", reason="shutting down")
    return Unavailable("swapd is shutting down: the config was not reloaded")
