"""Property tests: request parsing and the preset loader answer any input with a typed error.

Whatever bytes arrive, reading a request yields a model name or :class:`BadRequest`,
never another exception; whatever a preset file holds, loading it yields presets or
:class:`ConfigErrors`. Hypothesis searches for the input that breaks that.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapd._json import MAX_DEPTH, depth
from swapd.errors import BadRequest, ConfigError, ConfigErrors, TooDeep
from swapd.presets import CONVERTERS, load_presets
from swapd.proxy import model_from_json, model_from_multipart

FAST = settings(max_examples=300, deadline=None)
FILES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Strings heavy in the characters a JSON scanner must get right.
TRICKY = st.text(alphabet=st.sampled_from('ab"\\[]{}\n\u2713\x00'), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=4),
    max_leaves=30,
)


def nesting(value: Any) -> int:
    """How deep arrays and objects nest in a parsed JSON value (the reference for depth())."""
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    return 0


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_give_a_model_or_bad_request(body: bytes) -> None:
    """Arbitrary bytes as a JSON body: a model name, or BadRequest; nothing else escapes."""
    try:
        model = model_from_json(body)
    except BadRequest:
        return
    assert isinstance(model, str)
    assert model


@FAST
@given(JSON_VALUES, st.text(min_size=1, max_size=20))
def test_the_model_of_any_json_object_is_found(value: Any, model: str) -> None:
    """Any JSON object carrying a model string yields exactly that string."""
    body = json.dumps({"x": value, "model": model}).encode()
    assert model_from_json(body) == model


@FAST
@given(JSON_VALUES)
def test_depth_matches_the_parsed_nesting(value: Any) -> None:
    """The byte scan measures the same nesting as walking the parsed value, strings and all."""
    for ascii_only in (True, False):
        body = json.dumps(value, ensure_ascii=ascii_only).encode()
        assert depth(body) == nesting(value)


@FAST
@given(st.integers(min_value=1, max_value=3 * MAX_DEPTH), st.sampled_from(["[", '{"k":']))
def test_nesting_over_the_cap_is_refused(levels: int, opener: str) -> None:
    """Bodies nested up to the cap parse; deeper ones are TooDeep, never a RecursionError."""
    closer = "]" if opener == "[" else "}"
    inner = opener * (levels - 1) + "1" + closer * (levels - 1)
    body = f'{{"model": "m", "x": {inner}}}'.encode()  # the outer object is level one
    if levels <= MAX_DEPTH:
        assert model_from_json(body) == "m"
    else:
        with pytest.raises(TooDeep):
            model_from_json(body)


@FAST
@given(
    st.integers(min_value=0, max_value=2_000),
    st.integers(min_value=1, max_value=2 * MAX_DEPTH),
    st.booleans(),
)
def test_a_deep_nest_among_many_shallow_ones_is_measured_whole(
    wide: int, levels: int, deep_first: bool
) -> None:
    """Rounds that drop the shallow pairs first still count every level of the deep one."""
    deep = "[" * levels + "]" * levels
    shallow = "[" + ",".join(["{}"] * wide) + "]"
    members = [f'"d": {deep}', f'"s": {shallow}']
    body = ("{" + ", ".join(members if deep_first else members[::-1]) + "}").encode()
    assert depth(body) == nesting(json.loads(body))


BOUNDARY = st.text(alphabet="abcdefXYZ0123456789'()+_,-./:=?", min_size=1, max_size=40)
FIELD = st.sampled_from(["model", "file", "prompt"]) | st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters='"\r\n'), max_size=10
)
VALUE = st.binary(max_size=40).filter(lambda b: b"\r\n" not in b and b"--" not in b)


@FAST
@given(BOUNDARY, st.lists(st.tuples(FIELD, VALUE), max_size=5), st.booleans())
def test_multipart_forms_give_their_model_field(
    boundary: str, fields: list[tuple[str, bytes]], quoted: bool
) -> None:
    """A well-formed form yields its one model field; BadRequest for none, an empty or two."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
        for name, value in fields
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    shown = f'"{boundary}"' if quoted else boundary
    content_type = f"multipart/form-data; boundary={shown}"
    models = [v.decode("utf-8", "replace").strip() for n, v in fields if n == "model"]
    try:
        got = model_from_multipart(body, content_type)
    except BadRequest:
        assert len(models) != 1 or not models[0]
        return
    assert [got] == models


def test_a_file_named_model_is_not_the_model_field() -> None:
    """``filename="model"`` before ``name="file"`` is a file part, not the model field."""
    body = (
        b'--b\r\nContent-Disposition: form-data; filename="model"; name="file"\r\n\r\n'
        b"RIFFDATA\r\n"
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--b--\r\n'
    )
    assert model_from_multipart(body, "multipart/form-data; boundary=b") == "whisper"


@FAST
@given(st.binary(max_size=300), st.text(max_size=80))
def test_any_form_bytes_give_a_model_or_bad_request(body: bytes, content_type: str) -> None:
    """Arbitrary bytes and content types: a model name, or BadRequest; nothing else escapes."""
    try:
        model = model_from_multipart(body, content_type)
    except BadRequest:
        return
    assert isinstance(model, str)


def load_one(data: bytes) -> None:
    """Load a presets directory holding one file with these bytes: one preset or ConfigErrors."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "m.yaml"
        file.write_bytes(data)
        problems: tuple[ConfigError, ...] = ()
        try:
            assert len(load_presets(Path(tmp), {})) == 1
        except ConfigErrors as exc:
            problems = exc.errors
    assert all(str(problem).startswith(f"{file}:") for problem in problems)


@FILES
@given(st.binary(max_size=200))
def test_any_preset_bytes_load_or_give_config_errors(data: bytes) -> None:
    """Arbitrary bytes in a preset file: a preset, or ConfigErrors naming the file."""
    load_one(data)


YAML_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=15)
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@FILES
@given(
    st.dictionaries(
        st.sampled_from([*CONVERTERS, "bogus"]) | st.text(max_size=8), YAML_VALUES, max_size=6
    )
)
def test_any_preset_mapping_loads_or_gives_config_errors(mapping: dict[Any, Any]) -> None:
    """Any mapping of real and made-up keys to any values: a preset, or ConfigErrors."""
    load_one(yaml.safe_dump(mapping, allow_unicode=True).encode())


@FILES
@given(st.text(max_size=200))
def test_any_preset_text_loads_or_gives_config_errors(text: str) -> None:
    """Arbitrary text, including characters YAML refuses: a preset, or ConfigErrors."""
    load_one(text.encode("utf-8", "surrogatepass"))
