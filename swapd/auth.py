"""Who may call which route: keys, the Host guard, the Origin guard and CORS.

Every request but ``GET /health`` passes these checks, in this order, before
any route runs (so an unknown route is refused like a known one):

1. **Host** (421). Without keys, or with ``allowed_hosts`` set, the Host header
   must name swapd's listen address, ``localhost`` or an ``allowed_hosts`` entry.
   A DNS-rebinding page reaches swapd under the attacker's own name; this is
   where it stops. An IP literal is never a rebinding name, so on a wildcard
   listen address every IP literal is accepted.
2. **Origin** (403). Browsers send ``Origin`` on every cross-origin POST, while
   curl and the SDKs send none; one not listed in ``cors_origins`` is refused.
3. **Keys** (401, 403). With keys set, each request needs one
   (``Authorization: Bearer KEY`` or ``x-api-key: KEY``); ``/swapd/*`` and
   ``/metrics`` need an admin key (``/metrics`` none with ``metrics_public``).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from swapd.errors import Forbidden, MisdirectedRequest, RequestError, Unauthorized, clip
from swapd.keys import KeyRing, Role

# What a route asks of its caller: nothing, the Host and Origin checks only, or a key.
Need = Literal["nothing", "checks", "inference", "admin"]
CORS_ORIGIN = web.RequestKey("cors_origin", str)
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - names for "every address"
_HOST_NAME = re.compile(r"^(\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)$")
_ORIGIN = re.compile(r"^([a-z][a-z0-9+.-]*)://([^/?#@\s]+?)(:(\d{1,5}))?/?$")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_ALLOW_METHODS = "GET, POST, OPTIONS"
_ALLOW_HEADERS = "Authorization, Content-Type, X-Api-Key, X-Request-Id"
_EXPOSE_HEADERS = "X-Request-Id, Retry-After"
_MAX_ASKED = 1000
# Sec-Fetch-Site values of a request that a page on another site started (Fetch Metadata).
_OTHER_SITES = frozenset({"cross-site", "same-site"})
_SEEN_MAX = 1024


def route_need(path: str, *, metrics_public: bool) -> Need:
    """What a path asks of its caller; unknown paths ask for an inference key."""
    path = "/" + path.lstrip("/")  # `//swapd/status` is still a control path
    if path == "/health":
        return "nothing"
    if path.rstrip("/") == "/metrics":
        return "checks" if metrics_public else "admin"
    if path == "/swapd" or path.startswith("/swapd/"):
        return "admin"
    return "inference"


def parse_allowed_hosts(value: Any) -> tuple[str, ...]:
    """``allowed_hosts``: names (``llm.example.com``), ``*.example.com``, IP literals, or ``*``."""
    if not isinstance(value, list):
        raise ValueError('expected a list of host names, like ["llm.example.com"]')
    hosts = []
    for item in value:
        name = str(item).strip().lower().rstrip(".")
        if not isinstance(item, str) or not (_HOST_NAME.match(name) or _ip_literal(name)):
            raise ValueError(
                f"expected a host name without scheme or port (like llm.example.com, "
                f"*.example.com or *), got {clip(str(item))!r}"
            )
        hosts.append(name)
    return tuple(hosts)


def _ip_literal(name: str) -> bool:
    """An IPv6 (or IPv4) address as written, with no port: ``::1``, ``fd00::5``."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def parse_origins(value: Any) -> tuple[str, ...]:
    """``cors_origins``: ``scheme://host[:port]`` each, or ``*``; default ports dropped."""
    if not isinstance(value, list):
        raise ValueError('expected a list of origins, like ["https://chat.example.com"]')
    origins = []
    for item in value:
        text = str(item).strip().lower()
        if text == "*":
            origins.append(text)
            continue
        match = _ORIGIN.match(text) if isinstance(item, str) else None
        port_ok = match is None or match[4] is None or 0 < int(match[4]) < 65536
        if match is None or text == "null" or not port_ok:
            raise ValueError(
                "expected an origin like https://chat.example.com or http://localhost:3000 "
                f"(scheme, host and port only), or *; got {clip(str(item))!r}"
            )
        scheme, host, _, port = match.groups()
        keep_port = port and port != _DEFAULT_PORTS.get(scheme)
        origins.append(f"{scheme}://{host}:{port}" if keep_port else f"{scheme}://{host}")
    return tuple(origins)


