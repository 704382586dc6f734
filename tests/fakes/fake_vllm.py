"""A fake ``vllm`` executable: vLLM's command line and sleep API over the fake upstream.

``fake_vllm.py serve MODEL [vLLM flags] --host H --port P`` runs the fake upstream
(``upstream.py``) the way swapd runs vLLM. What it adds is what the tiers depend on:

- the sleep endpoints exist only with ``VLLM_SERVER_DEV_MODE=1`` (404 otherwise);
- ``--enable-sleep-mode`` is refused at start, exiting 1 with vLLM's CPU message, when
  ``FAKE_VLLM_REFUSE_SLEEP_MODE=1`` (the CPU build refuses it);
- ``FAKE_VLLM_HOLD_BYTES`` bytes of real memory are held while awake: released at
  ``/sleep`` (level 1 and 2) and taken back at ``/wake_up``, so host RAM readings move;
  so is the GPU memory of the fake upstream's ``--cuda-bytes`` (the CUDA context stays,
  as vLLM's does while it sleeps);
- ``/sleep`` aborts the streams that are running, as vLLM aborts running requests;
- ``FAKE_VLLM_SLEEP_DELAY`` seconds pass before a ``/sleep`` answers (a slow offload);
- ``/wake_up?tags=T`` wakes only the tags named, as vLLM's does: it serves (and
  ``/is_sleeping`` says false) only once ``weights`` and ``kv_cache`` are both awake;
- level 2 discards the weights (only when started with ``--enable-sleep-mode``: without
  it vLLM's sleep frees nothing), so until ``POST /collective_rpc {"method":
  "reload_weights"}`` has run a chat completion answers garbage, as vLLM's uninitialised
  weights do; that reload takes ``FAKE_VLLM_RELOAD_DELAY`` seconds and logs
  ``reload_weights``, and ``FAKE_VLLM_NO_RPC=1`` leaves ``/collective_rpc`` out (a build
  without it).

``FAKE_VLLM_UPSTREAM_ARGS`` passes extra options to the fake upstream (``--probe-file``,
``--mem-bytes``, ``--chunks`` ...).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fakes import upstream

PAGE = mmap.PAGESIZE
HOLD_ENV = "FAKE_VLLM_HOLD_BYTES"
# vLLM's executor puts both to sleep at every level (v1/executor/abstract.py SLEEP_TAGS).
SLEEP_TAGS = frozenset({"weights", "kv_cache"})
GARBAGE = "<uninitialised weights>"


class Held:
    """Anonymous memory that is really resident (every page touched) until released."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._map: mmap.mmap | None = None

    def take(self) -> None:
        """Map and touch ``nbytes``; a no-op while held."""
        if self._map is not None or self.nbytes <= 0:
            return
        self._map = mmap.mmap(-1, self.nbytes)
        for offset in range(0, self.nbytes, PAGE):
            self._map[offset] = 1

    def release(self) -> None:
        """Unmap, which gives the pages back to the system at once."""
        if self._map is not None:
            self._map.close()
            self._map = None


