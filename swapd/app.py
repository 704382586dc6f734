"""aiohttp wiring: middleware, routes, start-up, reload and the ordered shutdown.

Start-up: end an earlier run's leftovers, start the reaper, open the probe,
listen, preload (pushing systemd's start deadline meanwhile), then ``READY=1``.
SIGHUP reloads the config (``RELOADING=1`` ... ``READY=1``). Shutdown
(SIGTERM, SIGINT, SIGQUIT only set a flag): ``STOPPING=1``, stop listening,
drain, stop every backend (SIGTERM, grace, SIGKILL, reap), close the probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from swapd import marks, notify
from swapd._exchange import CLIENT_GONE, EXCHANGE, Exchange
from swapd.auth import CORS_ORIGIN, access_warnings, add_cors_headers, listen_address
from swapd.catalog import Catalog
from swapd.config import Config
from swapd.control import Control
from swapd.errors import BadRequest, RequestError, SwapdError, clip
from swapd.instance import InstanceLock
from swapd.keepalive import ColdStreams
from swapd.limits import Edge, EdgeSite, Limits, fit_fd_limit, track
from swapd.logs import REQUEST_ID, HotLogger, get_logger, new_request_id
from swapd.manager import Manager
from swapd.passthrough import ENGINE_ROUTES, Passthrough
from swapd.pidfiles import PidRecords
from swapd.probe import Probe, open_probe
from swapd.proxy import JSON_ROUTES, MULTIPART_ROUTES, Proxy, error_response
from swapd.runtime import Runtime
from swapd.upstream import UpstreamPool
from swapd.watch import watch

_log = get_logger("swapd.app")
_done_log = HotLogger("swapd.app")  # one line per request: the cheaper renderer
MANAGER = web.AppKey("manager", Manager)
EDGE = web.AppKey("edge", Edge)
RUNTIME = web.AppKey("runtime", Runtime)
CONTROL = web.AppKey("control", Control)
# The routes that lease a model: a request refused before its handler ran (401, 403) is
# counted on them too, as the handler would have counted it.
MODEL_RESOURCES: web.AppKey[frozenset[web.AbstractResource]] = web.AppKey("model_resources")
# A client's X-Request-Id is echoed and logged, so it must be a plain token.
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
PRELOAD = web.AppKey("preload", asyncio.Task[None])
# Routes beyond the proxy's own whose JSON body names the model.
EXTRA_JSON_ROUTES = ("/v1/messages/count_tokens", *ENGINE_ROUTES)
UPSTREAM_ROUTE = "/upstream/{target:.+}"
# Status logged and counted for a request still running when the drain's time was up
# (swapd cut it); CLIENT_GONE (swapd._exchange) for a client that hung up or stalled.
CUT_AT_SHUTDOWN = 503
# Past the drain and the longest stop, what a shutdown may still take (the reaper, cgroups).
_STOP_MARGIN_S = 30.0
# The least time between two starts of the reaper: one that dies at once is no busy loop.
_REAPER_RESTART_GAP_S = 1.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Reaper:
    """The watchdog process that kills our backends' groups if swapd dies (see swapd.reaper).

    One that dies while swapd runs (killed by hand, by the OOM killer) is started again and
    told every group still running: else a later SIGKILL of swapd would leave what the
    backends forked behind, with nothing said.
    """

    def __init__(self) -> None:
        self._groups: set[int] = set()  # running groups: what a new reaper is told
        self._closed = False
        self._proc = self._start()

    @staticmethod
    def _start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "swapd.reaper", marks.RUN_ID],
            stdin=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )

    def __call__(self, event: str, pgid: int) -> None:
        """Tell the reaper a group started (``+``) or was reaped (``-``)."""
        if event == "+":
            self._groups.add(pgid)
        else:
            self._groups.discard(pgid)
        if self._proc.poll() is not None:
            self._renew()  # tells the new one this group too
        else:
            self._write(f"{event}{pgid}\n")

    def _write(self, text: str) -> None:
        if self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(text)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it died just now: keep() starts another, told every group

    def _renew(self) -> None:
        """Start a reaper in place of the dead one and tell it every running group."""
        if self._closed:
            return
        old = self._proc
        if old.stdin is not None:
            with contextlib.suppress(OSError):  # what it never read cannot be flushed
                old.stdin.close()
        _log.error("reaper.gone", pid=old.pid, code=old.returncode)
        self._proc = self._start()
        self._write("".join(f"+{pgid}\n" for pgid in sorted(self._groups)))

    async def keep(self) -> None:
        """Start the reaper again whenever it dies, for as long as swapd runs."""
        while True:
            await _exited(self._proc)
            if self._proc.poll() is not None:  # not already started again by a group event
                self._renew()
                await asyncio.sleep(_REAPER_RESTART_GAP_S)  # one that dies at once: no spin

    def close(self) -> None:
        """Close the pipe; the reaper kills whatever is still listed and exits."""
        self._closed = True
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()


async def _exited(proc: subprocess.Popen[str]) -> None:
    """Return once ``proc`` has exited: told by a pidfd, else looked for every second."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # reaped already, or a kernel without pidfds
        while proc.poll() is None:  # noqa: ASYNC110 - no pidfd to wait on here
            await asyncio.sleep(1)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:  # again and again until removed: once is enough
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        if proc.poll() is None:  # else reaped before the open: the pid may be another's now
            await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _refuse_request_id() -> None:
    raise BadRequest("X-Request-Id must be 1 to 128 visible ASCII characters")


