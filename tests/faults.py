"""Fault injection into a real swapd: one chosen function raises, a chosen number of times.

:func:`fault_env` returns the environment of a daemon whose interpreter, through a
``sitecustomize`` (:func:`daemon.hook_env`), replaces ``module:Qual.name`` as soon as that
module is imported, before any other module takes the name with ``from ... import``. The
replacement raises ``error`` (a plain exception, never one of swapd's own) on its calls
numbered ``skip + 1`` to ``skip + times`` and calls the original otherwise; a coroutine
function is replaced by a coroutine function. Each raise is written to ``SWAPD_FAULT_LOG``,
so a test can tell that the fault was met. :func:`calls_env` raises nothing and writes
every call to ``SWAPD_FAULT_CALLS`` instead: :func:`calls_made` counts how often swapd
called the function.
"""

from __future__ import annotations

from pathlib import Path

from daemon import hook_env

_HOOK = '''
import builtins
import functools
import importlib.abc
import importlib.util
import inspect
import os
import sys

_TARGET = os.environ.get("SWAPD_FAULT", "")
_MODULE, _, _QUALNAME = _TARGET.partition(":")
_ERROR = os.environ.get("SWAPD_FAULT_ERROR", "RuntimeError")
_SKIP = int(os.environ.get("SWAPD_FAULT_SKIP", "0"))
_TIMES = int(os.environ.get("SWAPD_FAULT_TIMES", "1"))
_LOG = os.environ.get("SWAPD_FAULT_LOG", "")
_CALLS = os.environ.get("SWAPD_FAULT_CALLS", "")
_calls = 0


def _fault():
    """Whether this call raises; counts it."""
    global _calls
    _calls += 1
    if _CALLS:
        with open(_CALLS, "a") as calls:
            calls.write(f"{_calls}\\n")
    if not _SKIP < _calls <= _SKIP + _TIMES:
        return None
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(f"{_TARGET} call {_calls}\\n")
    return getattr(builtins, _ERROR)(f"injected fault in {_QUALNAME}")


def _wrap(original):
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def faulty(*args, **kwargs):
            if (error := _fault()) is not None:
                raise error
            return await original(*args, **kwargs)

    else:

        @functools.wraps(original)
        def faulty(*args, **kwargs):
            if (error := _fault()) is not None:
                raise error
            return original(*args, **kwargs)

    return faulty


def _patch(module):
    *owners, name = _QUALNAME.split(".")
    owner = module
    for part in owners:
        owner = getattr(owner, part)
    original = inspect.getattr_static(owner, name)
    if isinstance(original, staticmethod):
        setattr(owner, name, staticmethod(_wrap(original.__func__)))
    else:
        setattr(owner, name, _wrap(original))


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _MODULE and _QUALNAME:
    sys.meta_path.insert(0, _Finder())
'''


def fault_env(
    tmp_path: Path, target: str, *, error: str = "RuntimeError", times: int = 1, skip: int = 0
) -> dict[str, str]:
    """The environment of a swapd in which ``target`` (``module:Qual.name``) raises ``error``.

    It raises on ``times`` calls after the first ``skip``; :func:`faults_met` reads how often.
    """
    return hook_env(tmp_path / "fault-hook", _HOOK) | {
        "SWAPD_FAULT": target,
        "SWAPD_FAULT_ERROR": error,
        "SWAPD_FAULT_SKIP": str(skip),
        "SWAPD_FAULT_TIMES": str(times),
        "SWAPD_FAULT_LOG": str(tmp_path / "faults.log"),
    }


def faults_met(tmp_path: Path) -> int:
    """How many times the injected fault has been raised so far."""
    log = tmp_path / "faults.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def calls_env(tmp_path: Path, target: str) -> dict[str, str]:
    """The environment of a swapd that counts its calls of ``target`` (and raises nothing)."""
    return fault_env(tmp_path, target, times=0) | {"SWAPD_FAULT_CALLS": str(tmp_path / "calls.log")}


def calls_made(tmp_path: Path) -> int:
    """How many times swapd has called the counted function so far."""
    log = tmp_path / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0
