"""The CLI's side of the control API: which swapd to ask, with which key, and how.

The address is, in order: ``--url``, ``$SWAPD_URL``, the ``listen`` of
``--config`` (default ``$SWAPD_CONFIG``, else ``/etc/swapd/swapd.yaml`` where
it exists, as ``scripts/install-service`` writes it), else
``http://127.0.0.1:8080``. The admin key is ``--key``, ``$SWAPD_KEY``, else the
config's ``admin_keys`` or ``admin_keys_file`` (readable on swapd's own host).
Only those keys are read from the config, never its presets.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp

from swapd.config import Config, Endpoint, load_endpoint
from swapd.errors import SwapdError

SYSTEM_CONFIG = Path("/etc/swapd/swapd.yaml")
DEFAULT_URL = "http://127.0.0.1:8080"
KEY_HINT = (
    "this swapd needs an admin key: pass --key KEY, set SWAPD_KEY, or pass --config on "
    "swapd's host so the key is read from admin_keys or admin_keys_file"
)
# How long a verb that swapd answers at once (status, plan) waits for the answer: a swapd
# whose loop is blocked, or a stopped process, still completes the TCP handshake.
ANSWER_WITHIN = 20.0
# Listen addresses that mean "every address", and the loopback a local client uses for each:
# "::" binds IPv6 alone (the loop sets IPV6_V6ONLY), "" both families.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - names, not binds


# Of an answer that is not JSON (a proxy's error page), the most a message shows.
_TEXT_SHOWN = 300
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


class ClientError(Exception):
    """A request to swapd failed; the message says what to do."""

    def __init__(
        self, message: str, status: int | None = None, body: Any = None, *, silent: bool = False
    ) -> None:
        self.status = status
        self.body = body
        self.silent = silent  # it took the connection and never answered: it runs, stuck
        super().__init__(message)


def config_path(arg: str | None) -> Path | None:
    """``--config``, else ``$SWAPD_CONFIG``; None when neither is given."""
    chosen = arg or os.environ.get("SWAPD_CONFIG")
    return Path(chosen) if chosen else None


def url_of(config: Config | Endpoint) -> str:
    """The URL a local client reaches a config's listen address at."""
    host = _WILDCARDS.get(config.host, config.host)
    return f"http://[{host}]:{config.port}" if ":" in host else f"http://{host}:{config.port}"


def is_http_url(url: str) -> bool:
    """Whether ``url`` is http or https, with a host and a valid port (or none)."""
    try:
        parsed = urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError when out of range or not a number
    except ValueError:
        return False
    return parsed.scheme in {"http", "https"} and bool(parsed.hostname)


def _check_url(url: str, *, given: str) -> None:
    """Raise :class:`ClientError` unless a swapd could answer at ``url`` (``given`` by the user)."""
    if not is_http_url(url):
        hint = "write it as http://HOST:PORT (an IPv6 address in brackets: http://[::1]:8080)"
        raise ClientError(f"not a usable swapd URL: {given!r}; {hint}")


@dataclass(frozen=True)
class Target:
    """Where a running swapd answers, and the key to send."""

    url: str
    key: str | None
    key_problem: str | None = None  # why the config's admin key could not be read
    # The config that would have said where swapd listens, unreadable here (the system
    # one is 0640, group swapd): the default address was used instead.
    address_problem: str | None = None

    @classmethod
    def resolve(cls, url: str | None, config: str | None, key: str | None) -> Target:
        """See the module docstring for the order."""
        # Empty ones (SWAPD_KEY= in a unit, --key "$UNSET") are unset: the config still counts.
        url = url or os.environ.get("SWAPD_URL") or None
        key = key or os.environ.get("SWAPD_KEY") or None
        path = config_path(config)
        explicit = path is not None
        if path is None and url is None and SYSTEM_CONFIG.is_file():
            path = SYSTEM_CONFIG
        problem = address_problem = None
        if path is not None and (url is None or key is None):
            # Its listen address and admin keys only: a preset broken since swapd
            # started must not keep the CLI from the swapd that runs.
            try:
                endpoint: Endpoint | None = load_endpoint(path)
            except SwapdError as exc:
                if explicit and url is None:  # asked for, and nothing else says where
                    raise ClientError(f"{path}: cannot be read:\n{exc}") from exc
                endpoint = None  # /etc/swapd/swapd.yaml unreadable here: the default address
                problem = f"{path}: cannot be read:\n{exc}"
                address_problem = None if url else problem
            if endpoint is not None:
                url = url or url_of(endpoint)
                key = key or next(iter(endpoint.admin_keys), None)
                problem = endpoint.key_problem
        url = url or DEFAULT_URL
        full = url if "://" in url else f"http://{url}"  # 127.0.0.1:8080, as listen writes it
        _check_url(full, given=url)
        return cls(full.rstrip("/"), key, None if key else problem, address_problem)