def host_name(header: str) -> str:
    """The name in a Host header: lower case, no port, no brackets, no trailing dot.

    A bracketed literal counts only as ``[addr]`` or ``[addr]:port``; with anything else
    around it the whole header is the name, which matches no address.
    """
    value = header.strip().lower()
    if value.startswith("["):
        literal, bracket, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
        whole = bracket and (not rest or (rest.startswith(":") and port.isdigit()))
        return literal if whole else value
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class HostGuard:
    """The Host names swapd answers to; everything else is a misdirected request."""

    listen: str
    allowed: tuple[str, ...] = ()
    # Host headers repeat (one or two per client), so each answer is kept, up to a bound.
    _seen: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def allows(self, header: str | None) -> bool:
        """Whether a Host header (None when absent, as in HTTP/1.0) may be served."""
        if header is None:
            return True  # no browser omits Host; a client that does is not a rebinding page
        known = self._seen.get(header)
        if known is None:
            known = self._decide(host_name(header))
            if len(self._seen) < _SEEN_MAX:
                self._seen[header] = known
        return known

    def _decide(self, name: str) -> bool:
        # The listen host itself, unless it is every address ("": no name to match).
        if name in {"localhost", host_name(self.listen) or "localhost"} or "*" in self.allowed:
            return True
        ip = _ip(name)
        if ip is not None and (ip.is_loopback or self.listen in _WILDCARDS):
            return True
        return any(
            name == entry or (entry.startswith("*.") and name.endswith(entry[1:]))
            for entry in self.allowed
        )


