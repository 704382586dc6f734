"""The ``swapd`` command: the daemon, and the verbs that drive a running one.

The only place that exits the process. ``serve`` and ``check`` read a config;
every other verb talks to a running swapd (see :mod:`swapd._client` for which
one, and with which key) and prints a plain table on a terminal, JSON with
``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn, TextIO
from urllib.parse import quote

import structlog

from swapd import _render, embedded
from swapd._client import (
    ANSWER_WITHIN,
    Client,
    ClientError,
    Target,
    config_path,
    error_message,
    url_of,
)
from swapd.auth import access_warnings
from swapd.backends import kind_of, missing_binary
from swapd.config import Config, load_config, parse_listen
from swapd.errors import ConfigErrors, SwapdError
from swapd.keys import loose_permissions
from swapd.logs import configure, get_logger
from swapd.presets import is_usable_name
from swapd.probe import CUDA_ORDER, DEVICE_VARIABLES

_SHORT_KEY = 16
_DESCRIPTION = """\
swapd serves many LLMs behind one OpenAI-compatible port. It starts llama-server, vLLM or
any OpenAI-compatible command on demand, in memory it has measured, and stops idle ones.

Start it with `swapd serve --config swapd.yaml`; the other commands drive a running swapd.
"""
_EPILOG = """\
Which swapd the commands ask: --url, $SWAPD_URL, the listen address in --config
($SWAPD_CONFIG, else /etc/swapd/swapd.yaml), else http://127.0.0.1:8080. With keys
set, they send --key, $SWAPD_KEY, or an admin key from that config.
"""


def _load_config(arg: str | None, listen: str | None = None) -> Config:
    path = config_path(arg)
    config = embedded.default_config() if path is None else load_config(path)
    if listen is None:
        return config
    host, port = parse_listen(listen)
    return dataclasses.replace(config, host=host, port=port)


def _run(main: Coroutine[None, None, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    # Until the event loop takes SIGHUP over (a reload), its default would end swapd:
    # `systemctl reload` or a `kill -HUP` in the first second must not.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from swapd.app import serve

    if args.listen is not None:
        try:
            parse_listen(args.listen)
        except ValueError as exc:
            print(f"swapd: --listen: {exc}", file=sys.stderr)
            return 2
    try:
        config = _load_config(args.config, args.listen)
    except ConfigErrors as exc:
        print(exc, file=sys.stderr)
        print(f"swapd: {len(exc.errors)} config error(s); not starting", file=sys.stderr)
        return 2
    except SwapdError as exc:
        print(f"swapd: {exc}", file=sys.stderr)
        return 2
    configure(config.log_level, backend_log=config.backend_log)
    if config.source == embedded.SOURCE:
        _announce_embedded(url_of(config))
    try:
        _run(serve(config, lambda: _load_config(args.config, args.listen)))
    except SwapdError as exc:  # another instance, a port in use: a message, no traceback
        print(f"swapd: {exc}", file=sys.stderr)
        return 2
    return 0


def _announce_embedded(url: str) -> None:
    """Say how to try the embedded default: in words on a terminal, else as one JSON event.

    Off a terminal every line is an event (journald, ``| jq``): plain text would break it.
    """
    if sys.stderr.isatty():
        print(embedded.try_it(url), file=sys.stderr, flush=True)
        return
    get_logger("swapd.cli").info(
        "swapd.embedded",
        model=embedded.MODEL_NAME,
        example=embedded.try_it(url).splitlines()[-1].strip(),
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and every preset; print each problem as file:line:column: key: reason."""
    try:
        config = _load_config(args.config)
    except ConfigErrors as exc:
        print(exc, file=sys.stderr)
        return 1
    except SwapdError as exc:
        print(f"swapd: {exc}", file=sys.stderr)
        return 1
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    names = ", ".join(p.name for p in config.presets)
    print(f"{config.source}: ok, {len(config.presets)} preset(s): {names}")
    return 0