@dataclass
class FakeVllm(upstream.Fake):
    """The fake upstream with vLLM's sleep semantics."""

    held: Held = field(default_factory=lambda: Held(int(os.environ.get(HOLD_ENV, "0"))))
    streams: set[asyncio.Task[object]] = field(default_factory=set)
    sleeping_tags: set[str] = field(default_factory=set)
    weights_lost: bool = False  # a level-2 sleep discarded them; reload_weights reads them
    sleep_mode: bool = field(default_factory=lambda: "--enable-sleep-mode" in sys.argv)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.held.take()

    async def stream(
        self,
        request: web.Request,
        model: str,
        *,
        chat: bool,
        first: float = 0.0,
        compress: bool = False,
    ) -> web.StreamResponse:
        """Stream as the fake upstream does; a sleep cancels it (the connection is cut)."""
        task = asyncio.current_task()
        assert task is not None
        self.streams.add(task)
        try:
            return await super().stream(request, model, chat=chat, first=first, compress=compress)
        finally:
            self.streams.discard(task)

    async def sleep(self, request: web.Request) -> web.Response:
        """Abort running streams, free the held memory, hold new requests."""
        for task in list(self.streams):
            upstream.log("sleep: aborting a running request")
            task.cancel()
        await asyncio.sleep(float(os.environ.get("FAKE_VLLM_SLEEP_DELAY", "0")))
        answer = await super().sleep(request)
        self.held.release()
        if self.held_vram is not None:
            self.held_vram.release()
        self.sleeping_tags = set(SLEEP_TAGS)
        # vLLM's Worker.sleep(level=2) keeps only the model's buffers: the weights are gone.
        # Without sleep mode (the CPU build, CPUWorker.sleep) a sleep only pauses.
        level2 = self.sleep_mode and request.query.get("level") == "2"
        self.weights_lost = self.weights_lost or level2
        return answer

    async def wake_up(self, request: web.Request) -> web.Response:
        """Wake the tags named (all without ``tags``); serve again once none sleeps.

        As vLLM's EngineCore.wake_up: the scheduler resumes only when fully awake, and
        the answer says ``sleeping`` until then.
        """
        tags = request.query.getall("tags", [])
        self.sleeping_tags -= set(tags) if tags else SLEEP_TAGS
        if self.sleeping_tags:
            self.stats.requests += 1
            return web.json_response({"status": "sleeping", "tags": tags})
        self.held.take()
        if self.held_vram is not None:
            self.held_vram.take()
        await super().wake_up(request)
        return web.json_response({"status": "awake", "tags": tags or None})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        """vLLM's ``/collective_rpc``: ``reload_weights`` reads the weights again."""
        body = await self.read_json(request)
        if body.get("method") == "reload_weights":
            upstream.log("collective_rpc: reload_weights")
            await asyncio.sleep(float(os.environ.get("FAKE_VLLM_RELOAD_DELAY", "0")))
            self.weights_lost = False
        return web.json_response({"results": [None]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """The fake upstream's answer, or garbage while the weights are lost."""
        answer = await super().chat(request)
        if not self.weights_lost:
            return answer
        message = {"role": "assistant", "content": GARBAGE}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response({"choices": [choice]})

    def app(self) -> web.Application:
        """The fake upstream's routes; without dev mode the sleep API is not there."""
        app = super().app()
        if os.environ.get("VLLM_SERVER_DEV_MODE") != "1":
            app = web.Application()
            kept = upstream.Fake.app(self)
            for route in kept.router.routes():
                path = route.resource.canonical if route.resource else ""
                if path not in ("/sleep", "/wake_up", "/is_sleeping"):
                    app.router.add_route(route.method, path, route.handler)
        elif os.environ.get("FAKE_VLLM_NO_RPC") != "1":
            app.router.add_post("/collective_rpc", self.collective_rpc)
        return app


def main() -> None:
    """Translate vLLM's command line and run the fake."""
    argv = sys.argv[1:]
    if not argv or argv[0] != "serve" or len(argv) < 2:
        sys.exit("usage: fake_vllm.py serve MODEL [flags] --host H --port P")
    flags = argv[2:]
    if "--enable-sleep-mode" in flags and os.environ.get("FAKE_VLLM_REFUSE_SLEEP_MODE") == "1":
        print("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig")
        print("  Value error, Sleep mode is not supported on current platform.", flush=True)
        sys.exit(1)

    def value(flag: str, default: str) -> str:
        return flags[flags.index(flag) + 1] if flag in flags else default

    names = []
    if "--served-model-name" in flags:
        for item in flags[flags.index("--served-model-name") + 1 :]:
            if item.startswith("--"):
                break
            names.append(item)
    args = upstream.parse_args(
        [
            "--host",
            value("--host", "127.0.0.1"),
            "--port",
            value("--port", "0"),
            "--name",
            names[0] if names else argv[1],
            *shlex.split(os.environ.get("FAKE_VLLM_UPSTREAM_ARGS", "")),
        ]
    )
    asyncio.run(upstream.serve(args, FakeVllm))


if __name__ == "__main__":
    main()
