"""``swapd litellm-config``: a LiteLLM proxy config for one swapd per host.

It asks each node's ``GET /v1/models`` and writes one LiteLLM deployment per
model per node; a model on several nodes becomes one ``model_name`` with
several deployments, and LiteLLM's router spreads and fails over between them.
The router settings follow swapd's answers (docs/scale-out.md has the table):

- 503 (``insufficient_memory``, ``queue_timeout``, ``backoff``) and 429
  (``queue_full``) are retried at once on another node; the failed deployment
  cools down for the answer's ``Retry-After``, else for a few seconds, so a
  node whose model is loading is not shunned for long;
- 404 ``model_not_found`` and every other 4xx go back to the client as they are.

The output holds no model states, only which models each node serves, so it
changes only when presets change (a timer can rewrite it without restarting
LiteLLM for nothing). Residency is followed live by the optional affinity hook,
``deploy/litellm/swapd_affinity.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from swapd._client import is_http_url
from swapd._copy import fsync_dir

ENV_PREFIX = "os.environ/"  # LiteLLM's way to read a value from its own environment
NO_KEY = "none"  # the OpenAI client needs some key; a swapd without keys ignores it
COOLDOWN_S = 5  # without Retry-After: short, as a model may be loading on that node
AFFINITY_CALLBACK = "swapd_affinity.affinity"
_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)

ROUTER_SETTINGS: dict[str, Any] = {
    "routing_strategy": "simple-shuffle",
    # One retry per other node is enough: each retry picks among deployments not cooling down.
    "num_retries": 2,
    "retry_after": 0,
    "cooldown_time": COOLDOWN_S,
    # The first 503, 429, 5xx or timeout from a node cools that deployment down, so the
    # retry goes elsewhere. Also for a model one node serves: its clients then get
    # LiteLLM's 429 for the cooldown, which is short. Without it LiteLLM would retry that
    # node, sleeping each answer's Retry-After first, and cool it down on a 404 instead.
    "allowed_fails_policy": {
        "ServiceUnavailableErrorAllowedFails": 0,
        "RateLimitErrorAllowedFails": 0,
        "BadGatewayErrorAllowedFails": 0,
        "InternalServerErrorAllowedFails": 0,
        "TimeoutErrorAllowedFails": 0,
    },
    # A client's mistake is the same on every node: never retried. Nor is a request that
    # ran out of time (a preset's request_timeout, 504): it would run that long again.
    "retry_policy": {
        "BadRequestErrorRetries": 0,
        "AuthenticationErrorRetries": 0,
        "ContentPolicyViolationErrorRetries": 0,
        "TimeoutErrorRetries": 0,
    },
}


class NodeError(Exception):
    """A node could not be asked for its models; the message says which and why."""


@dataclass(frozen=True)
class Node:
    """A swapd host: its base URL and the key LiteLLM sends it (literal or ``os.environ/NAME``)."""

    url: str
    key: str | None = None

    @classmethod
    def parse(cls, url: str, key: str | None) -> Node:
        """A node from the command line; the URL must be ``http(s)://host[:port]``."""
        base = url.strip().rstrip("/")
        base = base.removesuffix("/v1")
        if not _usable(base):
            raise NodeError(f"--node {url!r}: expected a URL like http://gpu1.lan:8080")
        return cls(base, key or None)

    def secret(self) -> str | None:
        """The key itself, read from the environment where it is given as ``os.environ/NAME``."""
        if self.key is None or not self.key.startswith(ENV_PREFIX):
            return self.key
        name = self.key.removeprefix(ENV_PREFIX)
        value = os.environ.get(name)
        if not value:
            raise NodeError(f"{self.url}: its key names ${name}, which is not set")
        return value


def _usable(base: str) -> bool:
    """``http(s)://host[:port]``, with a host and a valid port (``http://:8080`` is none)."""
    if not base.startswith(("http://", "https://")) or "://" in base.split("://", 1)[1]:
        return False
    return is_http_url(base)


def unique(nodes: list[Node]) -> list[Node]:
    """``nodes``, each URL once: a node given twice would be two deployments of each model."""
    seen: set[str] = set()
    for node in nodes:
        if node.url in seen:
            raise NodeError(f"--node {node.url} is given twice")
        seen.add(node.url)
    return nodes


