"""aiohttp wiring: routes, middleware, start-up and the ordered shutdown.

Start-up: end an earlier run's leftovers, start the reaper, open the probe,
listen, then preload. Shutdown (SIGTERM/SIGINT only set a flag): stop
listening, stop every backend (SIGTERM, grace, SIGKILL, reap), close the probe.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from swapd.auth import Access, access_middleware, access_warnings, add_cors_headers
from swapd.config import Config
from swapd.errors import BadRequest, RequestError, SwapdError, clip
from swapd.instance import InstanceLock
from swapd.limits import Edge, EdgeSite, Limits, fit_fd_limit, track
from swapd.logs import get_logger, new_request_id
from swapd.manager import Manager
from swapd.pidfiles import PidRecords
from swapd.probe import Probe, open_probe
from swapd.proxy import JSON_ROUTES, MULTIPART_ROUTES, Proxy, error_response
from swapd.upstream import UpstreamPool

_log = get_logger("swapd.app")
MANAGER = web.AppKey("manager", Manager)
EDGE = web.AppKey("edge", Edge)
# A client's X-Request-Id is echoed and logged, so it must be a plain token.
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Reaper:
    """The watchdog process that kills our backends' groups if swapd dies (see swapd.reaper)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "swapd.reaper"],
            stdin=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )

    def __call__(self, event: str, pgid: int) -> None:
        """Tell the reaper a group started (``+``) or was reaped (``-``)."""
        if self._proc.stdin is None or self._proc.poll() is not None:
            return
        try:
            self._proc.stdin.write(f"{event}{pgid}\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            _log.error("reaper.gone", pid=self._proc.pid)

    def close(self) -> None:
        """Close the pipe; the reaper kills whatever is still listed and exits."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _refuse_request_id() -> None:
    raise BadRequest("X-Request-Id must be 1 to 128 visible ASCII characters")


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id, answer every error as OpenAI JSON, log one line per request."""
    given = request.headers.get("X-Request-Id")
    request_id = given if given and _REQUEST_ID.match(given) else new_request_id()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 500
    conn = track(request)
    try:
        if given is not None and given != request_id:
            _refuse_request_id()
        response = await handler(request)
        status = response.status
    except RequestError as exc:
        response = error_response(exc)
        status = exc.status
    except web.HTTPException as exc:
        status = exc.status
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        body = {"error": {"message": exc.reason, "type": kind, "code": None, "param": None}}
        response = web.json_response(body, status=exc.status)
    except Exception as exc:  # noqa: BLE001 - the last line of defence, logged with its trace
        # A bug must still answer in the envelope, with its trace in the log, not as text.
        _log.exception("request.error", path=clip(request.path), error=clip(repr(exc), 500))
        message = f"internal error: {type(exc).__name__}: {clip(str(exc), 500)}"
        body = {
            "error": {
                "message": message,
                "type": "server_error",
                "code": "internal_error",
                "param": None,
            }
        }
        response = web.json_response(body, status=500)
    finally:
        if conn is not None:
            conn.request_finished()
        if request.path.startswith("/v1/"):
            _log.info(
                "request.done",
                method=request.method,
                path=clip(request.path),
                model=request.get("model"),
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers["X-Request-Id"] = request_id
    if status == 408:
        response.force_close()  # the rest of the body may still be on its way
    return response


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _models(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    data = [
        {
            "id": view.name,
            "object": "model",
            "created": 0,
            "owned_by": "swapd",
            "aliases": list(view.aliases),
            "status": view.state,
            "tier": view.tier,
        }
        for view in manager.views()
    ]
    return web.json_response({"object": "list", "data": data})


async def _status(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    status = manager.status()
    status["config"] = manager.config.source
    status["pid"] = os.getpid()
    status["connections"] = request.app[EDGE].snapshot()
    return web.json_response(status)


async def _load(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["name"]
    await asyncio.shield(manager.load(name))
    return web.json_response(_one(manager, name))


async def _unload(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["name"]
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    await asyncio.shield(manager.unload(name, force=force))
    return web.json_response(_one(manager, name))


async def _logs(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    count = (
        int(request.query.get("lines", "100")) if request.query.get("lines", "").isdigit() else 100
    )
    name, lines = manager.logs(request.match_info["name"], count)
    return web.json_response({"name": name, "lines": lines})


def _one(manager: Manager, name: str) -> dict[str, object]:
    return manager.view(name).as_json()


def _limits(config: Config, max_connections: int) -> Limits:
    return Limits(max_connections, config.header_timeout, config.keepalive_timeout)


async def _begin_shutdown(app: web.Application) -> None:
    # Runs once the listener is closed, before requests in flight are waited for.
    if MANAGER in app:
        await app[MANAGER].begin_shutdown()


def build_app(
    config: Config,
    probe: Probe,
    *,
    on_group: Callable[[str, int], None],
    edge: Edge | None = None,
) -> web.Application:
    """The aiohttp application with every route; the manager starts with it."""
    access = Access.build(
        listen=config.host,
        api_keys=config.api_keys,
        admin_keys=config.admin_keys,
        allowed_hosts=config.allowed_hosts,
        cors_origins=config.cors_origins,
        metrics_public=config.metrics_public,
    )
    app = web.Application(
        middlewares=[envelope, access_middleware(access)], client_max_size=config.max_body + 1
    )
    app.on_response_prepare.append(add_cors_headers)
    app[EDGE] = edge or Edge(_limits(config, config.max_connections))

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        pool = UpstreamPool()
        manager = Manager(config, probe, pool, on_group=on_group)
        proxy = Proxy(manager, pool, config.max_body, config.body_timeout)
        app[MANAGER] = manager
        await manager.open()
        for path in JSON_ROUTES:
            app.router.add_post(path, proxy.json_route)
        for path in MULTIPART_ROUTES:
            app.router.add_post(path, proxy.multipart_route)
        preload = asyncio.create_task(manager.preload(), name="preload")
        yield
        preload.cancel()
        await manager.close()
        pool.close()

    app.on_shutdown.append(_begin_shutdown)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/swapd/status", _status)
    app.router.add_post("/swapd/models/{name}/load", _load)
    app.router.add_post("/swapd/models/{name}/unload", _unload)
    app.router.add_get("/swapd/models/{name}/logs", _logs)
    app.cleanup_ctx.append(lifecycle)
    return app


async def serve(config: Config) -> None:
    """Run the daemon until SIGTERM, SIGINT or SIGQUIT, then drain and shut down in order.

    Raises :class:`SwapdError` when another swapd holds ``state_dir`` or the port is taken.
    """
    lock = InstanceLock.acquire(config.state_dir)  # before touching any record
    try:
        await _serve_locked(config)
    finally:
        lock.release()


async def _serve_locked(config: Config) -> None:
    ended = PidRecords(config.state_dir).end_leftovers()
    if ended:
        _log.warning("leftover.ended", pids=ended)
    reaper = Reaper()
    fake = os.environ.get("SWAPD_FAKE_PROBE")
    probe, warnings = open_probe(config.devices, fake_file=Path(fake) if fake else None)
    for warning in warnings:
        _log.warning("probe.fallback", detail=warning)
    _log.info("probe.devices", devices=[f"{d.id} ({d.name})" for d in probe.devices])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, stop.set)
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        # Their default action would end the daemon and every backend with it.
        loop.add_signal_handler(
            sig, functools.partial(_log.warning, "swapd.signal.ignored", signal=sig.name)
        )
    for warning in access_warnings(
        listen=config.host,
        port=config.port,
        api_keys=bool(config.api_keys),
        admin_keys=bool(config.admin_keys),
        cors_origins=config.cors_origins,
    ):
        _log.warning("swapd.access", detail=warning)
    max_connections, fd_limit = fit_fd_limit(config.max_connections)
    edge = Edge(_limits(config, max_connections), fd_limit)
    app = build_app(config, probe, on_group=reaper, edge=edge)
    # The drain: stop accepting, then let requests in flight finish within shutdown_timeout.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=config.shutdown_timeout
    )
    try:
        await runner.setup()
        site = EdgeSite(runner, config.host, config.port, edge)
        try:
            await site.start()
        except OSError as exc:
            raise SwapdError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from exc
        _log.info("swapd.listen", host=config.host, port=config.port, models=len(config.presets))
        print(f"swapd: listening on http://{config.host}:{config.port}", flush=True)  # noqa: T201
        await stop.wait()
        _log.info("swapd.shutdown")
    finally:
        await runner.cleanup()
        probe.close()
        reaper.close()
