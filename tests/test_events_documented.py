"""Every event swapd logs is documented in docs/events.md, and the doc names no other.

Event names are part of swapd's interface: log queries and alerts select on them. The
events are collected from the source with ``ast``, not by running swapd: every call on a
logger (a name bound to ``get_logger(...)`` or ``HotLogger(...)``, or named ``_log``,
``logger``, ``*_log``) whose first argument is the event name. A call whose event the
collector cannot read (a variable it cannot trace) fails the test rather than slip past.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "swapd"
DOC = ROOT / "docs" / "events.md"

# structlog's level methods (and their async forms), as the loggers of swapd.logs offer them.
_LEVELS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "msg"})
METHODS = _LEVELS | {f"a{name}" for name in _LEVELS}
# What swapd.logs hands out.
FACTORIES = frozenset({"get_logger", "HotLogger"})
# Loggers by name: _log, _done_log, log, logger, self._log.
LOGGER_NAME = re.compile(r"^_?(\w+_)?log(ger)?$")
EVENT = re.compile(r"^[a-z_]+(\.[a-z_]+)+$")
# A row of an event table in docs/events.md: its first cell, the event in backticks.
DOC_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.MULTILINE)
DOC_HEADER = re.compile(r"^\|\s*Event\s*\|", re.MULTILINE)


@dataclass
class Found:
    """What the collector read: events by name (with where), and calls it could not read."""

    events: dict[str, list[str]] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)

    def add(self, name: str, where: str) -> None:
        """One place that logs ``name``."""
        self.events.setdefault(name, []).append(where)


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _is_logger(node: ast.expr, loggers: set[str]) -> bool:
    """A logger object: a known or logger-like name, ``self._log``, or ``get_logger(...)``."""
    if isinstance(node, ast.Name):
        return node.id in loggers or bool(LOGGER_NAME.match(node.id))
    if isinstance(node, ast.Attribute):
        return bool(LOGGER_NAME.match(node.attr))
    if isinstance(node, ast.Call):
        return _called_name(node.func) in FACTORIES
    return False


def _is_log_method(node: ast.expr, loggers: set[str]) -> bool:
    """``_log.info``, or a choice between such (``_log.warning if warn else _log.info``)."""
    if isinstance(node, ast.IfExp):
        return _is_log_method(node.body, loggers) and _is_log_method(node.orelse, loggers)
    return (
        isinstance(node, ast.Attribute) and node.attr in METHODS and _is_logger(node.value, loggers)
    )


def _names_bound(tree: ast.Module, accept: Callable[[ast.expr], bool]) -> set[str]:
    """Names assigned anywhere in ``tree`` from a value ``accept`` takes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and accept(node.value):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _literal(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _first_arg(call: ast.Call) -> ast.expr | None:
    return call.args[0] if call.args else None


class _Collector(ast.NodeVisitor):
    """One module: the events its logger calls name, and the calls it cannot read."""

    def __init__(self, tree: ast.Module, where: str, found: Found, carriers: Found) -> None:
        self.where = where
        self.found = found
        # Classes that log an event held in ``self`` (``_Tally("connection.refused")``), as
        # ``module.Class``: their constructors' literals are read once every module is seen.
        self.carriers = carriers
        self.loggers = _names_bound(
            tree, lambda v: isinstance(v, ast.Call) and _called_name(v.func) in FACTORIES
        )
        self.methods = _names_bound(tree, lambda v: _is_log_method(v, self.loggers))
        self.classes: list[str] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        """Remember the class, for events held in ``self``."""
        self.classes.append(node.name)
        self.generic_visit(node)
        self.classes.pop()

    def visit_Call(self, node: ast.Call) -> None:
        """A logger call, a logger method passed to ``partial``, or neither."""
        func = node.func
        if _is_log_method(func, self.loggers) or (
            isinstance(func, ast.Name) and func.id in self.methods
        ):
            self._event(node, _first_arg(node))
        elif (
            _called_name(func) == "partial"
            and node.args
            and _is_log_method(node.args[0], self.loggers)
        ):
            self._event(node, node.args[1] if len(node.args) > 1 else None)
        self.generic_visit(node)

    def _event(self, call: ast.Call, arg: ast.expr | None) -> None:
        where = f"{self.where}:{call.lineno}"
        name = _literal(arg)
        if name is not None:
            if EVENT.match(name):
                self.found.add(name, where)
            else:
                self.found.unread.append(f"{where}: {name!r} is not named noun.verb")
            return
        held_in_self = (
            isinstance(arg, ast.Attribute)
            and isinstance(arg.value, ast.Name)
            and arg.value.id == "self"
            and self.classes
        )
        if held_in_self:
            self.carriers.add(f"{_module(self.where)}.{self.classes[-1]}", where)
            return
        shown = ast.unparse(arg) if arg is not None else "nothing"
        self.found.unread.append(f"{where}: logs {shown}, which the collector cannot read")


def _module(where: str) -> str:
    """``swapd/limits.py`` as its module's name, ``swapd.limits``."""
    return where.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _sees(tree: ast.Module, where: str, module: str, name: str) -> bool:
    """Whether a call to ``name`` in ``tree`` is a call to ``module``'s class of that name."""
    if _module(where) == module:
        return True
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == module
        and any(alias.name == name and alias.asname is None for alias in node.names)
        for node in ast.walk(tree)
    )