def config_warnings(config: Config) -> list[str]:
    """Problems that do not stop swapd from starting but will fail requests."""
    warnings = []
    if not config.presets:
        where = f"{config.source}: no presets in {config.presets_dir}"
        warnings.append(f"{where}; every request will 404")
    if config.cache_budget is not None and config.cache_dir is None:
        no_cache = "cache_budget has no effect without cache_dir (no staging cache)"
        warnings.append(f"{config.source}: {no_cache}")
    for preset in config.presets:
        problem = missing_binary(preset)
        if problem is not None:
            warnings.append(f"{preset.file}: {preset.name}: {problem}")
        if preset.sha256 is not None and not preset.stage:
            # Only a staged copy is hashed: the digest would seem to vouch for the model.
            unchecked = "sha256 is checked only when the model is staged (stage: true)"
            warnings.append(f"{preset.file}: {preset.name}: {unchecked}; it is never checked here")
        if config.devices != "cpu" and (gpus := kind_of(preset).gpus_needed(preset)) > 1:
            # Placed on one GPU, shown that one alone: its start fails there (vLLM runs
            # tensor parallel on a CPU host).
            why = f"its args ask for {gpus} GPUs at once; swapd places a model on one GPU"
            warnings.append(f"{preset.file}: {preset.name}: {why}, so its start fails there")
        for name in sorted(n for n in DEVICE_VARIABLES & preset.env.keys() if preset.env[n]):
            if (name, preset.env[name]) == ("CUDA_DEVICE_ORDER", CUDA_ORDER):
                continue  # what swapd sets it to anyway
            # Set over the preset's env at each start: it would otherwise run the model on
            # a GPU where swapd counts nothing of it.
            why = (
                f"env {name} is swapd's to set (the GPU it places the model on); pin with devices:"
            )
            warnings.append(f"{preset.file}: {preset.name}: {why}")
    return warnings + _access_warnings(config)


def _access_warnings(config: Config) -> list[str]:
    warnings = access_warnings(
        listen=config.host,
        port=config.port,
        api_keys=bool(config.api_keys),
        admin_keys=bool(config.admin_keys),
        cors_origins=config.cors_origins,
        allowed_hosts=config.allowed_hosts,
    )
    for path in (config.api_keys_file, config.admin_keys_file):
        if path is not None and (problem := loose_permissions(path)):
            warnings.append(problem)
    short = sum(len(key) < _SHORT_KEY for key in (*config.api_keys, *config.admin_keys))
    if short:
        warnings.append(f"{short} key(s) shorter than {_SHORT_KEY} characters are easy to guess")
    return [f"{config.source}: {warning}" for warning in warnings]