async def node_models(session: aiohttp.ClientSession, node: Node) -> list[dict[str, Any]]:
    """The node's ``/v1/models`` entries; :class:`NodeError` with swapd's message otherwise."""
    secret = node.secret()
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    try:
        # An unlisted model is still served: LiteLLM must know it to route it.
        query = {"unlisted": "true"}
        async with session.get(f"{node.url}/v1/models", params=query, headers=headers) as resp:
            body = await resp.json(content_type=None) if resp.status < 500 else None
            if resp.status != 200:
                raise NodeError(f"{node.url} answered {resp.status}: {_message(body)}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise NodeError(f"cannot ask {node.url} for its models: {_reason(exc)}") from exc
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise NodeError(f"{node.url}/v1/models is not a model list")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _reason(exc: Exception) -> str:
    """Why a node could not be asked; aiohttp's own timeout is a TimeoutError without a message."""
    if str(exc):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {_TIMEOUT.total:g} s"
    return type(exc).__name__


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or "no details")
    return "no details"


async def gather_models(nodes: Sequence[Node]) -> list[tuple[Node, list[dict[str, Any]]]]:
    """Every node's models, asked in parallel; the first failure is raised."""
    async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
        found = await asyncio.gather(*(node_models(session, node) for node in nodes))
    return list(zip(nodes, found, strict=True))


def deployment(node: Node, model: str) -> dict[str, Any]:
    """One model on one node, as LiteLLM's OpenAI-compatible provider reaches it."""
    return {
        "model_name": model,
        "litellm_params": {
            "model": f"openai/{model}",
            "api_base": f"{node.url}/v1",
            "api_key": node.key or NO_KEY,
        },
        # LiteLLM's health checks send each deployment a real chat request: on swapd that
        # would load every model on every node (and evict what serves). Opted out here,
        # and general_settings makes the on-demand /health honour it too.
        "model_info": {"swapd_node": node.url, "disable_background_health_check": True},
    }


def build_config(
    nodes: Iterable[tuple[Node, Iterable[dict[str, Any]]]], *, affinity: bool = False
) -> dict[str, Any]:
    """The LiteLLM proxy config: deployments grouped by model name, then router settings."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for node, models in nodes:
        for model in models:
            # An alias is a name of its own to LiteLLM, sent on as the model's own name
            # (what the affinity hook and swapd's status know it by).
            for name in (model["id"], *model.get("aliases", ())):
                entry = deployment(node, model["id"])
                entry["model_name"] = name
                by_model.setdefault(name, []).append(entry)
    model_list = [d for name in sorted(by_model) for d in by_model[name]]
    config: dict[str, Any] = {
        "model_list": model_list,
        "router_settings": dict(ROUTER_SETTINGS),
        "general_settings": {"health_check_skip_disabled_background_models": True},
    }
    if affinity:
        config["litellm_settings"] = {"callbacks": [AFFINITY_CALLBACK]}
    return config


def render(config: dict[str, Any], nodes: Sequence[Node]) -> str:
    """The config as YAML, with a header saying where it came from and how to remake it."""
    header = [
        "# LiteLLM proxy config written by `swapd litellm-config`; do not edit, regenerate.",
        "# Nodes: " + ", ".join(node.url for node in nodes),
    ]
    if "litellm_settings" in config:
        header.append("# Needs swapd_affinity.py (deploy/litellm/) in this config's folder.")
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def _keep_owner(fd: int, old: os.stat_result) -> None:
    """Give the new file the old one's owner and group, or its group where that is all."""
    try:
        os.fchown(fd, old.st_uid, old.st_gid)  # as root
    except PermissionError:
        with contextlib.suppress(PermissionError):  # a member of the group may keep it
            os.fchown(fd, -1, old.st_gid)


def write_if_changed(path: Path, text: str) -> bool:
    """Replace ``path`` atomically when ``text`` differs; whether it was written.

    The file replaced keeps its mode, owner and group (an operator's 0640 for LiteLLM's
    group); a new one is private (0600: it may hold a literal node key). The new file
    reaches the disk before it replaces the old, so a crash leaves one or the other whole.
    """
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    target = path.resolve()  # through a link: the link stays, its target is replaced
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        old: os.stat_result | None = target.stat()
    except FileNotFoundError:
        old = None
    tmp.unlink(missing_ok=True)  # one a killed run left, whatever its mode or owner
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fchmod(file.fileno(), stat.S_IMODE(old.st_mode) if old else 0o600)
            if old is not None:
                _keep_owner(file.fileno(), old)
            os.fsync(file.fileno())
        tmp.replace(target)  # a reader sees the old file or the new one, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself, on its way to the disk too
        fsync_dir(target.parent)
    return True
