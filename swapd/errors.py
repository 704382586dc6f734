"""Every error swapd raises, with the facts that explain it.

    SwapdError
    ├── ConfigError              one bad key: file, line, column, key, reason
    │   └── ConfigErrors         several ConfigError found in one pass
    └── RequestError             answered to an HTTP client as an OpenAI-shaped envelope
        ├── BadRequest           400: bad JSON, no model, bad form
        ├── UnknownModel         404: the model is not configured (lists the names)
        ├── BodyTooLarge         413: the body is over ``max_body``
        ├── BackendStartError    502: the backend exited or timed out while starting
        ├── BackendGone          502: the backend died while serving the request
        └── Unavailable          503: cannot be served now (shutting down, unloading)
            ├── InsufficientMemory   503: no plan of evictions can make room
            └── QueueTimeout         503 + Retry-After: victims stayed busy too long

This module imports nothing from swapd so that any module may raise these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
        self.errors = tuple(errors)
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


class BadRequest(RequestError):
    """The request cannot be read: bad JSON, no model, a broken form."""

    status = 400
    kind = "invalid_request_error"


class UnknownModel(RequestError):
    """The request names a model that no preset defines."""

    status = 404
    kind = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, known: Sequence[str]) -> None:
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


class BackendStartError(RequestError):
    """A backend exited or missed its deadline while starting."""

    status = 502
    kind = "server_error"
    code = "backend_start_failed"

    def __init__(self, model: str, exit_code: int | None, log_tail: Sequence[str]) -> None:
        self.model = model
        self.exit_code = exit_code
        self.log_tail = tuple(log_tail)
        how = "did not become ready in time" if exit_code is None else f"exited with {exit_code}"
        tail = " | ".join(self.log_tail[-5:])
        super().__init__(f"backend for {model!r} {how}; last output: {tail or '(none)'}")


class BackendGone(RequestError):
    """The backend closed the connection or died while serving."""

    status = 502
    kind = "server_error"
    code = "backend_gone"

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        super().__init__(f"backend for {model!r} failed while serving: {reason}")


class Unavailable(RequestError):
    """The model cannot be served right now."""

    status = 503
    kind = "server_error"
    code = "unavailable"


class InsufficientMemory(Unavailable):
    """Even evicting every evictable model would not make room."""

    code = "insufficient_memory"


class QueueTimeout(Unavailable):
    """The models that would have to make room stayed busy past the queue timeout."""

    code = "queue_timeout"

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        """Tell the client when trying again may work."""
        return {"Retry-After": str(max(1, round(self.retry_after)))}