def _client_verb(
    verb: Callable[[Client, argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    """Run ``verb`` against the swapd the arguments name; a refusal is one line and exit 1."""

    def run(args: argparse.Namespace) -> int:
        async def main() -> int:
            async with Client(Target.resolve(args.url, args.config, args.key)) as client:
                return await verb(client, args)

        try:
            return asyncio.run(main())
        except ClientError as exc:  # swapd's answer may carry a backend's output
            print(f"swapd: {_render.printable(str(exc))}", file=sys.stderr)
            return 1

    return run


def _model_path(name: str, action: str) -> str:
    """``/swapd/models/NAME/ACTION``, the name's characters escaped as a path needs."""
    # An HTTP client folds "." and ".." segments (org/../m would reach /swapd/models/m):
    # a name no preset may have goes as one segment, its slashes escaped, which swapd
    # reads as "/". Usable names keep their slashes: some proxies refuse an escaped one.
    safe = "/" if is_usable_name(name) else ""
    return f"/swapd/models/{quote(name, safe=safe)}/{action}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


async def verb_status(client: Client, args: argparse.Namespace) -> int:
    """Every model: state, tier, memory, TTL left, last use, and errors."""
    body = await client.call("GET", "/swapd/status", within=ANSWER_WITHIN, expect="models")
    print(json.dumps(body, indent=2) if args.json else _render.status(body))
    return 0


async def verb_load(client: Client, args: argparse.Namespace) -> int:
    """Load a model, drawing progress from the change feed until it is ready or fails."""
    name = args.name
    # With --json, stdout holds the one JSON document: the progress goes to stderr.
    out = sys.stderr if args.json else sys.stdout
    progress = _Progress(out, live=out.isatty())
    watcher = asyncio.create_task(progress.follow(client, f"/swapd/events?model={quote(name)}"))
    try:
        view = await client.call("POST", _model_path(name, "load"), expect="state")
    except ClientError as exc:
        watcher.cancel()  # before the line is ended: no redraw may come between it and the error
        progress.end()
        if exc.status is None or exc.status in (401, 403, 404):
            raise  # not about the model's state: refused, or no such model (with the hint)
        state = await _state_of(client, name)
        message = error_message(exc.body) or str(exc)  # a proxy's own error: all of it
        print(f"{name}: {state}: {_render.printable(message)}", file=sys.stderr)
        return 1
    finally:
        watcher.cancel()
    progress.end()
    if args.json:
        _print_json(view)
    else:
        where = f"pid {view['pid']}, port {view['port']}, device {view['device']}"
        print(f"{view['name']}: {view['state']} ({where})")
    if view["state"] != "ready":
        # Ready, then taken down before the answer (an unload meanwhile): not ready now.
        print(f"{view['name']}: not ready: it is {view['state']} now", file=sys.stderr)
        return 1
    return 0


async def _state_of(client: Client, name: str) -> str:
    try:
        body = await client.call("GET", "/swapd/status", expect="models")
    except ClientError:
        return "unknown"
    found = (m["state"] for m in body["models"] if name in (m["name"], *m["aliases"]))
    return next(found, "unknown")


class _Progress:
    """``swapd load``'s progress: one redrawn line on a terminal, a line per change elsewhere."""

    def __init__(self, out: TextIO, *, live: bool) -> None:
        self.out = out
        self.live = live
        self.started = time.time()
        self._last: tuple[str, bool] | None = None
        self._drawn = False

    async def follow(self, client: Client, path: str) -> None:
        try:
            async for event, view in client.events(path):
                if event == "model":
                    self.show(view)
        except ClientError:
            return  # the load itself reports what went wrong

    def show(self, view: dict[str, Any]) -> None:
        line = _render.progress(view, self.started)
        if self.live:
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
            self._drawn = True
            return
        changed = (view["state"], bool(view.get("staging")))
        if changed != self._last:
            print(line, file=self.out, flush=True)
            self._last = changed

    def end(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self._drawn = False


async def verb_unload(client: Client, args: argparse.Namespace) -> int:
    """Stop a model, or every model (``--all``), once requests finish (``--force``: at once)."""
    query = "?force=true" if args.force else ""
    if args.all:
        body = await client.call("POST", f"/swapd/unload{query}", expect="models")
        views = body["models"]
    else:
        path = _model_path(args.name, "unload") + query
        body = await client.call("POST", path, expect="state")
        views = [body]
    if args.json:
        print(json.dumps(body, indent=2))
    for view in [] if args.json else views:
        print(f"{view['name']}: {view['state']}")
    return 0


async def verb_logs(client: Client, args: argparse.Namespace) -> int:
    """A backend's recent output; ``-f`` keeps printing new lines."""
    path = _model_path(args.name, f"logs?lines={args.lines}")
    if not args.follow:
        body = await client.call(
            "GET", path, within=ANSWER_WITHIN, expect="lines"
        )  # answered at once
        for line in body["lines"]:
            print(json.dumps(line) if args.json else _render.printable(line))
        return 0
    async for event, line in client.events(path + "&follow=true"):
        if event == "line":
            print(json.dumps(line) if args.json else _render.printable(line), flush=True)
    # Not ended by the user: a reload removed the model, or swapd stopped.
    ended = "the log stream ended (the model was removed, or swapd stopped)"
    print(f"{args.name}: {ended}", file=sys.stderr)
    return 1


async def verb_reload(client: Client, args: argparse.Namespace) -> int:
    """Re-read the config and presets; restart only the models whose launch changed."""
    try:
        plan = await client.call("POST", "/swapd/reload", expect="restarted")
    except ClientError as exc:
        message = error_message(exc.body)
        errors = exc.body.get("errors") if isinstance(exc.body, dict) else None
        if message is None or not isinstance(errors, list):
            raise  # not swapd refusing the new config
        for error in errors:
            print(_render.printable(error), file=sys.stderr)
        print(f"swapd: {_render.printable(message)}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(plan)
        return 0
    for key, words in (
        ("restarted", "restarting"),
        ("added", "added"),
        ("removed", "removed"),
        ("in_place", "changed in place"),
        ("unchanged", "unchanged"),
    ):
        if plan[key]:
            print(f"{words}: {', '.join(plan[key])}")
    if plan["restart_needed"]:
        keys = ", ".join(plan["restart_needed"])
        print(f"warning: {keys} changed; a restart of swapd applies them", file=sys.stderr)
    return 0


async def verb_plan(client: Client, args: argparse.Namespace) -> int:
    """Which models fit together on which device; a local plan when swapd is not running."""
    try:
        body = await client.call("GET", "/swapd/plan", within=ANSWER_WITHIN, expect="devices")
    except ClientError as exc:
        path = config_path(args.config)
        if exc.status is not None or exc.silent or path is None:
            raise  # a swapd answered, or runs but is stuck: a local plan would not be its
        print(f"swapd: not running at {client.target.url}; planning from {path}", file=sys.stderr)
        try:
            config = load_config(path)
        except ConfigErrors as errors:
            raise ClientError(f"{errors}\n{len(errors.errors)} config error(s)") from errors
        except SwapdError as error:
            raise ClientError(str(error)) from error
        body = await _local_plan(config)
    print(json.dumps(body, indent=2) if args.json else _render.plan(body))
    return 0


async def _local_plan(config: Config) -> dict[str, Any]:
    from swapd import planner
    from swapd.admission import Admission
    from swapd.footprints import Footprints
    from swapd.policy import Limits
    from swapd.probe import open_probe

    # stdout holds the plan (one JSON document with --json): what the planning parts log
    # (footprints.drop for a torn footprints.json) goes to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    probe, _ = open_probe(config.devices)
    try:
        limits = Limits(reserve=config.reserve, budget=config.budget)
        admission = Admission(probe, Footprints(config.state_dir), limits, config.default_memory)
        snap, memory = await planner.read_memory(admission, [], {})
        found = await planner.plan(admission, config.presets, snap, memory)
    finally:
        probe.close()
    return found.as_json()


def cmd_litellm_config(args: argparse.Namespace) -> int:
    """Print (or write) a LiteLLM proxy config for the nodes given, from their /v1/models."""
    from swapd import litellm_config as lc

    try:
        given = _node_keys(args)
    except _UsageError as exc:
        print(f"swapd litellm-config: error: {exc}", file=sys.stderr)
        return 2
    try:
        nodes = lc.unique([lc.Node.parse(url, key) for url, key in given])
        found = asyncio.run(lc.gather_models(nodes))
    except lc.NodeError as exc:
        print(f"swapd: {exc}", file=sys.stderr)
        return 1
    for node, models in found:
        if not models:
            print(f"warning: {node.url} serves no models", file=sys.stderr)
    text = lc.render(lc.build_config(found, affinity=args.affinity), nodes)
    if args.output is None:
        sys.stdout.write(text)
    elif lc.write_if_changed(Path(args.output), text):
        print(f"{args.output}: written", file=sys.stderr)
    else:
        print(f"{args.output}: unchanged", file=sys.stderr)
    return 0


def cmd_import_llama_swap(args: argparse.Namespace) -> int:
    """Write a swapd layout from a llama-swap config; say what did not carry over."""
    from swapd.errors import ConfigError
    from swapd.llama_swap import importer, layout

    source, out = Path(args.config), Path(args.out)
    try:
        found = importer.read(source)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print(f"swapd: {source}: not imported", file=sys.stderr)
        return 1
    if layout.holds_files(out) and not args.force:
        print(f"swapd: {out} already holds files; --force replaces what it writes", file=sys.stderr)
        return 1
    try:
        warnings = layout.write(found, out, source.absolute())
    except OSError as exc:
        print(f"swapd: cannot write {exc.filename or out}: {exc.strerror}", file=sys.stderr)
        return 1
    for note in found.all_notes():
        print(_render.printable(note.render(str(source))), file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    aside = [d.model_id for d in found.drafts if d.refused]
    print(f"{out / layout.CONFIG}: written, {len(found.drafts) - len(aside)} preset(s)")
    if aside:
        print(f"kept aside ({layout.DISABLED}): {', '.join(aside)}")
    print(f"next: swapd check --config {out / layout.CONFIG}")
    return 0


def _add_import_llama_swap(sub: Any) -> None:
    verb = sub.add_parser(
        "import-llama-swap",
        help="write a swapd config and presets from a llama-swap config.yaml",
        description=(
            "Read a llama-swap config.yaml and write DIR/swapd.yaml and DIR/presets/, one "
            "preset per model. Each setting that does not carry over is printed as "
            "config.yaml:LINE: KEY: why. See docs/migrating-from-llama-swap.md."
        ),
    )
    verb.set_defaults(func=cmd_import_llama_swap)
    verb.add_argument("config", metavar="CONFIG", help="llama-swap's config.yaml")
    verb.add_argument(
        "--out", default="swapd-config", metavar="DIR", help="where to write (default swapd-config)"
    )
    verb.add_argument(
        "--force",
        action="store_true",
        help="write into a DIR that holds files (replacing those an import wrote)",
    )


class _NodeAction(argparse.Action):
    """``--node URL`` adds a node; ``--node-key KEY`` gives the node just before it a key."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        nodes: list[list[str | None]] = getattr(namespace, "nodes", None) or []
        if option_string == "--node":
            nodes.append([values, None])
        elif not nodes:
            parser.error("--node-key must follow the --node it is for")
        elif nodes[-1][1] is not None:
            parser.error(f"--node-key given twice for --node {nodes[-1][0]}")
        else:
            nodes[-1][1] = values
        namespace.nodes = nodes


class _KeyAction(argparse.Action):
    """``--key KEY``: one for every node, or one after each ``--node`` (its own, as --node-key).

    Each is noted with the number of nodes before it; :func:`_node_keys` sorts them out.
    """

    def __call__(
        self,
        _parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        _option_string: str | None = None,
    ) -> None:
        keys: list[tuple[int, str]] = getattr(namespace, self.dest, None) or []
        keys.append((len(getattr(namespace, "nodes", None) or []), values))
        setattr(namespace, self.dest, keys)


class _UsageError(Exception):
    """Options that parse one by one but do not fit together (exit 2, as argparse's)."""


def _node_keys(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """Each ``--node`` with its key: its --node-key, else its own --key, else the one --key.

    A single ``--key`` is every node's that has no --node-key. Several are one per node,
    each for the ``--node`` just before it; a node then without one has none.
    """
    nodes = [[url, key] for url, key in args.nodes]
    keys: list[tuple[int, str]] = args.key or []
    if len(keys) == 1:
        return [(url, key or keys[0][1]) for url, key in nodes]
    for before, key in keys:
        if before == 0:
            raise _UsageError("with several --key, each must follow the --node it is for")
        if nodes[before - 1][1] is not None:
            raise _UsageError(f"--key given twice for --node {nodes[before - 1][0]}")
        nodes[before - 1][1] = key
    return [(url, key) for url, key in nodes]


def _add_litellm_config(sub: Any) -> None:
    verb = sub.add_parser(
        "litellm-config",
        help="print a LiteLLM proxy config for several swapd hosts",
        description=(
            "Ask each node's /v1/models and print a LiteLLM proxy config: one deployment per "
            "model per node, router settings that retry 503 and 429 on another node and never "
            "retry other 4xx. See docs/scale-out.md."
        ),
        epilog=(
            "A key may be given as os.environ/NAME: it is read from $NAME here and written "
            "as that reference, so the config itself holds no secret."
        ),
    )
    verb.set_defaults(func=cmd_litellm_config, nodes=[])
    verb.add_argument(
        "--node",
        action=_NodeAction,
        required=True,
        metavar="URL",
        help="a swapd's address, like http://gpu1.lan:8080 (repeat for each node)",
    )
    verb.add_argument(
        "--node-key",
        action=_NodeAction,
        metavar="KEY",
        help="the key for the --node just before it (overrides --key)",
    )
    verb.add_argument(
        "--key",
        action=_KeyAction,
        help="the key for every node without its own --node-key; or one after each --node",
    )
    verb.add_argument(
        "--affinity",
        action="store_true",
        help="route to a node where the model is resident (needs deploy/litellm/swapd_affinity.py)",
    )
    verb.add_argument(
        "-o", "--output", metavar="FILE", help="replace FILE atomically, only when it changes"
    )


def _target_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("which swapd")
    where.add_argument("--url", help="swapd's address, like http://127.0.0.1:8080")
    where.add_argument("--config", help="read the address and an admin key from this config")
    where.add_argument("--key", help="an admin key (default: $SWAPD_KEY, else from the config)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return common


def _version() -> str:
    try:
        return metadata.version("swapd")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``swapd`` command line."""
    parser = argparse.ArgumentParser(
        prog="swapd",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"swapd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the daemon in the foreground",
        description="Run swapd in the foreground until SIGTERM (SIGHUP reloads the config).",
    )
    serve.add_argument(
        "--config", help="the daemon config (default: $SWAPD_CONFIG, else the embedded Gemma)"
    )
    serve.add_argument("--listen", help="serve on HOST:PORT instead of the config's listen")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser(
        "check",
        help="validate a config and its presets",
        description="Print every problem as file:line:column: key: reason; exit 1 if any.",
    )
    check.add_argument("--config", help="the daemon config (default: $SWAPD_CONFIG)")
    check.set_defaults(func=cmd_check)
    _add_litellm_config(sub)
    _add_import_llama_swap(sub)
    common = _target_options()
    verbs: list[tuple[str, str, Any]] = [
        ("status", "show every model: state, tier, memory, TTL left, last use", verb_status),
        ("load", "load a model and show its progress until it is ready", verb_load),
        ("unload", "stop a model (or --all) once its requests finish", verb_unload),
        ("logs", "print a backend's recent output", verb_logs),
        ("reload", "re-read the config; restart only the models that changed", verb_reload),
        ("plan", "show which models fit together on this host's devices", verb_plan),
    ]
    subs = {}
    for name, words, verb in verbs:
        description = words[0].upper() + words[1:] + "."
        subs[name] = sub.add_parser(name, parents=[common], help=words, description=description)
        subs[name].set_defaults(func=_client_verb(verb))
        if name in ("load", "logs"):
            subs[name].add_argument("name", metavar="NAME", help="the model's name or an alias")
    which = subs["unload"].add_mutually_exclusive_group(required=True)
    which.add_argument("name", metavar="NAME", nargs="?", help="the model's name or an alias")
    which.add_argument("--all", action="store_true", help="every model")
    subs["unload"].add_argument(
        "--force", action="store_true", help="stop at once, cutting requests"
    )
    subs["logs"].add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    subs["logs"].add_argument("-n", "--lines", type=int, default=100, help="how many (default 100)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``swapd`` command."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`swapd logs -f | head`): end quietly, as a tool killed by
        # SIGPIPE does, and keep the interpreter's own flush at exit from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        _end_by_sigint()
    sys.exit(code)


def _end_by_sigint() -> NoReturn:
    """Die of SIGINT, no traceback, as a program interrupted by Ctrl-C should.

    A shell ends a loop (``for m in a b; do swapd load $m; done``) when its child died
    of SIGINT; a child that exits 130 instead lets the loop go on to the next model.
    """
    with contextlib.suppress(OSError):  # what was printed goes out first; a reader gone too
        sys.stdout.flush()
        sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    sys.exit(128 + signal.SIGINT)  # not reached: the default action ends the process
