"""YAML loading that remembers where each key and value was written.

Config errors must name file, line, column and key, so the loader keeps the
YAML node marks instead of returning bare Python values.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from swapd import _json as capped_json
from swapd.errors import ConfigError, Location, clip

# Far past any config; a bound on what reading one may cost.
MAX_CONFIG_BYTES = 16 * 1024**2
# Values one key, and one file's keys together, may expand to: YAML aliases can repeat a
# node exponentially often in a few hundred bytes, and each error message or check would
# then walk every copy.
MAX_VALUES = 100_000
# The longest number text read: Python refuses to turn over 4,300 digits into an int.
MAX_NUMBER_TEXT = 1000


@dataclass(frozen=True)
class Entry:
    """One ``key: value`` of a mapping, with the value's location and the key's."""

    key: str
    value: Any
    where: Location
    node: yaml.Node
    key_where: Location  # where an error about the key itself (unknown, misplaced) points


@dataclass(frozen=True)
class Document:
    """A top-level YAML mapping: its entries in file order."""

    file: str
    entries: tuple[Entry, ...]
    where: Location


def node_location(file: str, node: yaml.Node) -> Location:
    """Where ``node`` starts in ``file``, 1-based."""
    mark = node.start_mark
    return Location(file, mark.line + 1, mark.column + 1)


class _SelfContaining(Exception):
    """A node that holds an alias of itself: a value without end."""

    def __init__(self, node: yaml.Node) -> None:
        self.node = node
        super().__init__()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (memoised by node).

    Raises :class:`_SelfContaining` for a node inside its own value (``&a [*a]``).
    """
    known = sizes.get(id(node))
    if known is not None:
        if known < 0:
            raise _SelfContaining(node)
        return known
    sizes[id(node)] = -1  # being walked: met again below itself, it contains itself
    size = 1 + sum(_expanded_size(child, sizes) for child in _children(node))
    sizes[id(node)] = size
    return size


def _repeated_key(node: yaml.Node, seen: set[int]) -> yaml.Node | None:
    """The first key given twice in a mapping anywhere inside ``node``, or None."""
    if id(node) in seen:
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[object] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in keys:
                    return key_node
                keys.add(key_node.value)
    found = (_repeated_key(child, seen) for child in _children(node))
    return next((r for r in found if r is not None), None)


def _children(node: yaml.Node) -> list[yaml.Node]:
    """A mapping's keys and values, a sequence's items; a scalar has none."""
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class WrittenInt(int):
    """An int that remembers how the file wrote it (``010``, ``1_000``)."""

    written: str


class WrittenFloat(float):
    """A float that remembers how the file wrote it (``3.10``)."""

    written: str


def yaml_kind(value: object) -> str:
    """What YAML read, for an error: ``int`` or ``float`` however the file wrote the number."""
    if isinstance(value, WrittenInt):
        return "int"
    if isinstance(value, WrittenFloat):
        return "float"
    return type(value).__name__


def written(value: float) -> str:
    """A number as the file wrote it, for keys that take text: ``3.10`` stays ``3.10``."""
    return getattr(value, "written", None) or str(value)


def _joined_surrogates(text: str, mark: yaml.Mark | None) -> str:
    """``text`` with escaped surrogate pairs (a JSON-style escape of U+1F600, say) joined.

    YAML reads each four-digit escape alone; a surrogate left over is no character, which
    no file name, argument, environment or log line can carry.
    """
    if text.isascii():
        return text
    try:
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        reason = (
            "an escape of a lone surrogate (\\ud800 to \\udfff) is no character;"
            " write one above \\uffff as \\U0001F600"
        )
        raise yaml.constructor.ConstructorError(None, None, reason, mark) from None


class _Loader(yaml.SafeLoader):
    """Safe YAML whose numbers keep their text (an ``env`` value or an argument is text)."""

    def construct_scalar(self, node: yaml.ScalarNode | yaml.MappingNode) -> str:
        return _joined_surrogates(super().construct_scalar(node), node.start_mark)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_NUMBER_TEXT:  # past any setting, and past what int() reads
            reason = f"a number written with more than {MAX_NUMBER_TEXT:,} characters"
            raise yaml.constructor.ConstructorError(None, None, reason, node.start_mark)
        value = WrittenInt(super().construct_yaml_int(node))
        value.written = str(node.value)
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value = WrittenFloat(super().construct_yaml_float(node))
        value.written = str(node.value)
        return value


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


