"""The model scan: when it gives a verdict, it is what ``json.loads`` says; usual bodies get one.

``top_level_string`` reads ``model`` without parsing the body. It may decline
(None), and the proxy then parses in full; it must never name another model
than the parser would, whatever the body holds: duplicate keys (the parser keeps
the last), keys spelled with escapes, ``"model"`` inside strings or nested
objects, arrays, whitespace.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapd._json import SCAN_PREFIX, top_level_string
from swapd.errors import BadRequest, TooDeep
from swapd.proxy import model_from_json

FAST = settings(max_examples=500, deadline=None)
# Text heavy in what a byte scan could mistake for structure.
TRICKY = st.text(alphabet=st.sampled_from('mod"el\\:,[]{} \n\u2713'), max_size=12)
NAMES = st.sampled_from(["model", "m", "gpt-4o", 'a"model', "model\\", "é"]) | TRICKY
# Member names as raw JSON: "model" plainly, spelled with escapes, or something else.
KEYS = st.sampled_from(
    ['"model"', '"mod\\u0065l"', '"\\u006Dodel"', '"modeL"', '"model "', '"messages"']
) | TRICKY.map(json.dumps)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | NAMES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["model", "x"]), inner)
    ),
    max_leaves=12,
)
MEMBERS = st.tuples(KEYS, VALUES)
SPACE = st.sampled_from(["", " ", "\n  "])
# A long prompt before the members: the model is then read from the body's end.
PROMPT = ('"messages"', [{"role": "user", "content": "x" * SCAN_PREFIX}])


def _object(members: list[tuple[str, Any]], ascii_only: bool, space: str) -> bytes:
    """A JSON object written member by member, so that keys may repeat."""
    parts = [
        f"{key}{space}:{space}{json.dumps(value, ensure_ascii=ascii_only)}"
        for key, value in members
    ]
    return ("{" + space + f",{space}".join(parts) + space + "}").encode()


@FAST
@given(st.lists(MEMBERS, max_size=5), st.booleans(), SPACE)
def test_a_verdict_is_what_the_parser_says(
    members: list[tuple[str, Any]], ascii_only: bool, space: str
) -> None:
    """Whenever the scan names a model, json.loads finds that same string under "model"."""
    body = _object(members, ascii_only, space)
    verdict = top_level_string(body, "model")
    if verdict is not None:
        assert json.loads(body)["model"] == verdict


@FAST
@given(
    st.lists(MEMBERS, max_size=3),
    NAMES,
    st.lists(MEMBERS, max_size=3),
    st.booleans(),
    SPACE,
    st.booleans(),
)
def test_a_model_member_among_others(  # noqa: PLR0913, PLR0917 - one drawn value each
    before: list[tuple[str, Any]],
    name: str,
    after: list[tuple[str, Any]],
    ascii_only: bool,
    space: str,
    long_prompt_first: bool,
) -> None:
    """With a "model" string among tricky members, any verdict is the parser's answer.

    After a long prompt the model is read from the body's end (SDKs write messages first).
    """
    lead = [PROMPT] if long_prompt_first else []
    body = _object([*lead, *before, ('"model"', name), *after], ascii_only, space)
    if long_prompt_first:
        assert body.find(b'"model"') > SCAN_PREFIX
    verdict = top_level_string(body, "model")
    if verdict is not None:
        assert json.loads(body)["model"] == verdict


@FAST
@given(VALUES)
def test_arrays_and_nested_models_get_no_verdict(value: Any) -> None:
    """A "model" that is not a member of a top-level object is never taken for one."""
    for body in ([value, {"model": "x"}], {"outer": {"model": "x"}}, ["model", "x"]):
        assert top_level_string(json.dumps(body).encode(), "model") is None


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": 'say "model": "x"'}]},
        {"messages": [{"role": "user", "content": "Say hi."}], "model": "m", "stream": True},
        {"tools": [{"model": "not this"}], "model": "m"},
    ],
    ids=["model-first", "model-after-messages", "nested-model-before"],
)
def test_usual_bodies_are_read_without_a_parse(body: dict[str, Any]) -> None:
    """What SDKs and curl send gets its model from the scan."""
    for separators in ((", ", ": "), (",", ":")):
        assert top_level_string(json.dumps(body, separators=separators).encode(), "model") == "m"


@FAST
@given(VALUES)
def test_nested_models_after_a_long_prompt_get_no_verdict(value: Any) -> None:
    """From the end too, a "model" outside the top-level object is never taken for one."""
    prompt = "x" * SCAN_PREFIX
    for body in (
        [prompt, value, {"model": "x"}],
        {"p": prompt, "outer": {"model": "x"}},
        {"p": prompt, "outer": [{"model": "x"}, value]},
        [prompt, "model", "x"],
    ):
        assert top_level_string(json.dumps(body).encode(), "model") is None


@pytest.mark.parametrize("tail", [{}, {"stream": True, "temperature": 0.2}])
def test_an_sdks_order_is_read_from_the_end(tail: dict[str, Any]) -> None:
    """openai-python writes messages, then model: a long prompt costs no parse."""
    body = {"messages": [{"role": "user", "content": 'long "model": "x" ' * 500}], "model": "m"}
    for separators in ((", ", ": "), (",", ":")):
        encoded = json.dumps(body | tail, separators=separators).encode()
        assert top_level_string(encoded, "model") == "m"


def test_a_model_far_from_both_ends_is_left_to_the_parser() -> None:
    """In the middle of a long body the scan declines; the full parse still finds the model."""
    pad = ["x" * SCAN_PREFIX] * 4
    body = json.dumps({"messages": pad, "model": "m", "tools": pad}).encode()
    assert top_level_string(body, "model") is None
    assert model_from_json(body) == "m"


def test_a_key_that_only_ends_in_model_is_not_the_member() -> None:
    r"""``"\\"model"`` (a key holding a quote) contains ``"model"`` bytes: not the member."""
    body = json.dumps({"p": "x" * SCAN_PREFIX, '"model': "x"}).encode()
    assert b'"model"' in body
    assert top_level_string(body, "model") is None
    with pytest.raises(BadRequest):
        model_from_json(body)


def test_an_escaped_duplicate_defers_to_the_parser() -> None:
    """A later key spelled with an escape wins in the parser, so the scan must not answer."""
    body = b'{"model": "a", "mod\\u0065l": "b"}'
    assert top_level_string(body, "model") is None
    assert model_from_json(body) == "b"


def test_the_nesting_cap_holds_when_the_scan_finds_the_model() -> None:
    """The cap is checked before the scan: a deep body with the model first is still 400."""
    deep = "[" * 200 + "]" * 200
    with pytest.raises(TooDeep):
        model_from_json(f'{{"model": "m", "x": {deep}}}'.encode())


def test_the_rest_of_the_body_is_the_backends_to_judge() -> None:
    """Once the scan has the model, a broken tail is forwarded; the backend answers it."""
    assert model_from_json(b'{"model": "m", "messages": [') == "m"


def test_a_string_left_open_to_the_end_is_a_400() -> None:
    """A body whose last brace lies inside an unclosed string is refused as bad JSON.

    The scan from the end found no bracket outside strings and raised IndexError: a 500.
    """
    body = b'{"messages": "' + b"x" * (2 * SCAN_PREFIX) + b'", "model": "m", "x": "}'
    with pytest.raises(BadRequest, match="JSON"):
        model_from_json(body)
