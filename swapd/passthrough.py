"""Backend-specific routes: ``/upstream/{model}/{path}``, and llama-server's own POST routes.

``/upstream/qwen/tokenize`` reaches ``/tokenize`` on qwen's backend, with any
method, query and body: ``/props``, ``/slots``, the backend's own ``/metrics``.
It leases the model like any request (so it may load it, and resets its TTL)
and needs an inference key where keys are set. The routes swapd drives itself
(vLLM's ``/sleep`` and ``/wake_up``) and those that run code in the backend are
refused (403 ``upstream_route_reserved``). A model name may hold ``/``;
the longest configured name (or alias) that starts the path wins.

``/tokenize``, ``/detokenize``, ``/infill`` and ``/apply-template`` are
llama-server's routes for one model; through swapd their JSON body names the
model (``"model": "qwen"``), as in llama-server's router mode.
"""

from __future__ import annotations

from urllib.parse import unquote

from aiohttp import web
from yarl import URL

from swapd._exchange import count
from swapd.backends import kind_of
from swapd.control import query_flag
from swapd.errors import BadRequest, Forbidden, UnknownModel, clip
from swapd.manager import Manager
from swapd.proxy import AS_SENT, Proxy, read_body

# The engines' own POST routes whose JSON body can name the model, as llama-server's router
# mode routes them: llama-server's (its native completion, embedding and rerank routes, and
# its unversioned aliases of the OpenAI ones) and vLLM's pooling and scoring routes.
ENGINE_ROUTES = (
    "/tokenize",
    "/detokenize",
    "/infill",
    "/apply-template",
    "/completion",
    "/completions",
    "/chat/completions",
    "/embedding",
    "/embeddings",
    "/rerank",
    "/reranking",
    "/v1/reranking",
    "/v2/rerank",
    "/score",
    "/pooling",
    "/classify",
)
UPSTREAM_PREFIX = "/upstream/"
# Backend routes that are swapd's alone: vLLM's development routes (VLLM_SERVER_DEV_MODE=1,
# which sleep needs) that swapd drives or that act on every client: sleep and wake (swapd's
# tiers depend on them), RPC, pausing, aborting every request, and replacing the served
# weights (its RL router). The backend's own key would let a caller reach them; through
# /upstream/ they are refused. Routes a preset turns on itself (profiling, LoRA updates)
# are the preset's to offer.
RESERVED = frozenset(
    {
        "/sleep",
        "/wake_up",
        "/collective_rpc",
        "/scale_elastic_ep",
        "/pause",
        "/resume",
        "/abort_requests",
        "/release_kv_cache_memory",
        "/init_weight_transfer_engine",
        "/shutdown_weight_transfer_engine",
        "/start_weight_update",
        "/start_draft_weight_update",
        "/update_weights",
        "/update_weight_version",
        "/finish_weight_update",
        "/weight_checker",
    }
)


def backend_path(path: str, reserved: frozenset[str] = RESERVED) -> str:
    """The backend path to send, with empty segments gone; :class:`Forbidden` if reserved.

    The check reads the path as a backend might: percent-escapes decoded, ``.`` and
    ``..`` resolved, each segment's ``;parameters`` dropped, so ``/%73leep``,
    ``/x/../sleep`` or ``/sleep;x`` cannot reach ``/sleep``; and a path that ends in a
    reserved route is refused whatever comes before it (a root path). Empty segments are
    removed from what is sent, since ``//x/sleep`` would read as a host ``x`` and a
    path ``/sleep``. A fragment (``#``) has no place in a request and is refused.
    ``reserved``: the routes refused (with the model's kind's own ``reserved_routes``).
    """
    if "#" in path:
        raise BadRequest("a request path cannot hold '#'")
    kept = [segment for segment in path.split("/") if segment]
    resolved: list[str] = []
    for segment in unquote(path).split("/"):
        name = segment.partition(";")[0]
        if name == "..":
            if resolved:
                resolved.pop()
        elif name not in {"", "."}:
            resolved.append(name)
    # The route may end the path: a backend served under a prefix (vLLM's --root-path)
    # strips it before routing, so /api/sleep is its /sleep. (Each is one segment.)
    if resolved and "/" + resolved[-1] in reserved:
        raise Forbidden(
            f"{clip(path)} is driven by swapd itself and cannot be called through /upstream/",
            "upstream_route_reserved",
        )
    return "/" + "/".join(kept) + ("/" if path.endswith("/") and kept else "")


def split_target(raw_path: str, manager: Manager) -> tuple[str, str]:
    """``/upstream/NAME/REST`` as the model name (or alias) and the backend path ``/REST``."""
    # Routed by its decoded path: the prefix as sent may be spelled otherwise (%75pstream).
    first, _, rest = raw_path[1:].partition("/")
    if unquote(first) != UPSTREAM_PREFIX.strip("/"):
        raise BadRequest(f"{clip(raw_path)}: the path must start with {UPSTREAM_PREFIX}")
    parts = rest.split("/")
    # No name has more segments than the longest configured one: a path of thousands of
    # segments costs one join per possible name, not one per segment.
    deepest = manager.config.deepest_name
    for cut in range(min(len(parts), deepest), 0, -1):
        # Decoded, as /v1/models/{id} and /swapd/models/{name} read theirs: a client that
        # quotes the name (org%2Fmodel) reaches the same model; the rest stays as sent.
        name = unquote("/".join(parts[:cut]))
        if manager.config.preset(name) is not None:
            return name, "/" + "/".join(parts[cut:])
    raise UnknownModel(parts[0], sorted(p.name for p in manager.config.presets))


class Passthrough:
    """Forwards ``/upstream/{model}/{path}`` through the proxy's lease and relay."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def route(self, request: web.Request) -> web.StreamResponse:
        """Any method: the request, re-targeted at the backend's own path."""
        count(request)
        raw = request.raw_path
        if not raw.startswith("/"):
            # The absolute form (RFC 9112 section 3.2.2): the path after the authority.
            raw = request.rel_url.raw_path_qs
        if "#" in raw:  # after a "?" too: backend_path only sees the path
            raise BadRequest("a request target cannot hold '#'")
        raw_path, _, query = raw.partition("?")
        model, path = split_target(raw_path, self.proxy.manager)
        request["model"] = model  # a refused route is counted under its model too
        preset = self.proxy.manager.config.preset(model)
        own = kind_of(preset).reserved_routes if preset is not None else frozenset()
        path = backend_path(path, RESERVED | own)
        query, autoload = take_autoload(query)
        body = await read_body(request, self.proxy.max_body, self.proxy.body_timeout)
        # Built from its parts: parsed whole, a path could be read as a host.
        target = URL.build(path=path, query_string=query, encoded=True)
        # The clone shares the connection; only the path the backend sees differs.
        upstream = request.clone(rel_url=target)
        upstream[AS_SENT] = True
        return await self.proxy.forward(upstream, model, body, passive=not autoload)


def take_autoload(query: str) -> tuple[str, bool]:
    """The query without its ``autoload`` parameters, and whether they allow a load.

    ``autoload=false`` (as llama.cpp's router reads it) asks for a passive request: a
    monitor's scrape of ``/metrics`` must neither load the model nor keep it loaded.
    The parameter is swapd's: the backend never sees it. Anything but true or false is a
    400, not a quiet default.
    """
    if "autoload" not in query and "%" not in query:  # %61utoload is autoload too
        return query, True
    kept, autoload = [], True
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if unquote(name) != "autoload":
            kept.append(part)
            continue
        autoload = query_flag("autoload", unquote(value))
    return "&".join(kept), autoload
