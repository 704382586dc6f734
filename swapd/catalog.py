"""``GET /v1/models`` and ``GET /v1/models/{id}``: every configured model, loaded or not.

Both read frozen views: they never start a model and never reset a TTL. A
model is found by its name or any alias (the openai SDK's ``models.retrieve``);
an unknown one is 404 ``model_not_found`` in the usual envelope. A preset marked
``unlisted`` is served and found by its name, but left out of the list unless it is
asked with ``?unlisted=true`` (``swapd litellm-config``: a router must know it to reach it).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from swapd.control import query_flag
from swapd.manager import Manager
from swapd.slot import ModelView


def model_object(view: ModelView) -> dict[str, Any]:
    """One model as the OpenAI API lists it, with swapd's state and tier."""
    found: dict[str, Any] = {
        "id": view.name,
        "object": "model",
        "created": 0,
        "owned_by": "swapd",
        "aliases": list(view.aliases),
        # ``state``, as /swapd/status names it; ``status`` is the same, as first documented.
        "state": view.state,
        "status": view.state,
        "tier": view.tier,
    }
    if view.description is not None:
        found["description"] = view.description
    if view.metadata is not None:
        found["metadata"] = view.metadata
    return found


class Catalog:
    """The model list routes of one manager."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    async def list(self, request: web.Request) -> web.Response:
        """Every configured model; the ``unlisted`` ones too with ``?unlisted=true``."""
        every = query_flag("unlisted", request.query.get("unlisted"))
        data = [model_object(view) for view in self.manager.views() if every or not view.unlisted]
        return web.json_response({"object": "list", "data": data})

    async def one(self, request: web.Request) -> web.Response:
        """One model, by name or alias (names may hold ``/``)."""
        return web.json_response(model_object(self.manager.view(request.match_info["id"])))
