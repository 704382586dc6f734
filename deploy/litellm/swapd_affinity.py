# ruff: noqa: INP001 - LiteLLM loads this file by its path, beside its config; not a package
"""LiteLLM routing hook: send a request to a node where its model is already resident.

LiteLLM picks a deployment at random among the healthy ones (``simple-shuffle``).
With swapd behind it that random pick often lands on a node where the model is
on disk, and swapd there evicts something to load it, while another node holds
it ready. This hook narrows the healthy deployments to the cheapest tier
before LiteLLM shuffles:

    device (loaded, loading or waking)  <  ram (asleep, pages warm)  <  disk, store

It reads each node's ``GET /v1/models`` (which carries ``tier``), at most once
per ``SWAPD_AFFINITY_TTL`` seconds per node (default 2), and notes at once
where each request it routed was served, so a model just loaded on a node is
known there before the next poll. When no node holds the model, the nodes
with the fewest models on their devices are kept (the likeliest to have room
without evicting; /v1/models carries no memory figures). A node that does not
answer is dropped while others remain. Deployments that LiteLLM cooled down
are already gone from the list, so a node answering 503 or 429 loses its turn
as before. LiteLLM shuffles among what is left.

Use: put this file beside the proxy's config.yaml and generate the config with
``swapd litellm-config --affinity``, which adds::

    litellm_settings:
      callbacks: ["swapd_affinity.affinity"]
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx
from litellm.integrations.custom_logger import CustomLogger

TTL_S = float(os.environ.get("SWAPD_AFFINITY_TTL", "2"))
_TIMEOUT = httpx.Timeout(2.0)
_RANK = {"device": 0, "ram": 1}
_COLD = 2  # known to the node, but on disk or in the store
_UNREACHABLE = 3  # the node did not answer its last poll


def _node_of(deployment: dict[str, Any]) -> str:
    info = deployment.get("model_info") or {}
    base = str(info.get("swapd_node") or deployment["litellm_params"].get("api_base", ""))
    return base.rstrip("/").removesuffix("/v1")


def _model_of(deployment: dict[str, Any]) -> str:
    return str(deployment["litellm_params"]["model"]).removeprefix("openai/")


class SwapdAffinity(CustomLogger):  # type: ignore[misc]
    """Keeps each node's tiers, polled and learnt from answers; filters deployments by them."""

    def __init__(self) -> None:
        super().__init__()
        self._tiers: dict[str, tuple[float, dict[str, str] | None]] = {}
        self._polls: dict[str, asyncio.Task[dict[str, str] | None]] = {}
        self._client: httpx.AsyncClient | None = None

    async def _node_tiers(self, node: str, key: str | None) -> dict[str, str] | None:
        known = self._tiers.get(node)
        if known is not None and time.monotonic() - known[0] < TTL_S:
            return known[1]
        poll = self._polls.get(node)
        if poll is None:  # one poll per node at a time, however many requests wait on it
            poll = asyncio.ensure_future(self._poll(node, key))
            self._polls[node] = poll
            poll.add_done_callback(lambda _: self._polls.pop(node, None))
        return await asyncio.shield(poll)

    async def _poll(self, node: str, key: str | None) -> dict[str, str] | None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=_TIMEOUT)
        headers = {"Authorization": f"Bearer {key}"} if key and key != "none" else {}
        try:
            # The unlisted models too: LiteLLM routes them like the others.
            query = {"unlisted": "true"}
            resp = await self._client.get(f"{node}/v1/models", params=query, headers=headers)
            resp.raise_for_status()
            tiers: dict[str, str] | None = {
                str(m["id"]): str(m.get("tier")) for m in resp.json()["data"]
            }
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            tiers = None
        self._tiers[node] = (time.monotonic(), tiers)
        return tiers

    async def _rank(self, deployment: dict[str, Any]) -> tuple[int, int]:
        """The model's tier on the deployment's node; for a cold one, how full the node is."""
        params = deployment["litellm_params"]
        tiers = await self._node_tiers(_node_of(deployment), params.get("api_key"))
        if tiers is None:
            return (_UNREACHABLE, 0)
        rank = _RANK.get(tiers.get(_model_of(deployment), ""), _COLD)
        resident = sum(tier == "device" for tier in tiers.values()) if rank == _COLD else 0
        return (rank, resident)

    async def async_filter_deployments(
        self,
        model: str,  # noqa: ARG002 - the hook's signature
        healthy_deployments: list[Any],
        messages: Any,  # noqa: ARG002
        request_kwargs: dict[str, Any] | None = None,  # noqa: ARG002
        parent_otel_span: Any = None,  # noqa: ARG002
    ) -> list[Any]:
        """The healthy deployments on the nodes that can serve the model most cheaply."""
        if len(healthy_deployments) < 2:  # nothing to choose between
            return healthy_deployments
        ranks = await asyncio.gather(*(self._rank(d) for d in healthy_deployments))
        best = min(ranks)
        return [d for d, rank in zip(healthy_deployments, ranks, strict=True) if rank == best]

    async def async_log_success_event(
        self,
        kwargs: dict[str, Any],
        response_obj: Any,  # noqa: ARG002
        start_time: Any,  # noqa: ARG002
        end_time: Any,  # noqa: ARG002
    ) -> None:
        """A node that just served a model holds it on its device: note it before the next poll."""
        params = kwargs.get("litellm_params") or {}
        base, name = params.get("api_base"), kwargs.get("model")
        if not base or not name:
            return
        node = str(base).rstrip("/").removesuffix("/v1")
        known = self._tiers.get(node)
        if known is not None and known[1] is not None:
            known[1][str(name).removeprefix("openai/")] = "device"


affinity = SwapdAffinity()
