"""Anthropic's Messages API: a whole JSON answer as the named events of its stream.

A backend may answer a streamed ``/v1/messages`` request with its whole message in
JSON, and once swapd's pings have opened an event stream (:mod:`swapd.keepalive`)
that JSON has to go out as events. Anthropic's SDKs read named events only (an
event without ``event:`` is skipped), and build the message from them, so a
message goes out as the events that stream it::

    message_start           the message, its content empty and no stop_reason yet
    content_block_start     per block: the block, its streamed fields empty
      content_block_delta   text_delta (then citations_delta), input_json_delta for
                            tool_use and server_tool_use, thinking_delta and
                            signature_delta for thinking; other blocks come whole
    content_block_stop
    message_delta           stop_reason, stop_sequence, usage (a total, as Anthropic sends)
    message_stop

An error object (``{"type": "error", ...}``) is one ``event: error``, which the SDKs
raise. Any other JSON is left to the caller.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from swapd import _json as capped_json
from swapd.errors import BadRequest

# Blocks whose ``input`` Anthropic streams as JSON text (the SDKs parse it back).
_TOOL_INPUT = frozenset({"tool_use", "server_tool_use"})
# What a message_delta carries of the message, when the message has it.
_DELTA_KEYS = ("stop_reason", "stop_sequence", "stop_details", "container")


def answer_events(payload: bytes) -> bytes | None:
    """A JSON answer as Anthropic's stream events; None when it is no message and no error."""
    data: Any = None
    with contextlib.suppress(BadRequest):  # not JSON, or nested past the cap: not ours
        data = capped_json.loads(payload)
    if not isinstance(data, dict):
        return None
    if data.get("type") == "error":
        return _event("error", data)
    content = data.get("content")
    if data.get("type") != "message" or not isinstance(content, list):
        return None
    if not all(isinstance(block, dict) for block in content):
        return None
    return message_events(data, content)


def message_events(message: dict[str, Any], content: list[dict[str, Any]]) -> bytes:
    """The events that stream ``message``, whose blocks are ``content``."""
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    events = [_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(content):
        first, deltas = _block_parts(block)
        events.append(
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": first},
            )
        )
        events += [
            _event(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
            for delta in deltas
        ]
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    delta = {key: message[key] for key in _DELTA_KEYS if key in message}
    delta.setdefault("stop_reason", None)
    delta.setdefault("stop_sequence", None)
    usage = message.get("usage")
    events.append(
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": delta,
                "usage": usage if isinstance(usage, dict) else {"output_tokens": 0},
            },
        )
    )
    events.append(_event("message_stop", {"type": "message_stop"}))
    return b"".join(events)


def _block_parts(block: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A block's ``content_block_start`` form, and the deltas that fill it in."""
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        text = block["text"]
        citations = block.get("citations")
        first = {**block, "text": ""}
        deltas = [{"type": "text_delta", "text": text}] if text else []
        if isinstance(citations, list) and citations:
            first["citations"] = []
            deltas += [{"type": "citations_delta", "citation": c} for c in citations]
        return first, deltas
    if kind in _TOOL_INPUT and isinstance(block.get("input"), dict):
        partial = json.dumps(block["input"], separators=(",", ":"))
        return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": partial}]
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        deltas = [{"type": "thinking_delta", "thinking": block["thinking"]}]
        signature = block.get("signature")
        if isinstance(signature, str) and signature:
            deltas.append({"type": "signature_delta", "signature": signature})
        return {**block, "thinking": "", "signature": ""}, deltas
    return block, []  # redacted_thinking, tool results, kinds to come: whole at the start


def _event(name: str, data: dict[str, Any]) -> bytes:
    """One named server-sent event; its data on one line (JSON escapes every newline)."""
    text = json.dumps(data, separators=(",", ":"))
    return b"event: " + name.encode() + b"\ndata: " + text.encode() + b"\n\n"
