"""What finding a request's ``model`` costs swapd, against ``json.loads`` of the same body.

Bodies as clients send them, ``model`` last (openai-python writes ``messages``
first), and for scale one with ``model`` first (curl examples) and a hostile
64 MiB one: each timed with :func:`swapd.proxy.model_from_json` (the nesting
check, then the byte scan, then a parse only when the scan has no verdict) and
with a plain ``json.loads``, best of ``--repeat`` runs, in the same process.

    python scripts/bench_model_scan.py [--repeat N] [--huge]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections.abc import Callable

from swapd.proxy import model_from_json


def _chat(messages: int, *, model_first: bool = False) -> bytes:
    history = [
        {
            "role": "user" if i % 2 else "assistant",
            "content": f'message number {i} with some text \u00e9 and "quotes"\n',
        }
        for i in range(messages)
    ]
    fields: dict[str, object] = {"messages": history, "model": "gemma", "stream": True}
    if model_first:
        fields = {"model": "gemma", "messages": history, "stream": True}
    return json.dumps(fields).encode()


def _prompt(size: int) -> bytes:
    text = ('Lorem ipsum "dolor" sit amet,\n consectetur ' * (size // 44 + 1))[:size]
    return json.dumps({"messages": [{"role": "user", "content": text}], "model": "gemma"}).encode()


def _empty_objects(size: int, *, middle: bool) -> bytes:
    count = size // 3 - 100
    if middle:
        half = b"{}," * (count // 2) + b"{}"
        return b'{"a":[' + half + b'],"model":"m","b":[' + half + b"]}"
    return b'{"messages":[' + b"{}," * count + b'{}],"model":"m"}'


def _best(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Print one row per body: bytes, swapd's time, json.loads' time, their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="runs per body (best is kept)")
    parser.add_argument("--huge", action="store_true", help="add the 64 MiB bodies (seconds)")
    args = parser.parse_args()
    bodies = {
        "chat, 1,000 messages, model last": _chat(1_000),
        "chat, 10,000 messages, model last": _chat(10_000),
        "chat, 1,000 messages, model first": _chat(1_000, model_first=True),
        "one 1 MB prompt, model last": _prompt(1 << 20),
    }
    if args.huge:
        bodies["64 MiB of {}, model last"] = _empty_objects(64 << 20, middle=False)
        bodies["64 MiB of {}, model in the middle"] = _empty_objects(64 << 20, middle=True)
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'body':38} {'bytes':>10} {'swapd ms':>10} {'json.loads ms':>14} {'ratio':>6}")
    for name, body in bodies.items():
        repeat = 3 if len(body) > 1 << 24 else args.repeat
        assert model_from_json(body) in {"gemma", "m"}  # noqa: S101 - the scan must be right
        ours = _best(functools.partial(model_from_json, body), repeat)
        parse = _best(functools.partial(json.loads, body), repeat)
        times = f"{ours * 1e3:>10.3f} {parse * 1e3:>14.3f} {ours / parse:>6.2f}"
        print(f"{name:38} {len(body):>10} {times}")


if __name__ == "__main__":
    main()