class NestedValueError(ValueError):
    """A converter's error about one part of a nested value, which the error points at.

    ``path`` leads from the entry's value to that part: mapping keys and sequence
    indices. ``at_key``: the error is about the last key itself (a key not allowed
    there), not its value. ``key`` is the name the error gives, as ``filters.set_params``.
    """

    def __init__(
        self, key: str, path: tuple[str | int, ...], reason: str, *, at_key: bool = False
    ) -> None:
        self.key = key
        self.path = path
        self.at_key = at_key
        super().__init__(reason)


class NestedValueErrors(ValueError):
    """Several independent :class:`NestedValueError` about parts of one value, in its order."""

    def __init__(self, errors: list[NestedValueError]) -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(str(e) for e in errors))


class Problems:
    """Collects the errors about the parts of one value, to raise them all together.

    A converter that checks independent parts (the items of a list, the keys of a
    mapping) notes each part's error and goes on, so a file shows every problem at once.
    """

    def __init__(self) -> None:
        self.found: list[NestedValueError] = []

    def add(self, error: NestedValueError) -> None:
        """Note one error."""
        self.found.append(error)

    @contextlib.contextmanager
    def part(self) -> Iterator[None]:
        """Note the error that checking one part raises, and go on to the next."""
        try:
            yield
        except NestedValueErrors as exc:
            self.found.extend(exc.errors)
        except NestedValueError as exc:
            self.found.append(exc)

    def raise_any(self) -> None:
        """Raise what was noted: the one error alone, several together."""
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise NestedValueErrors(self.found)


def nested_location(
    file: str, node: yaml.Node, path: tuple[str | int, ...], *, at_key: bool
) -> Location:
    """Where the part of ``node`` that ``path`` leads to was written; the deepest found."""
    last = len(path) - 1
    for depth, step in enumerate(path):
        found: tuple[yaml.Node, yaml.Node] | None = None
        if isinstance(node, yaml.MappingNode):
            found = next((pair for pair in node.value if pair[0].value == str(step)), None)
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value)
        ):
            found = (node.value[step], node.value[step])
        if found is None:
            break  # written in a way the walk does not follow (a merge key): the nearest
        node = found[0] if at_key and depth == last else found[1]
    return node_location(file, node)


def json_value(
    value: Any, key: str, path: tuple[str | int, ...], room: int = capped_json.MAX_DEPTH
) -> Any:
    """``value`` as plain JSON types; :class:`NestedValueError` at what JSON cannot hold."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)  # YAML's int keeps how it was written: a plain one goes out
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NestedValueError(key, path, f"{value} is not a JSON number")
        return float(value)
    if isinstance(value, list | dict) and room < 1:
        reason = f"nested deeper than {capped_json.MAX_DEPTH} levels, which swapd refuses"
        raise NestedValueError(key, path, reason)
    if isinstance(value, list):
        return [json_value(v, key, (*path, i), room - 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for name in value:
            if not isinstance(name, str):
                reason = f"a JSON key is a string, got {clip(repr(name))}: quote it"
                raise NestedValueError(key, (*path, name), reason, at_key=True)
        return {n: json_value(v, key, (*path, n), room - 1) for n, v in value.items()}
    what = type(value).__name__  # a YAML date, timestamp, !!binary or !!set
    raise NestedValueError(key, path, f"a {what} is not a JSON value: quote it to send text")


def _plain(node: yaml.Node) -> Any:
    # Nested values become plain Python; only the top-level keys keep marks. Constructed
    # from the node itself: a round trip through text turns an empty value (null) into
    # "...", which does not parse back.
    loader = _Loader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _key_text(file: str, key_node: yaml.Node, what: str) -> str:
    """A mapping key's text; ``what``: the mapping, which an error about the key names."""
    if not isinstance(key_node, yaml.ScalarNode):
        # A list or mapping as key (``? [a]``) is no setting; its text, were it shown,
        # could be an alias bomb's billions of values.
        reason = "a key is a name, not a list or a mapping"
        raise ConfigError(node_location(file, key_node), what, reason)
    try:
        return _joined_surrogates(str(key_node.value), key_node.start_mark)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(node_location(file, key_node), what, str(exc.problem)) from None


def _value_of(file: str, key: str, value_node: yaml.Node) -> Any:
    """The value of ``key`` as plain Python; an error at the part safe YAML cannot build."""
    try:
        return _plain(value_node)
    except yaml.MarkedYAMLError as exc:  # a tag, a long number, a lone surrogate
        mark = exc.problem_mark  # the part of the value at fault, where one is named
        where = (
            Location(file, mark.line + 1, mark.column + 1)
            if mark
            else node_location(file, value_node)
        )
        raise ConfigError(where, key, str(exc.problem or exc)) from exc


