"""A fake OpenAI-compatible backend that tests and benchmarks start as a real subprocess.

Run ``python tests/fakes/upstream.py --port P [options]`` (or ``python -m
tests.fakes.upstream``); ``--help`` lists the options. It imitates what the daemon
cares about in llama-server and vLLM: slow starts (health 503 while loading, or a port
that opens late), fatal exits, ignored SIGTERM, stray child processes, crashes
mid-request, streaming, vLLM's sleep API and memory that is freed late. It only needs
the standard library and aiohttp, and does as little as possible per request because
benchmarks measure the proxy's overhead against it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

# The fake runs as a plain script, where only its own folder is on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fakes import probe_file

if TYPE_CHECKING:
    from fakes.cuda_hold import VramHold

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
ECHO_OBJECTS = {
    "/v1/responses": "response",
    "/v1/rerank": "rerank",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/score": "score",
    "/v1/audio/speech": "speech",
    "/v1/images/generations": "images",
    # The engines' own routes, reached through swapd by a model in the body or /upstream/.
    "/tokenize": "tokens",
    "/detokenize": "content",
    "/infill": "infill",
    "/apply-template": "prompt",
    "/completion": "completion",
    "/completions": "completion",
    "/chat/completions": "chat",
    "/embedding": "embedding",
    "/embeddings": "embedding",
    "/rerank": "rerank",
    "/reranking": "rerank",
    "/v1/reranking": "rerank",
    "/v2/rerank": "rerank",
    "/score": "score",
    "/pooling": "pooling",
    "/classify": "classify",
}


def log(message: str) -> None:
    """Write one line to stderr at once, as the parent may be reading it live."""
    print(f"fake-upstream: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description="A fake OpenAI-compatible backend.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port")
    p.add_argument("--name", default="fake", help="used in answers and /v1/models")
    p.add_argument("--start-delay", type=float, default=0.0, help="seconds until ready")
    p.add_argument(
        "--listen-late",
        action="store_true",
        help="bind only after the start delay (like vLLM) instead of answering 503",
    )
    p.add_argument("--health-path", default="/health")
    p.add_argument(
        "--health-delay", type=float, default=0.0, help="seconds each healthy answer takes"
    )
    p.add_argument("--exit-at-start", type=int, metavar="CODE", help="fail with CODE")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--fork-child", action="store_true", help="start a sleeping grandchild")
    p.add_argument(
        "--setsid-helper",
        action="store_true",
        help="start a helper that leaves the process group (setsid) and keeps our output open",
    )
    p.add_argument("--print-fds", action="store_true", help="print the open descriptors at start")
    p.add_argument(
        "--connections-at-term",
        type=Path,
        metavar="FILE",
        help="on SIGTERM, write how many client connections are still open to FILE",
    )
    p.add_argument("--crash-after", type=int, metavar="N", help="die on completion request N+1")
    p.add_argument("--chunks", type=int, default=5, help="chunks per streamed answer")
    p.add_argument("--chunk-interval", type=float, default=0.05)
    p.add_argument("--probe-file", type=Path, help="memory bookkeeping file")
    p.add_argument("--mem-bytes", type=int, default=0, help="bytes registered when ready")
    p.add_argument(
        "--cuda-bytes", type=int, default=0, help="real VRAM held on GPU 0 while it runs"
    )
    p.add_argument("--release-delay", type=float, default=0.0, help="seconds to free")
    p.add_argument("--sleep-residual-bytes", type=int, default=0, help="bytes while asleep")
    p.add_argument(
        "--vanish-when-ready",
        type=Path,
        metavar="MARKER",
        help="once, while MARKER is absent: stop listening at the first healthy answer, "
        "then exit with 3 a second later (a backend that dies just after it turned ready)",
    )
    return p.parse_args(argv)


@dataclass
class Stats:
    """Counters served on GET /fake/stats."""

    requests: int = 0
    completions: int = 0
    in_flight: int = 0
    cancelled: int = 0
    health_answers: int = 0  # 200s to the health path (liveness probes, once ready)


@dataclass
class Fake:
    """The fake backend's state and its request handlers."""

    args: argparse.Namespace
    ready: bool = False
    child_pid: int | None = None
    held_vram: VramHold | None = None  # the CUDA context and allocation of --cuda-bytes
    server: asyncio.AbstractServer | None = None  # the listening socket (--vanish-when-ready)
    stats: Stats = field(default_factory=Stats)
    awake: asyncio.Event = field(default_factory=asyncio.Event)
    device: str = field(
        default_factory=lambda: (
            "gpu" + (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        )
    )

    def __post_init__(self) -> None:
        self.awake.set()

    # --- memory bookkeeping -------------------------------------------------------

    def register_memory(self, nbytes: int) -> None:
        """Record ``nbytes`` for this process in the probe file, if there is one."""
        if self.args.probe_file is not None:
            probe_file.register(self.args.probe_file, os.getpid(), self.device, nbytes)

    def terminate(self) -> None:
        """Mark the memory as released (after the configured delay) and exit at once."""
        if self.args.probe_file is not None:
            probe_file.release(self.args.probe_file, os.getpid(), self.args.release_delay)
        if self.args.connections_at_term is not None:
            self.args.connections_at_term.write_text(str(self.open_connections()))
        sys.stdout.flush()
        sys.stderr.flush()
        # No graceful shutdown: a real backend drops open connections when killed.
        os._exit(0)

    def open_connections(self) -> int:
        """Clients' connections to this server that their side has not closed."""
        import psutil  # only for --connections-at-term

        return sum(
            1
            for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.args.port
        )

    # --- helpers ------------------------------------------------------------------

    async def read_json(self, request: web.Request) -> Json:
        """Count the POST and return its JSON body (an empty dict when there is none)."""
        self.stats.requests += 1
        raw = await request.read()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise web.HTTPBadRequest(text="body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    async def hold(self, request: web.Request, fake_delay: float) -> None:
        """Count completions, crash when told to, and wait while asleep or delayed."""
        if request.path in COMPLETION_PATHS:
            crash_after = self.args.crash_after
            if crash_after is not None and self.stats.completions >= crash_after:
                log(f"crashing after {crash_after} completion requests")
                os._exit(3)
            self.stats.completions += 1
        # Like vLLM, requests that reach a sleeping engine wait for it to wake.
        await self.awake.wait()
        if fake_delay > 0:
            await asyncio.sleep(fake_delay)

    def tracked(self, handler: Handler) -> Handler:
        """Wrap a handler to count requests in flight and those cut off by the client."""

        async def wrapper(request: web.Request) -> web.StreamResponse:
            self.stats.in_flight += 1
            try:
                return await handler(request)
            except (asyncio.CancelledError, ConnectionResetError):
                self.stats.cancelled += 1
                raise
            finally:
                self.stats.in_flight -= 1

        return wrapper

    # --- routes -------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        """Answer 503 while "loading the model", then 200, like llama-server."""
        if not self.ready:
            return web.json_response(
                {"error": {"code": 503, "message": "Loading model"}}, status=503
            )
        marker = self.args.vanish_when_ready
        if marker is not None and self.server is not None and not marker.exists():
            marker.touch()
            self.server.close()  # new connections are refused from here on
            asyncio.get_running_loop().call_later(1.0, os._exit, 3)
            # Not kept alive either: nothing more reaches this process.
            return web.json_response({"status": "ok"}, headers={"Connection": "close"})
        if self.args.health_delay:
            await asyncio.sleep(self.args.health_delay)
        self.stats.health_answers += 1
        return web.json_response({"status": "ok"})

    async def models(self, _request: web.Request) -> web.Response:
        """List the one model this backend serves."""
        return web.json_response(
            {"object": "list", "data": [{"id": self.args.name, "object": "model"}]}
        )

    async def stats_route(self, _request: web.Request) -> web.Response:
        """Expose counters so tests can see what reached the backend."""
        s = self.stats
        return web.json_response(
            {
                "pid": os.getpid(),
                "child_pid": self.child_pid,
                "requests": s.requests,
                "completions": s.completions,
                "in_flight": s.in_flight,
                "cancelled": s.cancelled,
                "health_answers": s.health_answers,
                "sleeping": not self.awake.is_set(),
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """Answer a chat completion with the last message's text, streamed on request."""
        body = await self.read_json(request)
        await self.hold(request, float(body.get("fake_delay", 0)))
        model = body.get("model", self.args.name)
        if "fake_chunked_error" in body:
            return await self.chunked_error(request, int(body["fake_chunked_error"]), body)
        if body.get("stream") and not body.get("fake_json_answer"):
            return await self.stream(
                request,
                model,
                chat=True,
                first=float(body.get("fake_first_chunk_delay", 0)),
                compress=bool(body.get("fake_compress")),
            )
        messages = body.get("messages") or [{}]
        text = message_text(messages[-1].get("content", ""))
        # ``fake_json_answer``: JSON even to a stream (a backend that takes only a JSON
        # ``true`` for a stream), written over several lines;
        # ``fake_json_pad``: that many more bytes of it.
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"{self.args.name}: {text}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "pad": "x" * int(body.get("fake_json_pad", 0)),
            },
            dumps=functools.partial(json.dumps, indent=2 if body.get("fake_json_answer") else None),
        )

    async def completion(self, request: web.Request) -> web.StreamResponse:
        """Answer a text completion with the prompt, streamed on request."""
        body = await self.read_json(request)
        await self.hold(request, float(body.get("fake_delay", 0)))
        model = body.get("model", self.args.name)
        if "fake_chunked_error" in body:
            return await self.chunked_error(request, int(body["fake_chunked_error"]), body)
        if body.get("stream"):
            return await self.stream(
                request, model, chat=False, first=float(body.get("fake_first_chunk_delay", 0))
            )
        if body.get("fake_bytes"):
            # A large sized answer (Content-Length set), written in pieces as a backend would.
            return await self.big_answer(request, int(body["fake_bytes"]))
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": f"{self.args.name}: {body.get('prompt', '')}",
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "path": request.path,
                "name": self.args.name,
            }
        )

    async def stream(
        self,
        request: web.Request,
        model: str,
        *,
        chat: bool,
        first: float = 0.0,
        compress: bool = False,
    ) -> web.StreamResponse:
        """Send ``--chunks`` server-sent events ``--chunk-interval`` apart, then [DONE].

        The headers go out at once; the first chunk ``first`` seconds later (a prompt
        that takes long to read). ``compress``: in a coding the request's Accept-Encoding
        allows, as a server that compresses its answers.
        """
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        if compress:
            response.enable_compression()
        await response.prepare(request)
        if first > 0:
            await asyncio.sleep(first)
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
        last = self.args.chunks - 1
        for i in range(self.args.chunks):
            if i:
                await asyncio.sleep(self.args.chunk_interval)
            text = f"{self.args.name}-{i}"
            finish = "stop" if i == last else None
            choice: Json = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = (
                    {"role": "assistant", "content": text} if i == 0 else {"content": text}
                )
            else:
                choice["text"] = text
            chunk = {
                "id": chunk_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                # Lets a test compare when a chunk was produced with when it arrived.
                "produced_at": time.time(),
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def chunked_error(
        self, request: web.Request, status: int, body: Json
    ) -> web.StreamResponse:
        """An HTML error of ``status`` in chunks, without a Content-Length.

        ``fake_error_bytes`` pads it to that size, in 64 KiB chunks.
        """
        response = web.StreamResponse(status=status, headers={"Content-Type": "text/html"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"<html><body><h1>Internal Server Error</h1>\n")
        left = int(body.get("fake_error_bytes", 0))
        while left > 0:
            await response.write(b"x" * min(left, 1 << 16))
            left -= 1 << 16
        await response.write(b"<p>the backend broke</p></body></html>\n")
        await response.write_eof()
        return response

    async def big_answer(self, request: web.Request, size: int) -> web.StreamResponse:
        """``size`` bytes of ``x`` with a Content-Length, in 1 MiB writes."""
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        piece = b"x" * (1 << 20)
        left = size
        while left > 0:
            await response.write(piece[: min(left, len(piece))])
            left -= len(piece)
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        """Answer one tiny embedding."""
        body = await self.read_json(request)
        await self.hold(request, float(body.get("fake_delay", 0)))
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.1]}],
                "model": body.get("model", self.args.name),
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
                "path": request.path,
                "name": self.args.name,
            }
        )

    async def echo(self, request: web.Request) -> web.Response:
        """Answer the other inference routes with where the request landed."""
        body = await self.read_json(request)
        await self.hold(request, float(body.get("fake_delay", 0)))
        return web.json_response(
            {
                "object": ECHO_OBJECTS[request.path],
                "model": body.get("model", self.args.name),
                "path": request.path,
                "query": request.query_string,
                "name": self.args.name,
            }
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API: a message with the last message's text, streamed on request.

        ``fake_content``: these content blocks instead of the text; ``fake_json_answer``:
        JSON even to a stream; ``fake_anthropic_error``: an Anthropic error object, in a
        200 JSON answer, with that message.
        """
        body = await self.read_json(request)
        await self.hold(request, float(body.get("fake_delay", 0)))
        if "fake_anthropic_error" in body:
            error = {"type": "overloaded_error", "message": body["fake_anthropic_error"]}
            return web.json_response({"type": "error", "error": error})
        messages = body.get("messages") or [{}]
        text = f"{self.args.name}: {message_text(messages[-1].get('content', ''))}"
        content = body.get("fake_content", [{"type": "text", "text": text}])
        blocks = content if isinstance(content, list) else []
        stop = "tool_use" if any(b.get("type") == "tool_use" for b in blocks) else "end_turn"
        message = {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", self.args.name),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 5},
            # The fake's own, as the echo routes answer: where the request landed.
            "path": request.path,
            "name": self.args.name,
        }
        if body.get("stream") and not body.get("fake_json_answer"):
            return self.message_stream(message, text)
        return web.json_response(message)

    def message_stream(self, message: Json, text: str) -> web.Response:
        """A text message as Anthropic streams it: named events, the text in ``--chunks``."""
        events: list[tuple[str, Json]] = [
            ("message_start", {"message": {**message, "content": [], "stop_reason": None}}),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ]
        size = -(-len(text) // max(self.args.chunks, 1))
        for start in range(0, len(text), size):
            delta = {"type": "text_delta", "text": text[start : start + size]}
            events.append(("content_block_delta", {"index": 0, "delta": delta}))
        events += [
            ("content_block_stop", {"index": 0}),
            ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": message["usage"]}),
            ("message_stop", {}),
        ]
        stream = "".join(
            f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"
            for name, data in events
        )
        return web.Response(text=stream, content_type="text/event-stream")

    async def props(self, request: web.Request) -> web.Response:
        """A GET route of the backend's own (like llama-server's /props), with its query.

        Its Content-Disposition names a file in UTF-8, as a backend's download would.
        """
        self.stats.requests += 1
        return web.json_response(
            {"name": self.args.name, "path": request.path, "query": request.query_string},
            headers={"Content-Disposition": 'attachment; filename="résumé.json"'},
        )

    async def transcription(self, request: web.Request) -> web.StreamResponse:
        """Read a multipart upload and say what was heard; in events when ``stream`` is true."""
        self.stats.requests += 1
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            raise web.HTTPBadRequest(text="multipart field 'file' is missing")
        size = len(upload.file.read())
        model = form.get("model")
        delay = form.get("fake_delay")
        await self.hold(request, float(delay) if isinstance(delay, str) else 0.0)
        heard = f"{self.args.name} heard {upload.filename} ({size} bytes) model={model!s}"
        if form.get("stream") != "true":
            return web.json_response({"text": heard})
        # As vLLM streams a transcription: its text in deltas, then [DONE].
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in heard.split(" "):
            chunk = {"object": "transcription.chunk", "choices": [{"delta": {"content": word}}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def sleep(self, request: web.Request) -> web.Response:
        """Put the "engine" to sleep (vLLM's sleep mode): hold requests, free memory."""
        self.stats.requests += 1
        level = request.query.get("level", "1")
        if level not in {"1", "2"}:
            raise web.HTTPBadRequest(text="level must be 1 or 2")
        self.awake.clear()
        self.register_memory(self.args.sleep_residual_bytes)
        return web.json_response({"status": "sleeping", "level": int(level)})

    async def wake_up(self, _request: web.Request) -> web.Response:
        """Wake the "engine": take the memory back and release held requests."""
        self.stats.requests += 1
        self.register_memory(self.args.mem_bytes)
        self.awake.set()
        return web.json_response({"status": "awake"})

    async def is_sleeping(self, _request: web.Request) -> web.Response:
        """Tell whether the engine sleeps."""
        return web.json_response({"is_sleeping": not self.awake.is_set()})

    def app(self) -> web.Application:
        """Build the aiohttp application with every route."""
        app = web.Application(client_max_size=64 * 1024**2)
        t = self.tracked
        app.router.add_get(self.args.health_path, self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/fake/stats", self.stats_route)
        app.router.add_get("/props", self.props)
        app.router.add_get("/server_info", self.props)  # SGLang's own, as it serves it
        app.router.add_post("/v1/chat/completions", t(self.chat))
        app.router.add_post("/v1/completions", t(self.completion))
        app.router.add_post("/v1/embeddings", t(self.embeddings))
        app.router.add_post("/v1/messages", t(self.messages))
        for path in ECHO_OBJECTS:
            app.router.add_post(path, t(self.echo))
        for path in ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits"):
            app.router.add_post(path, t(self.transcription))
        app.router.add_post("/sleep", self.sleep)
        app.router.add_post("/wake_up", self.wake_up)
        app.router.add_get("/is_sleeping", self.is_sleeping)
        return app


def message_text(content: object) -> str:
    """Return a message's text, whether it is a string or a list of content parts."""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def fork_child() -> int:
    """Start a grandchild in our process group, as backends with worker processes do."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
    print(f"fake-upstream: child pid {child.pid}", flush=True)
    return child.pid


def setsid_helper() -> int:
    """Start a helper that daemonizes (its own session) but keeps our stdout and stderr."""
    code = "import os, time; os.setsid(); time.sleep(10**6)"
    helper = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while os.getsid(helper.pid) == os.getsid(0) and time.monotonic() < deadline:
        time.sleep(0.01)  # ready only once the helper has really left our session
    print(f"fake-upstream: setsid helper pid {helper.pid}", flush=True)
    return helper.pid


def fail_at_start(code: int) -> None:
    """Exit the way a backend does when it cannot load its model."""
    log("loading model")
    log(f"fatal: configured to exit with {code}")
    log("exiting")
    sys.stdout.flush()
    os._exit(code)


async def serve(
    args: argparse.Namespace, make: Callable[[argparse.Namespace], Fake] = Fake
) -> None:
    """Start, become ready after the start delay, and serve until SIGTERM."""
    ready_at = time.monotonic() + args.start_delay
    fake = make(args)
    loop = asyncio.get_running_loop()
    if args.ignore_sigterm:
        loop.add_signal_handler(signal.SIGTERM, log, "ignoring SIGTERM")
    else:
        loop.add_signal_handler(signal.SIGTERM, fake.terminate)
    # Ctrl-C in a terminal ends the fake even when it ignores SIGTERM.
    loop.add_signal_handler(signal.SIGINT, fake.terminate)
    if args.fork_child:
        fake.child_pid = fork_child()
    if args.setsid_helper:
        fake.child_pid = setsid_helper()

    if args.listen_late:
        await asyncio.sleep(args.start_delay)
        if args.exit_at_start is not None:
            fail_at_start(args.exit_at_start)
    runner = web.AppRunner(fake.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    fake.server = site._server  # aiohttp keeps the listening server private
    print(f"fake-upstream: {args.name} listening on {args.host}:{port}", flush=True)

    await asyncio.sleep(ready_at - time.monotonic())
    if args.exit_at_start is not None:
        fail_at_start(args.exit_at_start)
    # Memory is taken before health turns 200, as a real backend loads weights first.
    fake.register_memory(args.mem_bytes)
    held = None
    if args.cuda_bytes:
        from fakes.cuda_hold import hold_vram  # only where a GPU is asked for

        held = hold_vram(args.cuda_bytes)
    fake.held_vram = held
    fake.ready = True
    await asyncio.Event().wait()  # serve until a signal ends the process


def main(argv: list[str] | None = None) -> None:
    """Run the fake upstream."""
    if "--print-fds" in (argv if argv is not None else sys.argv):
        # Before anything of ours opens a file: what the parent let through the exec (the
        # listing itself holds one more, the lowest free number).
        fds = sorted(int(entry.name) for entry in Path("/proc/self/fd").iterdir())
        print(f"fake-upstream: fds {fds}", flush=True)
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
