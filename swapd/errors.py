"""Every error swapd raises, with the facts that explain it.

    SwapdError
    ├── ConfigError              one bad key: file, line, column, key, reason
    │   └── ConfigErrors         several ConfigError found in one pass
    └── RequestError             answered to an HTTP client as an OpenAI-shaped envelope
        ├── BadRequest           400: bad JSON, no model, bad form
        │   ├── TooDeep          400: JSON nested deeper than swapd parses
        │   ├── MalformedHttp    400: not HTTP swapd can read (framing, request line)
        │   └── HeadersTooLarge  431: header lines too long or too many
        ├── Unauthorized         401: no key, or not a key swapd knows
        ├── Forbidden            403: an inference key on an admin route; a foreign Origin
        ├── UnknownModel         404: the model is not configured (lists the names)
        ├── RequestTimeout       408: the body did not arrive within ``body_timeout``
        ├── BodyTooLarge         413: the body is over ``max_body``
        ├── MisdirectedRequest   421: a Host that names neither swapd nor ``allowed_hosts``
        ├── BackendStartError    502: the backend could not start, died or timed out starting
        ├── BackendGone          502: the backend died while serving the request
        ├── BackendErrorText     the backend's own 4xx/5xx, not JSON: its text in the envelope
        ├── UpstreamTimeout      504: no answer within the preset's request_timeout
        ├── LoadFailed           500: an unexpected error while loading (logged with its trace)
        ├── StageFailed          500: staging the weights failed (checksum, I/O)
        ├── QueueFull            429 + Retry-After: the model's concurrency and max_queue are full
        └── Unavailable          503: cannot be served now (shutting down, unloading)
            ├── TooManyConnections   503 + Retry-After: swapd is at ``max_connections``
            ├── InsufficientMemory   503 + Retry-After: no plan of evictions can make room
            │   └── NeverFits        503 + Retry-After: no device could hold it, even empty
            ├── CacheFull            503: the staging cache cannot make room (with the numbers)
            ├── BackingOff           503 + Retry-After: a start failed; the next waits
            ├── BreakerOpen          503: starts failed too often in a row; load it by hand
            └── QueueTimeout         503 + Retry-After: victims stayed busy too long

This module imports nothing from swapd so that any module may raise these.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

# What a death by each signal usually means for a model server, in words a user can act on.
_SIGNAL_HINTS = {
    signal.SIGILL: "illegal instruction: this binary needs CPU features the machine does not offer",
    signal.SIGSEGV: "segmentation fault: the backend crashed",
    signal.SIGKILL: "often the kernel's OOM killer: check `dmesg`",
    signal.SIGBUS: "bus error: often a model file that shrank or changed while mapped",
    signal.SIGABRT: "aborted: the backend hit a fatal error, see its output",
    signal.SIGFPE: "arithmetic exception: the backend crashed",
}
# Shells report a child killed by signal N as exit status 128 + N.
_SHELL_SIGNAL_BASE = 128
# Client-supplied names (models, hosts, paths) are cut to this before they are echoed or logged.
CLIP = 120


def clip(text: str, limit: int = CLIP) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def describe_exit(code: int) -> str:
    """An exit status in words: ``exited with 1``, or ``killed by SIGILL (illegal ...)``."""
    if code < 0:
        return _killed_by(-code)
    if _SHELL_SIGNAL_BASE < code < _SHELL_SIGNAL_BASE + 65:
        sig = code - _SHELL_SIGNAL_BASE
        if sig in _SIGNAL_HINTS:
            return f"exited with {code}, which a shell gives when its child is {_killed_by(sig)}"
    return f"exited with {code}"


def _killed_by(number: int) -> str:
    try:
        sig = signal.Signals(number)
    except ValueError:
        return f"killed by signal {number}"
    hint = _SIGNAL_HINTS.get(sig)
    return f"killed by {sig.name} ({hint})" if hint else f"killed by {sig.name}"


class SwapdError(Exception):
    """Base of every error swapd raises on purpose."""


@dataclass(frozen=True)
class Location:
    """Where in a config file something was written (1-based line and column)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class ConfigError(SwapdError):
    """One bad key in a config or preset file."""

    def __init__(self, where: Location, key: str, reason: str) -> None:
        self.where = where
        self.key = key
        self.reason = reason
        super().__init__(f"{where}: {key}: {reason}")