def entries_of(file: str, node: yaml.Node, *, what: str) -> tuple[Entry, ...]:
    """Entries of a mapping node; duplicate keys are errors, as silent overrides hide mistakes."""
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(node_location(file, node), what, "expected a mapping of keys")
    seen: set[str] = set()
    out: list[Entry] = []
    sizes: dict[int, int] = {}  # shared: an anchor the keys repeat is walked once
    total = 0
    for key_node, value_node in node.value:
        key = _key_text(file, key_node, what)
        if key in seen:
            raise ConfigError(node_location(file, key_node), key, "key is given twice")
        seen.add(key)
        try:
            size = _expanded_size(value_node, sizes)
        except _SelfContaining as exc:  # every walk of it, a macro's or a check's, never ends
            reason = "holds an alias of itself, a value without end"
            raise ConfigError(node_location(file, exc.node), key, reason) from None
        if size > MAX_VALUES:
            reason = f"stands for more than {MAX_VALUES:,} values once its aliases are expanded"
            raise ConfigError(node_location(file, value_node), key, reason)
        total += size
        if total > MAX_VALUES:  # each key's value is built on its own: the copies add up
            reason = (
                f"with the keys before it, stands for more than {MAX_VALUES:,} values "
                "once their aliases are expanded"
            )  # at the key: an alias's node is where its anchor is written
            raise ConfigError(node_location(file, key_node), key, reason)
        repeated = _repeated_key(value_node, set())
        if repeated is not None:  # the last would silently win, as at the top level
            raise ConfigError(
                node_location(file, repeated), str(repeated.value), "key is given twice"
            )
        out.append(
            Entry(
                key,
                _value_of(file, key, value_node),
                node_location(file, value_node),
                value_node,
                node_location(file, key_node),
            )
        )
    return tuple(out)


def load_document(path: Path, *, label: str | None = None) -> Document:
    """Parse one YAML file whose top level must be a mapping (empty files are empty mappings)."""
    file = label or str(path)
    try:
        # Opened without blocking, so a FIFO named *.yaml cannot hang a check or a reload.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                reason = "not a regular file (a FIFO, a device or a folder)"
                raise ConfigError(Location(file, 1, 1), "(file)", reason)
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(Location(file, 1, 1), "(file)", f"cannot read: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        reason = f"larger than {MAX_CONFIG_BYTES // 1024**2} MiB: not a config file"
        raise ConfigError(Location(file, 1, 1), "(file)", reason)
    text = _decode(file, data)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return Document(file, (), Location(file, 1, 1))
        return Document(file, entries_of(file, node, what="(top level)"), node_location(file, node))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        reason = str(exc.problem or exc)
        if "'\\t'" in reason:  # an editor's tab, where YAML takes spaces only
            reason += ": YAML indents and separates with spaces, not tabs"
        raise ConfigError(where, "(yaml)", reason) from exc
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        reason = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        raise ConfigError(Location(file, line, column), "(yaml)", reason) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(Location(file, 1, 1), "(yaml)", str(exc).replace("\n", " ")) from exc
    except RecursionError as exc:
        raise _too_deep(file, text) from exc


# Nesting past which a file is not read; JSON values (metadata) stop at fewer levels.
_READ_DEPTH = 200


def _too_deep(file: str, text: str) -> ConfigError:
    """Where ``text`` nests too deeply, found again with the parser, which does not recurse."""
    depth = 0
    where = Location(file, 1, 1)
    with contextlib.suppress(yaml.YAMLError):  # an error past the depth: the depth is news
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > _READ_DEPTH and (mark := event.start_mark) is not None:
                    where = Location(file, mark.line + 1, mark.column + 1)
                    break
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    return ConfigError(
        where, "(yaml)", f"nested more than {_READ_DEPTH} levels deep: too deep to read"
    )


def _decode(file: str, data: bytes) -> str:
    """The file's text, or an ``encoding`` error at the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        reason = (
            f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}; save the file as UTF-8"
        )
        raise ConfigError(Location(file, line, column), "encoding", reason) from exc


def nested_entries(file: str, entry: Entry) -> tuple[Entry, ...]:
    """Entries of a nested mapping value such as ``defaults:``, with their own positions."""
    return entries_of(file, entry.node, what=entry.key)