def _internal_error(request: web.Request, exc: Exception) -> web.Response:
    # A bug must still answer in the envelope, with its trace in the log, not as text.
    _log.exception("request.error", path=clip(request.path), error=clip(repr(exc), 500))
    message = f"internal error: {type(exc).__name__}: {clip(str(exc), 500)}"
    error = {"message": message, "type": "server_error", "code": "internal_error", "param": None}
    return web.json_response({"error": error}, status=500)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusal (404, 405, 413...) in the OpenAI envelope, its Allow kept."""
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    message = exc.reason
    allowed = exc.headers.get(hdrs.ALLOW)
    # The bare reason leaves a user guessing: say what was asked, and what would work.
    asked = f"{request.method} {clip(request.path, 200)}"
    if exc.status == 404:
        message = f"{message}: no route {asked}"
    elif exc.status == 405 and allowed:
        message = f"{message}: {asked} takes {allowed.replace(',', ', ')}"
    body = {"error": {"message": message, "type": kind, "code": None, "param": None}}
    response = web.json_response(body, status=exc.status)
    if allowed is not None:  # a 405 says which methods the route takes
        response.headers[hdrs.ALLOW] = allowed
    return response


def make_envelope(runtime: Runtime | None) -> Middleware:
    """The envelope middleware, checking and counting with ``runtime`` (None: neither)."""

    @web.middleware
    async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Bind a request id, check access, answer errors as OpenAI JSON, log and count.

        The access checks are those of the running config (a reload swaps them); they run
        in this frame rather than a middleware of their own, one coroutine less a request.
        """
        given = request.headers.get("X-Request-Id")
        request_id = given if given and _REQUEST_ID.match(given) else new_request_id()
        # The header goes on at prepare (streams too); clones (/upstream/) share the object.
        request[EXCHANGE] = exchange = Exchange(request_id, time.perf_counter())
        bound = REQUEST_ID.set(request_id)  # as bind_contextvars(request_id=...) does
        status = 500
        conn = track(request)
        try:
            if given is not None and given != request_id:
                _refuse_request_id()
            early = None if runtime is None else runtime.access.admit(request)
            response = early if early is not None else await handler(request)
            status = exchange.stream_error or response.status
        except RequestError as exc:
            response = error_response(exc)
            status = exc.status
            # Refused by the checks before its handler could count it: counted all the same.
            exchange.counted = exchange.counted or _leases_a_model(request)
        except web.HTTPException as exc:
            status = exc.status
            response = _http_error(request, exc)
        except asyncio.CancelledError:
            # The client hung up (aiohttp cancels the handler), or the drain's time ran out.
            status = CUT_AT_SHUTDOWN if conn is not None and conn.cut_at_shutdown else CLIENT_GONE
            raise
        except ConnectionResetError:
            # The client hung up while its answer was being written: nothing left to send to.
            status = CLIENT_GONE
            response = web.Response(status=CLIENT_GONE)
        except Exception as exc:  # noqa: BLE001 - the last line of defence, logged with its trace
            response = _internal_error(request, exc)
        finally:
            if conn is not None:
                conn.request_finished()
            # After this turn: a sized answer is written when the handler returns, so the
            # log line and metrics no longer lie between the backend's answer and the client.
            # The callback keeps this context, request id included. An answer prepared by
            # the handler (a relayed stream) began by now: its time counts whatever the end
            # (a 499, a cut); swapd's own error answers are prepared only after this.
            began = exchange.first_byte
            asyncio.get_running_loop().call_soon(_done, request, runtime, status, exchange, began)
            REQUEST_ID.reset(bound)
        if status == 408:
            response.force_close()  # the rest of the body may still be on its way
        return response

    return envelope