class ConfigErrors(SwapdError):
    """All the errors found while loading a config and its presets."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        # Once each: a problem in `defaults:` is found again by every preset that takes it.
        unique = {str(e): e for e in errors}.values()
        # In file order: each file where its first error was found, its errors by line and
        # column (checks across keys run after those of each key, and may point above them).
        files = {e.where.file: index for index, e in reversed(list(enumerate(unique)))}
        self.errors = tuple(
            sorted(unique, key=lambda e: (files[e.where.file], e.where.line, e.where.column))
        )
        super().__init__("\n".join(str(e) for e in self.errors))


class RequestError(SwapdError):
    """An error answered to an HTTP client."""

    status = 500
    kind = "server_error"
    code: str | None = None

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        """Extra response headers, such as Retry-After."""
        return {}

    def twin(self) -> Self:
        """A copy to raise to one of the several requests this error answers.

        Raising one object to each would add every request's frames to its traceback, and
        the original is kept (a model's last error): it would hold those requests, and their
        connections, for as long. Made without ``__init__``, whose arguments differ by class.
        """
        twin = BaseException.__new__(type(self), *self.args)
        twin.__dict__.update(self.__dict__)
        if "__notes__" in self.__dict__:  # add_note's list: one's notes are not the other's
            twin.__notes__ = list(self.__notes__)
        twin.__cause__ = self.__cause__
        return twin

    def envelope(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI-shaped body every error is answered with."""
        return {
            "error": {"message": self.message, "type": self.kind, "code": self.code, "param": None}
        }


class BadRequest(RequestError):
    """The request cannot be read: bad JSON, no model, a broken form."""

    status = 400
    kind = "invalid_request_error"


class TooDeep(BadRequest):
    """The JSON body nests arrays and objects deeper than swapd parses."""

    code = "json_too_deep"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body nests JSON arrays and objects deeper than {limit} levels")


class MalformedHttp(BadRequest):
    """The request is not HTTP swapd can read: bad framing, a bad request line or header."""

    code = "malformed_http"


class HeadersTooLarge(BadRequest):
    """The request's header lines are too long or too many (431)."""

    status = 431
    code = "headers_too_large"


class Unauthorized(RequestError):
    """Keys are configured and the request carries none that swapd knows."""

    status = 401
    kind = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        """Name the scheme a client should use (RFC 9110 section 11.6.1)."""
        return {"WWW-Authenticate": 'Bearer realm="swapd"'}


class Forbidden(RequestError):
    """The request is understood and refused: the wrong kind of key, or a foreign Origin."""

    status = 403
    kind = "invalid_request_error"

    def __init__(self, message: str, code: str) -> None:
        self.code = code
        super().__init__(message)


class MisdirectedRequest(RequestError):
    """The Host header names a site swapd does not serve (a DNS rebinding guard)."""

    status = 421
    kind = "invalid_request_error"
    code = "host_not_allowed"


class RequestTimeout(RequestError):
    """The client did not send the whole body in time."""

    status = 408
    kind = "invalid_request_error"
    code = "body_timeout"  # named for the setting that ran out

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"the request body did not arrive within {seconds:g}s (body_timeout)")


class UnknownModel(RequestError):
    """The request names a model that no preset defines."""

    status = 404
    kind = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, known: Sequence[str]) -> None:
        model = clip(model)
        self.model = model
        self.known = tuple(known)
        super().__init__(
            f"model {model!r} is not configured; known models: {', '.join(self.known) or 'none'}"
        )


class BodyTooLarge(RequestError):
    """The request body is larger than the configured limit."""

    status = 413
    kind = "invalid_request_error"
    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body is larger than the limit of {limit} bytes")


# Of a failed backend's last output lines, the most an error message carries.
_TAIL_CHARS = 2000


class BackendStartError(RequestError):
    """A backend could not be started, exited, or missed its deadline while starting.

    ``reason`` overrides the wording taken from ``exit_code`` (for example, the
    binary was not found); ``exit_code`` is negative for a signal, None when the
    process did not exit.
    """

    status = 502
    kind = "server_error"
    code = "backend_start_failed"

    def __init__(
        self,
        model: str,
        exit_code: int | None,
        log_tail: Sequence[str],
        *,
        reason: str | None = None,
    ) -> None:
        self.model = model
        self.exit_code = exit_code
        self.log_tail = tuple(log_tail)
        if reason is None:
            reason = (
                "did not become ready in time" if exit_code is None else describe_exit(exit_code)
            )
        self.reason = reason
        tail = " | ".join(self.log_tail[-5:])
        if len(tail) > _TAIL_CHARS:  # the end is what says why: keep it
            tail = f"...[{len(tail) - _TAIL_CHARS} characters before] {tail[-_TAIL_CHARS:]}"
        super().__init__(f"backend for {model!r} {reason}; last output: {tail or '(none)'}")


class BackendGone(RequestError):
    """The backend closed the connection or died while serving."""

    status = 502
    kind = "server_error"
    code = "backend_gone"

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        super().__init__(f"backend for {model!r} failed while serving: {reason}")


