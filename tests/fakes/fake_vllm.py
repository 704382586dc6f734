"""A fake ``vllm`` executable: vLLM's command line and sleep API over the fake upstream.

``fake_vllm.py serve MODEL [vLLM flags] --host H --port P`` runs the fake upstream
(``upstream.py``) the way swapd runs vLLM. What it adds is what the tiers depend on:

- the sleep endpoints exist only with ``VLLM_SERVER_DEV_MODE=1`` (404 otherwise);
- ``--enable-sleep-mode`` is refused at start, exiting 1 with vLLM's CPU message, when
  ``FAKE_VLLM_REFUSE_SLEEP_MODE=1`` (the CPU build refuses it);
- ``FAKE_VLLM_HOLD_BYTES`` bytes of real memory are held while awake: released at
  ``/sleep`` (level 1 and 2) and taken back at ``/wake_up``, so host RAM readings move;
- ``/sleep`` aborts the streams that are running, as vLLM aborts running requests;
- ``FAKE_VLLM_SLEEP_DELAY`` seconds pass before a ``/sleep`` answers (a slow offload).

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
        return answer

    async def wake_up(self, request: web.Request) -> web.Response:
        """Take the memory back, then serve again."""
        self.held.take()
        return await super().wake_up(request)

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
