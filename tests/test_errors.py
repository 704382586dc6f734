"""Errors raised to many requests: each gets a twin that says the same and holds no frames."""

from __future__ import annotations

import pytest

from swapd.errors import (
    BackendStartError,
    BackingOff,
    InsufficientMemory,
    RequestError,
    StageFailed,
    UnknownModel,
)


def _raised(error: RequestError) -> RequestError:
    try:
        raise error
    except RequestError as exc:
        return exc


@pytest.mark.parametrize(
    "error",
    [
        BackendStartError("m", 1, ["loading", "error: no such file"]),
        BackingOff("m", 2.5, "exit 1"),
        UnknownModel("x", ["a", "b"]),
        StageFailed("m", "sha256 mismatch"),
        InsufficientMemory("cannot load m: 8.0 GiB wanted, 2.0 GiB free"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_twin_answers_as_the_error_does_and_carries_no_traceback(error: RequestError) -> None:
    """A waiter's copy: the same answer, cause and facts, none of the original's frames."""
    original = _raised(error)
    cause = OSError("disk")
    original.__cause__ = cause
    twin = original.twin()
    assert twin is not original
    assert type(twin) is type(original)
    assert (twin.status, twin.envelope(), twin.headers()) == (
        original.status,
        original.envelope(),
        original.headers(),
    )
    assert str(twin) == str(original)
    assert vars(twin) == vars(original)
    assert twin.__traceback__ is None
    assert original.__traceback__ is not None
    assert twin.__cause__ is cause