def _leases_a_model(request: web.Request) -> bool:
    """Whether the request's route is one that leases a model (its handler counts it)."""
    resources = request.app.get(MODEL_RESOURCES, frozenset())
    return request.match_info.route.resource in resources


def _done(
    request: web.Request,
    runtime: Runtime | None,
    status: int,
    exchange: Exchange,
    began: float | None,
) -> None:
    """One ``request.done`` line per inference request, and its metrics.

    ``began``: when the backend's answer began reaching the client, if the handler sent it.
    """
    counted = exchange.counted
    if not (counted or request.path.startswith("/v1/")):
        return
    elapsed = time.perf_counter() - exchange.started
    model = request.get("model")
    _done_log.info(
        "request.done",
        method=request.method,
        path=clip(request.path),
        model=clip(model) if model else model,
        status=status,
        ms=round(elapsed * 1000, 2),
    )
    if runtime is None or not counted:
        return
    first = None
    if began is not None:
        first = began - exchange.started
    elif status < 400:
        # A sized answer is prepared after the handler returns: it is whole by now.
        first = (exchange.first_byte or time.perf_counter()) - exchange.started
    label = runtime.names.get(model, "") if model else ""  # configured names only
    runtime.metrics.request_done(label, status, elapsed, first)


envelope = make_envelope(None)  # for an app of its own (tests): no checks, no metrics


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers are about to go: the request id on every answer, CORS, the first byte's time."""
    # Set only from an Origin header: most requests have none, and a miss in the request's
    # state costs a raised and caught KeyError.
    if "Origin" in request.headers and CORS_ORIGIN in request:
        await add_cors_headers(request, response)
    try:
        exchange = request[EXCHANGE]
    except KeyError:  # not through the envelope (a test's own app)
        return
    response.headers["X-Request-Id"] = exchange.request_id
    if exchange.first_byte is None and response is not exchange.ping_stream:
        exchange.first_byte = time.perf_counter()


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _limits(config: Config, max_connections: int) -> Limits:
    return Limits(max_connections, config.header_timeout, config.keepalive_timeout)


async def _begin_shutdown(app: web.Application) -> None:
    # Runs once the listener is closed, before requests in flight are waited for.
    if CONTROL in app:
        app[CONTROL].close()  # streams of events and logs never end by themselves
    if MANAGER in app:
        await app[MANAGER].begin_shutdown()


def _model_routes(app: web.Application, proxy: Proxy) -> None:
    """Routes that lease a model: their handlers mark the exchange ``counted`` for metrics."""
    router = app.router
    cold = ColdStreams(proxy)
    routes = [router.add_post(path, cold.json_route) for path in (*JSON_ROUTES, *EXTRA_JSON_ROUTES)]
    routes += [router.add_post(path, cold.multipart_route) for path in MULTIPART_ROUTES]
    routes.append(router.add_route("*", UPSTREAM_ROUTE, Passthrough(proxy).route))
    app[MODEL_RESOURCES] = frozenset(r.resource for r in routes if r.resource is not None)