def _carried(trees: dict[str, ast.Module], carriers: set[str], found: Found) -> None:
    """Events handed to classes that log ``self.<attr>``: their constructors' literals."""
    for carrier in sorted(carriers):
        module, name = carrier.rsplit(".", 1)
        for where, tree in trees.items():
            if not _sees(tree, where, module, name):
                continue
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and _called_name(node.func) == name):
                    continue
                event = _literal(_first_arg(node))
                if event is not None and EVENT.match(event):
                    found.add(event, f"{where}:{node.lineno}")
                else:
                    found.unread.append(
                        f"{where}:{node.lineno}: {ast.unparse(node)} carries no event name"
                    )


@functools.cache
def collect(source: Path = SOURCE) -> Found:
    """Every event logged under ``source``, by static reading."""
    trees: dict[str, ast.Module] = {}
    for path in sorted(source.rglob("*.py")):
        where = str(path.relative_to(source.parent))
        trees[where] = ast.parse(path.read_text(), filename=where)
    found, carriers = Found(), Found()
    for where, tree in trees.items():
        if where == "swapd/logs.py":
            continue  # the loggers themselves: HotLogger.info passes its caller's event on
        _Collector(tree, where, found, carriers).visit(tree)
    _carried(trees, set(carriers.events), found)
    return found


def documented() -> list[str]:
    """The events docs/events.md documents: the first cell of each row of its event tables."""
    names: list[str] = []
    for table in DOC_HEADER.split(DOC.read_text())[1:]:
        rows = table.split("\n\n", 1)[0]
        names += DOC_ROW.findall(rows)
    return names


def test_the_collector_reads_every_logger_call() -> None:
    """No logger call logs something the collector cannot name (nor a name out of pattern)."""
    assert collect().unread == []


def test_the_collector_finds_events_logged_every_way() -> None:
    """Literal calls over several lines, HotLogger, aliases, partial and carried names."""
    events = collect().events
    assert len(events) >= 74
    for name in (
        "model.load.done",  # the name on the line after the call
        "request.done",  # HotLogger
        "swapd.embedded",  # get_logger(...).info(...)
        "http.invalid",  # log = _log.debug if ... else _log.info
        "swapd.signal.ignored",  # functools.partial(_log.warning, ...)
        "connection.refused",  # _Tally("connection.refused", ...) logs self.event
        "connection.timeout",
    ):
        assert name in events, name


def test_every_event_is_documented() -> None:
    """An event added to the code without a row in docs/events.md fails here."""
    rows = set(documented())
    missing = {name: where for name, where in collect().events.items() if name not in rows}
    assert missing == {}, f"add these events to {DOC.relative_to(ROOT)}: {missing}"


def test_every_documented_event_is_logged() -> None:
    """A row for an event the code no longer logs (renamed, removed) fails here."""
    events = collect().events
    stale = [name for name in documented() if name not in events]
    assert stale == [], f"{DOC.relative_to(ROOT)} documents events swapd never logs: {stale}"


def test_each_event_has_one_row() -> None:
    """One row per event, so a name is documented in one place."""
    names = documented()
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
