"""``swapd serve | check | status``: the only place that exits the process."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path

from swapd import embedded
from swapd.auth import access_warnings
from swapd.backends import missing_binary
from swapd.config import Config, load_config
from swapd.errors import ConfigErrors, SwapdError
from swapd.keys import loose_permissions
from swapd.logs import configure

_SHORT_KEY = 16
_KEY_HINT = (
    "swapd: /swapd/status needs an admin key: pass --key KEY, set SWAPD_KEY, or pass "
    "--config on swapd's host so the key is read from admin_keys or admin_keys_file"
)


def _config_path(arg: str | None) -> Path | None:
    chosen = arg or os.environ.get("SWAPD_CONFIG")
    return Path(chosen) if chosen else None


def _load(arg: str | None) -> Config:
    path = _config_path(arg)
    if path is None:
        return embedded.default_config()
    return load_config(path)


def _run(main: Coroutine[None, None, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    from swapd.app import serve

    try:
        config = _load(args.config)
    except ConfigErrors as exc:
        print(exc, file=sys.stderr)
        print(f"swapd: {len(exc.errors)} config error(s); not starting", file=sys.stderr)
        return 2
    except SwapdError as exc:
        print(f"swapd: {exc}", file=sys.stderr)
        return 2
    configure(config.log_level)
    if config.source == embedded.SOURCE:
        url = f"http://{config.host}:{config.port}"
        print(embedded.try_it(url), file=sys.stderr, flush=True)
    try:
        _run(serve(config))
    except SwapdError as exc:  # another instance, a port in use: a message, no traceback
        print(f"swapd: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and every preset; print each problem as file:line:column: key: reason."""
    try:
        config = _load(args.config)
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
    if not config.presets:
        return [f"{config.source}: no presets in {config.presets_dir}; every request will 404"]
    warnings = []
    for preset in config.presets:
        problem = missing_binary(preset)
        if problem is not None:
            warnings.append(f"{preset.file}: {preset.name}: {problem}")
    return warnings + _access_warnings(config)


def _access_warnings(config: Config) -> list[str]:
    warnings = access_warnings(
        listen=config.host,
        port=config.port,
        api_keys=bool(config.api_keys),
        admin_keys=bool(config.admin_keys),
        cors_origins=config.cors_origins,
    )
    for path in (config.api_keys_file, config.admin_keys_file):
        if path is not None and (problem := loose_permissions(path)):
            warnings.append(problem)
    short = sum(len(key) < _SHORT_KEY for key in (*config.api_keys, *config.admin_keys))
    if short:
        warnings.append(f"{short} key(s) shorter than {_SHORT_KEY} characters are easy to guess")
    return [f"{config.source}: {warning}" for warning in warnings]


def cmd_status(args: argparse.Namespace) -> int:
    """Print what a running swapd reports at /swapd/status."""
    url, key = args.url, args.key or os.environ.get("SWAPD_KEY")
    host, port = "127.0.0.1", 8080
    path = _config_path(args.config)
    if path is not None and (url is None or key is None):
        try:
            config = load_config(path)
            host, port = config.host, config.port
            # On swapd's own host the config (or its admin_keys_file) holds an admin key.
            key = key or next(iter(config.admin_keys), None)
        except SwapdError:
            pass
    if url is None:
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"{url}/swapd/status", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            status = json.load(resp)
    except urllib.error.HTTPError as exc:
        print(f"swapd: {url} answered {exc.code}: {_error_message(exc)}", file=sys.stderr)
        if exc.code in (401, 403):
            print(_KEY_HINT, file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"swapd: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"{'MODEL':24} {'STATE':9} {'PID':>7} {'PORT':>6} {'DEVICE':7} {'IN-FLIGHT':>9} MEMORY")
    for m in status["models"]:
        mem = m["memory"]
        shown = mem["measured"] or mem["need"]
        memory = f"{shown / 1024**2:.0f} MiB" if shown else "-"
        print(
            f"{m['name']:24} {m['state']:9} {m['pid'] or '-':>7} {m['port'] or '-':>6} "
            f"{m['device'] or '-':7} {m['in_flight']:>9} {memory}"
        )
    return 0


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.load(exc)["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return exc.reason or "no details"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``swapd`` command."""
    parser = argparse.ArgumentParser(prog="swapd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon (the embedded default without --config)")
    serve.add_argument("--config", help="daemon config file (default: $SWAPD_CONFIG)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate the config and presets")
    check.add_argument("--config", help="daemon config file (default: $SWAPD_CONFIG)")
    check.set_defaults(func=cmd_check)
    status = sub.add_parser("status", help="show the models of a running swapd")
    status.add_argument("--config", help="read the listen address from this config")
    status.add_argument("--url", help="swapd's base URL (default http://127.0.0.1:8080)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("--key", help="an admin key (default: $SWAPD_KEY, else from --config)")
    status.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    sys.exit(args.func(args))