def build_app(
    runtime: Runtime,
    probe: Probe,
    *,
    on_group: Callable[[str, int], None],
    edge: Edge | None = None,
) -> web.Application:
    """The aiohttp application with every route; the manager starts with it."""
    config = runtime.config
    app = web.Application(middlewares=[make_envelope(runtime)], client_max_size=config.max_body + 1)
    app.on_response_prepare.append(_on_prepare)
    app[EDGE] = edge or Edge(_limits(config, config.max_connections))
    app[RUNTIME] = runtime

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        pool = UpstreamPool()
        manager = Manager(runtime.config, probe, pool, on_group=on_group, metrics=runtime.metrics)
        config = runtime.config
        proxy = Proxy(manager, pool, config.max_body, config.body_timeout, config.send_timeout)
        app[MANAGER] = runtime.manager = manager
        runtime.proxy = proxy
        await manager.open()
        _model_routes(app, proxy)
        catalog = Catalog(manager)
        app.router.add_get("/v1/models", catalog.list)
        app.router.add_get("/v1/models/{id:.+}", catalog.one)
        app[CONTROL] = Control(manager, app[EDGE], runtime.metrics, runtime.reload, runtime.allows)
        app[CONTROL].add_routes(app.router)
        preload = asyncio.create_task(manager.preload(), name="preload")
        app[PRELOAD] = preload
        yield
        preload.cancel()
        await manager.close()
        pool.close()

    app.on_shutdown.append(_begin_shutdown)
    app.router.add_get("/health", _health)
    app.cleanup_ctx.append(lifecycle)
    return app


async def serve(config: Config, load: Callable[[], Config] | None = None) -> None:
    """Run the daemon until SIGTERM, SIGINT or SIGQUIT, then drain and shut down in order.

    ``load`` reads the config again for a reload (default: the same file).
    Raises :class:`SwapdError` when another swapd holds ``state_dir`` or the port is taken.
    """
    lock = InstanceLock.acquire(config.state_dir)  # before touching any record
    try:
        await _serve_locked(config, load or (lambda: config))
    finally:
        lock.release()


def _signals(stop: asyncio.Event, reload: Callable[[], None], runtime: Runtime) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, _stop_or_force, stop, runtime)
    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        # Their default action would end the daemon and every backend with it.
        loop.add_signal_handler(
            sig, functools.partial(_log.warning, "swapd.signal.ignored", signal=sig.name)
        )


def _stop_or_force(stop: asyncio.Event, runtime: Runtime) -> None:
    """The first signal begins the drain; one during it (Ctrl-C again) kills the backends.

    Shutdown then ends as soon as their groups are reaped, not after ``shutdown_timeout``
    and each ``stop_timeout``.
    """
    if not stop.is_set():
        stop.set()
        return
    _log.warning("swapd.shutdown.forced", detail="a second signal: every backend is killed now")
    if runtime.manager is not None:
        runtime.manager.kill_all()


async def _serve_locked(config: Config, load: Callable[[], Config]) -> None:
    notifier = notify.Notifier.from_env()
    ended = PidRecords(config.state_dir).end_leftovers()
    if ended:
        _log.warning("leftover.ended", pids=ended)
    reaper = Reaper()
    fake = os.environ.get("SWAPD_FAKE_PROBE")
    probe, warnings = open_probe(config.devices, fake_file=Path(fake) if fake else None)
    for warning in warnings:
        _log.warning("probe.fallback", detail=warning)
    _log.info("probe.devices", devices=[f"{d.id} ({d.name})" for d in probe.devices])
    runtime = Runtime(config, load, notifier=notifier)
    await runtime.remember_launches()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()  # strong references until they finish

    _signals(stop, functools.partial(_reload_on_signal, runtime, stop, tasks), runtime)
    _warn_about_access(config)
    max_connections, fd_limit = fit_fd_limit(config.max_connections)
    edge = Edge(_limits(config, max_connections), fd_limit)
    app = build_app(runtime, probe, on_group=reaper, edge=edge)
    # The drain: stop accepting, then let requests in flight finish within shutdown_timeout.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=config.shutdown_timeout
    )
    watchdog = asyncio.create_task(notify.watchdog(notifier), name="watchdog")
    try:
        tasks.add(asyncio.create_task(reaper.keep(), name="reaper"))
        # From the start, as SIGHUP: files changed while preloads run are not missed.
        watcher = watch(lambda: runtime.config, functools.partial(_reload_unless, runtime, stop))
        tasks.add(asyncio.create_task(watcher, name="watch"))
        await runner.setup()
        site = EdgeSite(runner, config.host, config.port, edge)
        try:
            await site.start()
        except OSError as exc:
            raise SwapdError(
                f"cannot listen on {listen_address(config.host, config.port)}: "
                f"{exc.strerror or exc}"
            ) from exc
        _log.info("swapd.listen", host=config.host, port=config.port, models=len(config.presets))
        if sys.stdout.isatty():  # off a terminal the swapd.listen event says it
            print(f"swapd: listening on {site.name}", flush=True)  # noqa: T201
        await _until_ready(app, notifier, stop)
        # What start built lives as long as swapd: keep it out of the collector's full
        # passes, which otherwise walk it all (a gen-2 collection took 10-12 ms).
        gc.collect()
        gc.freeze()
        if notifier.enabled:  # the line reads every model: none is read for nobody
            tasks.add(_status_updates(notifier, app[MANAGER]))
        await stop.wait()
        _log.info("swapd.shutdown")
        runtime.stopping = True
        notifier.stopping()
    finally:
        for task in (watchdog, *tasks):
            task.cancel()
        await _cleanup(runner, notifier, runtime.config)
        probe.close()
        reaper.close()
        notifier.close()