@dataclass(frozen=True)
class Access:
    """Everything the checks need, built once from the config."""

    keys: KeyRing
    hosts: HostGuard | None  # None: the Host check is off (keys are set, no allowed_hosts)
    origins: frozenset[str]
    metrics_public: bool = False

    @classmethod
    def build(  # noqa: PLR0913 - one argument per config key
        cls,
        *,
        listen: str,
        api_keys: Iterable[str] = (),
        admin_keys: Iterable[str] = (),
        allowed_hosts: tuple[str, ...] = (),
        cors_origins: Iterable[str] = (),
        metrics_public: bool = False,
    ) -> Access:
        """The checks for one daemon config."""
        keys = KeyRing.of(api_keys, admin_keys)
        guard = HostGuard(listen, allowed_hosts) if allowed_hosts or not keys.enabled else None
        return cls(keys, guard, frozenset(cors_origins), metrics_public)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser page from ``origin`` may call swapd."""
        return "*" in self.origins or origin.strip().lower() in self.origins

    def check(self, request: web.Request, need: Need) -> None:
        """Raise the error a request gets for this route, or return when it may go on."""
        if need == "nothing":
            return
        if self.hosts is not None and not self.hosts.allows(request.headers.get("Host")):
            host = clip(request.headers.get("Host", ""), 80)
            raise MisdirectedRequest(
                f"this swapd does not answer to the host {host!r}; add it to allowed_hosts "
                "(the Host guard stops DNS rebinding), or configure api_keys"
            )
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin):
            raise Forbidden(
                f"requests from the web origin {clip(origin, 80)!r} are refused; "
                "list it in cors_origins to allow it",
                "origin_not_allowed",
            )
        if origin is None and request.headers.get("Sec-Fetch-Site") in _OTHER_SITES:
            # A browser fetch that carries no Origin (an <img>, a link, a form GET) from
            # another site's page: without keys it could load and evict models.
            raise Forbidden(
                "requests that another site's page makes the browser send are refused; "
                "call swapd from a listed origin (cors_origins) with CORS",
                "origin_not_allowed",
            )
        if need == "checks" or not self.keys.enabled:
            return
        presented = presented_keys(request.headers)
        roles = {self.keys.role(key) for key in presented}  # each compared, whatever matched
        role: Role | None = (
            "admin" if "admin" in roles else "inference" if "inference" in roles else None
        )
        if role is None:
            said = "an unknown key" if presented else "no key"
            raise Unauthorized(
                f"this swapd needs a key and the request carries {said}; send "
                "`Authorization: Bearer KEY` or `x-api-key: KEY`"
            )
        if need == "admin" and role != "admin":
            raise Forbidden(
                f"{clip(request.path, 80)} needs an admin key (admin_keys); "
                "an inference key is not enough",
                "admin_key_required",
            )

    def admit(self, request: web.Request) -> web.Response | None:
        """Run the checks (raising their error); a preflight's answer, or None to go on.

        Marks a request from an allowed origin for CORS. Not a coroutine: the envelope
        calls it in its own frame, one coroutine less a request.
        """
        need = route_need(request.path, metrics_public=self.metrics_public)
        origin = request.headers.get("Origin")
        preflight = (
            request.method == "OPTIONS"
            and origin is not None
            and "Access-Control-Request-Method" in request.headers
        )
        allowed = origin is not None and self.origin_allowed(origin)
        if allowed and origin is not None:
            request[CORS_ORIGIN] = origin  # refusals too, so the page can read why
        # A browser never sends a key on a preflight: it only asks whether it may.
        self.check(request, "checks" if preflight and need != "nothing" else need)
        return _preflight(request) if preflight and allowed else None

    def allows(self, request: web.Request) -> bool:
        """Whether these checks let ``request`` in (a stream's, again after a reload)."""
        try:
            self.check(request, route_need(request.path, metrics_public=self.metrics_public))
        except RequestError:
            return False
        return True


def presented_keys(headers: Mapping[str, str]) -> list[bytes]:
    """Every key a request carries: in ``Authorization``, then in ``x-api-key``.

    A request may carry both: Anthropic's SDKs send ``x-api-key`` for ``api_key`` and a
    Bearer for ``auth_token``, both when both are set (one perhaps for another service),
    so a request is let in by any key swapd knows, with the strongest role among them.
    """
    found = [_authorization_key(headers)]
    if key := headers.get("x-api-key", "").strip():
        found.append(key.encode("utf-8", "surrogateescape"))
    return [key for key in found if key is not None]


def _authorization_key(headers: Mapping[str, str]) -> bytes | None:
    """The key in ``Authorization``: a Bearer token, or a Basic password.

    ``Authorization: Basic`` carries it as the password (``curl -u :KEY``, a scrape
    config's basic_auth), as llama-swap reads it; the user name is ignored.
    """
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() == "basic" and token.strip():
        try:
            pair = base64.b64decode(token.strip(), validate=True)
        except ValueError:  # binascii.Error, or a non-ASCII token (no base64 at all)
            return None
        _, colon, password = pair.partition(b":")
        if not colon or not password.strip():
            return None
        return password.strip()
    return None


def _preflight(request: web.Request) -> web.Response:
    # The browser asks before a POST with a JSON body or an Authorization header. The
    # origin is already trusted, so the headers it asks for may be sent.
    asked = request.headers.get("Access-Control-Request-Headers", "")
    sane = asked and len(asked) <= _MAX_ASKED and asked.isascii() and asked.isprintable()
    headers = {
        "Access-Control-Allow-Methods": _ALLOW_METHODS,
        "Access-Control-Allow-Headers": asked if sane else _ALLOW_HEADERS,
        "Access-Control-Max-Age": "600",
    }
    return web.Response(status=204, headers=headers)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer to an allowed origin (errors and streams too), let the page read it."""
    origin = request.get(CORS_ORIGIN)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = _EXPOSE_HEADERS
    response.headers.add("Vary", "Origin")


def listen_address(host: str, port: int) -> str:
    """A listen address as people write it: ``[::1]:8080``, or ``*:8080`` for every address."""
    if not host:
        return f"*:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def access_warnings(  # noqa: PLR0913 - the config's access keys, each named
    *,
    listen: str,
    port: int,
    api_keys: bool,
    admin_keys: bool,
    cors_origins: Iterable[str],
    allowed_hosts: Iterable[str] = (),
) -> list[str]:
    """What an operator should know about a config's access rules (logged at start, checked)."""
    warnings = []
    ip = _ip(listen)
    local = listen == "localhost" or (ip is not None and ip.is_loopback)
    if not local and not (api_keys or admin_keys):
        warnings.append(
            f"listening on {listen_address(listen, port)} without api_keys or admin_keys: "
            "anyone who can reach the port can use, load and unload every model (the Host "
            "check admits only IP addresses and allowed_hosts)"
        )
    if api_keys and not admin_keys:
        warnings.append(
            "api_keys without admin_keys: every key is refused on /swapd/* "
            "(status, load, unload, logs) and `swapd status`"
        )
    if "*" in cors_origins and not (api_keys or admin_keys):
        warnings.append('cors_origins: ["*"] without keys: any web page can use every model')
    if "*" in allowed_hosts and not (api_keys or admin_keys):
        warnings.append(
            'allowed_hosts: ["*"] without keys: the Host check admits any name, so a web page '
            "can reach swapd through DNS rebinding and use, load and unload every model"
        )
    return warnings