class Client:
    """An HTTP session with one swapd (``async with Client(target) as client``)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
        # Loads and followed streams take as long as they take; a dead address fails fast.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._session.close()

    async def call(
        self, method: str, path: str, *, within: float | None = None, expect: str | None = None
    ) -> Any:
        """One request; its JSON answer, or :class:`ClientError` with swapd's message.

        ``within``: seconds of silence after which swapd counts as stuck (None: no limit).
        ``expect``: a key swapd's answer has; without it, another program answered.
        """
        url = self.target.url + path
        timeout = self._session.timeout
        if within is not None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=within)
        try:
            async with self._session.request(method, url, timeout=timeout) as resp:
                body = await _json_or_text(resp)
                if resp.status >= 400:
                    raise ClientError(self._refusal(resp.status, body), resp.status, body)
                if not isinstance(body, dict) or (expect is not None and expect not in body):
                    # Another program on the port (a web UI, a login page) answers every path.
                    msg = (
                        f"{url} answered {resp.status} but not with swapd's JSON: is swapd"
                        " listening there?"
                    )
                    raise ClientError(msg, resp.status, body)
                return body
        except aiohttp.SocketTimeoutError as exc:
            msg = f"{self.target.url} took the connection but did not answer within {within:g}s"
            raise ClientError(msg, silent=True) from exc
        except aiohttp.ClientError as exc:
            raise ClientError(self._unreachable(exc)) from exc

    def _unreachable(self, exc: Exception) -> str:
        text = f"cannot reach {self.target.url}: {exc}"
        if self.target.address_problem:
            hint = "pass --url, or run as a member of the group swapd"
            text += f"\n(the default address: {self.target.address_problem}; {hint})"
        return text

    async def events(self, path: str) -> AsyncIterator[tuple[str, Any]]:
        """Server-sent events from ``path``: each ``(event, data)``, data decoded from JSON."""
        url = self.target.url + path
        try:
            async with self._session.get(url) as resp:
                if resp.status >= 400:
                    body = await _json_or_text(resp)
                    raise ClientError(self._refusal(resp.status, body), resp.status, body)
                if resp.content_type != "text/event-stream":
                    msg = (
                        f"{url} answered {resp.status} but not with swapd's event stream: is"
                        " swapd listening there?"
                    )
                    raise ClientError(msg, resp.status)
                event, data = "message", []
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield event, _event_data(url, "\n".join(data))
                        event, data = "message", []
        except aiohttp.ClientError as exc:
            raise ClientError(self._unreachable(exc)) from exc

    def _refusal(self, status: int, body: Any) -> str:
        message = error_message(body)
        if message is None:  # not swapd's envelope: what was sent
            message = one_line(body) if isinstance(body, str) else json.dumps(body)
        text = f"{self.target.url} answered {status}: {message or 'no details'}"
        if status not in (401, 403):
            return text
        if self.target.key_problem:
            return f"{text}\nthe config's admin key could not be read: {self.target.key_problem}"
        return f"{text}\n{KEY_HINT}"


def _event_data(url: str, data: str) -> Any:
    """An event's data, decoded from JSON; a stream of another kind is a :class:`ClientError`."""
    try:
        return json.loads(data)
    except ValueError:
        msg = f"{url} sent an event that is not swapd's JSON: {one_line(data)}"
        raise ClientError(msg) from None


def one_line(text: str) -> str:
    """An answer that is not JSON, as one short line: an HTML page by its title.

    Nginx's 502 page, a swapd behind it down, is seven lines ended by CR LF.
    """
    title = _TITLE.search(text)
    if title is not None:
        return f"{' '.join(title.group(1).split())} (an HTML page, not swapd's JSON)"
    line = " ".join(text.split())
    return line if len(line) <= _TEXT_SHOWN else f"{line[:_TEXT_SHOWN]}..."


def error_message(body: Any) -> str | None:
    """The message of swapd's error envelope; None for any other answer.

    A proxy in front answers its own JSON (``{"message": ...}``, ``{"error": "Bad Gateway"}``).
    """
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


async def _json_or_text(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()