def _status_updates(notifier: notify.Notifier, manager: Manager) -> asyncio.Task[None]:
    """systemd's STATUS line, kept up to date."""
    updates = notify.status_updates(notifier, manager.views, manager.changes.wait)
    return asyncio.create_task(updates, name="status")


def _warn_about_access(config: Config) -> None:
    for warning in access_warnings(
        listen=config.host,
        port=config.port,
        api_keys=bool(config.api_keys),
        admin_keys=bool(config.admin_keys),
        cors_origins=config.cors_origins,
        allowed_hosts=config.allowed_hosts,
    ):
        _log.warning("swapd.access", detail=warning)


async def _cleanup(runner: web.AppRunner, notifier: notify.Notifier, config: Config) -> None:
    """The drain, then every backend's stop; systemd hears that it goes on (EXTEND).

    For as long as they should take (the drain, the longest stop, a margin), no longer.
    """
    stop_timeout = max((p.stop_timeout for p in config.presets), default=0.0)
    bound = config.shutdown_timeout + stop_timeout + _STOP_MARGIN_S
    cleanup = asyncio.ensure_future(runner.cleanup())
    extend = asyncio.create_task(notify.extend_while(notifier, cleanup, at_most=bound))
    try:
        await cleanup
    finally:
        extend.cancel()


async def _until_ready(
    app: web.Application, notifier: notify.Notifier, stop: asyncio.Event
) -> None:
    """Wait for the preloads (pushing systemd's start deadline), then say READY=1."""
    preload = app[PRELOAD]
    stopping = asyncio.create_task(stop.wait())
    try:
        extend = asyncio.create_task(notify.extend_while(notifier, preload))
        await asyncio.wait({preload, stopping}, return_when=asyncio.FIRST_COMPLETED)
        extend.cancel()
    finally:
        stopping.cancel()
    if stop.is_set():
        return
    app[RUNTIME].started = True
    notifier.ready(notify.status_line(app[MANAGER].views()))
    _log.info("swapd.ready")


def _reload_on_signal(
    runtime: Runtime, stop: asyncio.Event, tasks: set[asyncio.Task[None]]
) -> None:
    """SIGHUP: reload in a task (kept in ``tasks``), unless shutdown has begun."""
    if stop.is_set():  # a reload would only rebuild what is being taken down
        _log.info("config.reload.skipped", reason="shutting down")
        return
    task = asyncio.create_task(_reload(runtime), name="reload")
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _reload_unless(runtime: Runtime, stop: asyncio.Event) -> None:
    """A reload the watch asked for, unless shutdown has begun."""
    if not stop.is_set():
        await _reload(runtime)


async def _reload(runtime: Runtime) -> None:
    with contextlib.suppress(SwapdError):  # logged, and the old config stays
        await runtime.reload()
