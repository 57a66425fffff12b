"""From raw model output to (thinking, visible text, tool calls, errors). Pure functions.

Qwen3 (Hermes style) emits `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
possibly several, possibly with text around them and a `<think>` block first. Every
malformation becomes an error message meant for the model, never an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Collection

from serving.chat_format import split_thinking

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
MAX_CALL_CHARS = 20_000


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ParsedOutput:
    thinking: str = ""
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def visible_text(raw: str) -> str:
    """What the user may see of a partial or complete output: no thinking, no tool-call
    markup (an unfinished <tool_call> is hidden too, so JSON never flashes on screen)."""
    _, rest = split_thinking(raw)
    rest = _CALL_RE.sub("", rest)
    if CALL_OPEN in rest:
        rest = rest.split(CALL_OPEN, 1)[0]
    # hide a tag that is still arriving, e.g. "<tool_c"
    for cut in range(len(CALL_OPEN) - 1, 0, -1):
        if rest.endswith(CALL_OPEN[:cut]):
            rest = rest[: -cut]
            break
    return rest.strip()


def _call_from(data: Any, known_tools: Collection[str] | None) -> tuple[ToolCall | None, str | None]:
    """One call from one decoded JSON value. Arguments may come as "arguments" or, as some
    models write them (and vLLM and SGLang accept), "parameters"; a JSON-encoded string of an
    object is decoded once, as vLLM does."""
    if not isinstance(data, dict):
        return None, f"tool call must be a JSON object with name and arguments, got {type(data).__name__}."
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, "tool call has no \"name\"."
    name = name.strip()
    if known_tools is not None and name not in known_tools:
        available = ", ".join(sorted(known_tools)) or "none"
        return None, f"there is no tool named {name!r}; available tools: {available}."
    if "arguments" in data and "parameters" in data:
        return None, f"tool call {name!r} has both \"arguments\" and \"parameters\"; send one \"arguments\" object."
    arguments = data.get("arguments", data.get("parameters", {}))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None, (f"arguments of {name!r} must be a JSON object, got a string that is not JSON; "
                          "send \"arguments\": {...}.")
    if not isinstance(arguments, dict):
        return None, f"arguments of {name!r} must be a JSON object, got {type(arguments).__name__}."
    return ToolCall(name, arguments), None


def _parse_calls(body: str, known_tools: Collection[str] | None) -> tuple[list[ToolCall], list[str]]:
    """The calls of one <tool_call> block: one JSON object, or a list of them, each element
    judged on its own (a junk element is an error, the valid ones still count)."""
    body = body.strip()
    fenced = _FENCE_RE.match(body)
    if fenced:
        body = fenced.group(1)
    if len(body) > MAX_CALL_CHARS:
        return [], [f"tool call is {len(body):,} characters; the limit is {MAX_CALL_CHARS:,}."]
    try:
        data = json.loads(body)
    except RecursionError:
        return [], ["tool call JSON is nested too deeply."]
    except json.JSONDecodeError as exc:
        return [], [f"tool call is not valid JSON ({exc.msg} at position {exc.pos}). "
                    "Send {\"name\": ..., \"arguments\": {...}}."]
    calls, errors = [], []
    for element in data if isinstance(data, list) and data else [data]:
        call, error = _call_from(element, known_tools)
        if call is not None:
            calls.append(call)
        else:
            errors.append(error)
    return calls, errors


def parse_output(raw: str, known_tools: Collection[str] | None = None) -> ParsedOutput:
    """Split raw model output into thinking, visible text, tool calls and errors."""
    thinking, rest = split_thinking(raw or "")
    parsed = ParsedOutput(thinking=thinking)
    pieces = []
    position = 0
    for match in _CALL_RE.finditer(rest):
        pieces.append(rest[position:match.start()])
        position = match.end()
        calls, errors = _parse_calls(match.group(1), known_tools)
        parsed.calls.extend(calls)
        parsed.errors.extend(errors)
    tail = rest[position:]
    if CALL_OPEN in tail:
        before, unclosed = tail.split(CALL_OPEN, 1)
        pieces.append(before)
        parsed.errors.append(
            f"a {CALL_OPEN} tag was not closed with {CALL_CLOSE}"
            + (f" (it began: {unclosed.strip()[:60]!r})." if unclosed.strip() else ".")
        )
    else:
        pieces.append(tail)
    parsed.text = re.sub(r"\n{3,}", "\n\n", "".join(pieces)).strip()
    return parsed