class BackendErrorText(RequestError):
    """A backend's error answer on an OpenAI route that was not JSON (an HTML 500, text).

    Its status is kept; its text becomes the envelope's message, so SDKs that read
    ``error.message`` see the reason instead of failing to parse the body.
    """

    code = "backend_error"

    def __init__(self, model: str, status: int, body: bytes) -> None:
        self.model = model
        self.status = status
        self.kind = "invalid_request_error" if status < 500 else "server_error"
        text = " ".join(body.decode("utf-8", "replace").split()) or "(empty body)"
        super().__init__(f"backend for {model!r} answered {status}: {clip(text, 500)}")


class UpstreamTimeout(RequestError):
    """The backend did not answer within the preset's ``request_timeout``."""

    status = 504
    kind = "server_error"
    code = "request_timeout"

    def __init__(self, model: str, timeout: float) -> None:
        self.model = model
        super().__init__(f"backend for {model!r} did not answer within {timeout:g}s")


class LoadFailed(RequestError):
    """Loading failed for a reason swapd did not foresee; everything spawned was released."""

    status = 500
    kind = "server_error"
    code = "load_failed"

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        super().__init__(f"loading {model!r} failed: {reason}")


class StageFailed(RequestError):
    """Copying a model's weights into the staging cache failed; nothing was left behind."""

    status = 500
    kind = "server_error"
    code = "stage_failed"

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        super().__init__(f"cannot stage {model!r}: {reason}")


class NotLoaded(RequestError):
    """A request that may not load its model (``?autoload=false``) for a model not ready."""

    status = 409
    kind = "invalid_request_error"
    code = "model_not_loaded"

    def __init__(self, model: str, state: str) -> None:
        super().__init__(
            f"model {model!r} is {state}, and autoload=false asks not to load it: nothing was sent"
        )


class QueueFull(RequestError):
    """More requests for one model than its ``concurrency`` plus ``max_queue`` allow."""

    status = 429
    kind = "rate_limit_error"
    code = "queue_full"

    def __init__(self, model: str, limit: int, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(f"model {model!r} has {limit} requests running or waiting already")

    def headers(self) -> dict[str, str]:
        """Tell the client when to try again."""
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class Unavailable(RequestError):
    """The model cannot be served right now."""

    status = 503
    kind = "server_error"
    code = "unavailable"


class TooManyConnections(Unavailable):
    """swapd holds ``max_connections`` client connections already."""

    code = "too_many_connections"

    def __init__(self) -> None:
        super().__init__("swapd is at max_connections; try again shortly")

    def headers(self) -> dict[str, str]:
        """Connections free up quickly: idle ones time out."""
        return {"Retry-After": "1"}


class InsufficientMemory(Unavailable):
    """Even evicting every evictable model would not make room."""

    code = "insufficient_memory"
    # Memory held outside swapd, or by busy models, may free soon. A balancer in front (LiteLLM
    # takes Retry-After as the deployment's cooldown) then avoids this host for a while.
    RETRY_AFTER_S = 5

    def headers(self) -> dict[str, str]:
        """Tell the client, or the balancer in front, when this host may have room."""
        return {"Retry-After": str(self.RETRY_AFTER_S)}


class NeverFits(InsufficientMemory):
    """The model needs more than any of its devices holds, less ``reserve`` (or ``budget``).

    Nothing that swapd or other programs free changes that; a reload may.
    """


class CacheFull(Unavailable):
    """The staging cache cannot make room without evicting files that models use."""

    code = "cache_full"


class BackingOff(Unavailable):
    """The model's last start failed; no new start before ``retry_after`` seconds."""

    code = "backoff"

    def __init__(self, model: str, retry_after: float, last_error: str) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"model {model!r} is backing off after a failed start; retry in "
            f"{retry_after:.1f}s; last error: {last_error}"
        )

    def headers(self) -> dict[str, str]:
        """Tell the client when the next start may be tried."""
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class BreakerOpen(Unavailable):
    """Starts failed too often in a row; only an explicit load (or a preset change) retries."""

    code = "backend_failed"

    def __init__(self, model: str, failures: int, last_error: str) -> None:
        super().__init__(
            f"model {model!r} failed {failures} starts in a row and is not retried until it "
            f"is loaded explicitly (POST /swapd/models/{model}/load); last error: {last_error}"
        )


class QueueTimeout(Unavailable):
    """The models that would have to make room stayed busy past the queue timeout."""

    code = "queue_timeout"

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        """Tell the client when trying again may work."""
        return {"Retry-After": str(max(1, round(self.retry_after)))}
