"""Tool calls held to their whole schema while they are decoded, by xgrammar.

Inside `<tool_call>…</tool_call>`, a token is allowed only if the call can still become a
valid instance of one offered tool: its name, then arguments that satisfy that tool's JSON
schema — types, enums (with the spellings the tool file maps onto them), patterns, required
fields, numbers, arrays, nested objects, and no extra fields where the schema forbids them.
The grammar is compiled from the schemas by xgrammar (the structured-output engine of vLLM,
SGLang and TensorRT-LLM), which fills a token bitmask in a fraction of a millisecond.

Outside a call — text, thinking — nothing is masked and the grammar costs nothing: the
session only watches the bytes for `<tool_call>` (one token in Qwen3, several in smaller
vocabularies) and starts a matcher there, fed whatever the opening token carried after
the tag. After `</tool_call>` the text is free again, and a second call gets a fresh matcher.

Used by both decoding paths: `GuideLogitsProcessor` for transformers' generate(), and
`GuidedSession.restrict` called by the batching engine (serving/decoding.py).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

CALL_OPEN, CALL_CLOSE = b"<tool_call>", b"</tool_call>"
# Whitespace the model may put around the call's JSON and inside it: Qwen3 writes one newline
# on each side; a bound keeps a weak model from filling its budget with blank lines.
_MAX_WHITESPACE = 4
# After the JSON: the closing tag, then anything (the token that closes the call may carry the
# text after it; the session drops the matcher as soon as the tag is written).
_TAIL = f'root ::= [ \\t\\r\\n]{{0,{_MAX_WHITESPACE}}} "</tool_call>" [^]*'
_HEAD = f"root ::= [ \\t\\r\\n]{{0,{_MAX_WHITESPACE}}}"


def call_schemas(tools: Sequence[Mapping[str, Any]],
                 aliases: Mapping[str, Mapping[str, Mapping[str, str]]] | None = None) -> list[dict]:
    """For each offered tool (OpenAI function schemas, as rendered into the prompt), the schema
    its calls match: {"name": <the tool>, "arguments": <its parameters>}. `aliases`: tool ->
    parameter -> {spelling: canonical value}, spellings the executor maps onto an enum or
    pattern-checked value — the parameter accepts them beside its own schema."""
    choices = []
    for tool in tools:
        function = tool.get("function", tool)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            continue
        arguments = json.loads(json.dumps(function.get("parameters") or {"type": "object"}))
        spellings = (aliases or {}).get(name) or {}
        for parameter, spec in (arguments.get("properties") or {}).items():
            mapped = sorted(s for s in spellings.get(parameter, {}) if s)
            if mapped and isinstance(spec, dict):
                arguments["properties"][parameter] = {"anyOf": [spec, {"type": "string", "enum": mapped}]}
        choices.append(_call(name, arguments))
    return choices


def _call(name: str, arguments: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


@lru_cache(maxsize=64)
def _grammar(schema_json: str):
    """The call's grammar: whitespace, the JSON, the closing tag. Cached: the same users see the
    same tools turn after turn. Keys come in the schema's order ("name" first, as Qwen3 writes
    calls; arguments as the tool file lists them): xgrammar's any-order mode does not hold
    required fields, and a missing required argument is the worse error."""
    import xgrammar as xgr

    body = xgr.Grammar.from_json_schema(schema_json, any_whitespace=True, strict_mode=False,
                                        max_whitespace_cnt=_MAX_WHITESPACE)
    return xgr.Grammar.concat(xgr.Grammar.from_ebnf(_HEAD), body, xgr.Grammar.from_ebnf(_TAIL))


def _expressible(choice: dict) -> dict:
    """The tool's call schema, or — where xgrammar cannot express its parameters (a regex with a
    lookbehind, a dangling $ref) — the call with any JSON object as arguments: the name is still
    held, and the executor still validates the arguments against the full schema."""
    try:
        _grammar(json.dumps(choice, ensure_ascii=False, sort_keys=False))
        return choice
    except Exception as exc:  # xgrammar's converters raise RuntimeError with the reason
        name = choice["properties"]["name"]["const"]
        log.warning("the arguments of %s are decoded unguided (xgrammar: %s)", name, str(exc).splitlines()[0][:200])
        return _call(name, {"type": "object"})


@dataclass(frozen=True)
class ToolCallGuide:
    """What a valid call may contain; built once per set of offered tools."""

    schema_json: str  # the calls' schema, serialized (key order kept): the cache key of the compiled grammar

    @classmethod
    def from_tools(cls, tools: Sequence[Mapping[str, Any]],
                   aliases: Mapping[str, Mapping[str, Mapping[str, str]]] | None = None) -> "ToolCallGuide | None":
        """The guide for these tools (None when none is named)."""
        choices = [_expressible(choice) for choice in call_schemas(tools, aliases)]
        if not choices:
            return None
        schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
        return cls(json.dumps(schema, ensure_ascii=False, sort_keys=False))

    def session(self, vocabulary: "GuideVocabulary") -> "GuidedSession":
        return GuidedSession(vocabulary.compile(self), vocabulary)


class GuideVocabulary:
    """One tokenizer's side of guidance, built once per model (under a second for Qwen3's
    151,669 tokens): xgrammar's view of the vocabulary, its compiler with its cache of
    compiled grammars, and the bytes each token stands for. `vocab_size`: the width of the
    model's logits, which may exceed the tokenizer (Qwen3: 151,936); ids past the tokenizer
    are never allowed inside a call."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        import xgrammar as xgr

        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.token_bytes: list[bytes] = self.info.decoded_vocab
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._buffers = threading.local()  # per decoding thread: the engine's and generate()'s

    @classmethod
    def for_model(cls, tokenizer, model) -> "GuideVocabulary":
        width = getattr(getattr(model, "config", None), "vocab_size", None) or 0
        return cls(tokenizer, vocab_size=max(len(tokenizer), width))

    def bitmasks(self, rows: int, device) -> tuple[Any, Any]:
        """This thread's bitmask for `rows` rows: (on the CPU, pinned when a GPU waits for it;
        on `device`). Reused step after step: a step's copy is done before its tokens are read."""
        import torch
        import xgrammar as xgr

        held = getattr(self._buffers, "masks", None)
        if held is None or held[0].shape[0] < rows or held[1].device != torch.device(device):
            cpu = xgr.allocate_token_bitmask(max(rows, 8), self.info.vocab_size)
            if torch.device(device).type == "cuda":
                cpu = cpu.pin_memory()
            held = self._buffers.masks = (cpu, cpu.to(device))
        return held[0][:rows], held[1][:rows]

    def compile(self, guide: ToolCallGuide):
        with self._lock:
            compiled = self._compiled.get(guide.schema_json)
            if compiled is None:
                compiled = self._compiled[guide.schema_json] = self._compiler.compile_grammar(
                    _grammar(guide.schema_json))
            return compiled

    def bytes_of(self, token_id: int) -> bytes:
        return self.token_bytes[token_id] if 0 <= token_id < len(self.token_bytes) else b""


class GuidedSession:
    """One generation's guide: fed every emitted token, asked to restrict the next."""

    def __init__(self, compiled: Any, vocabulary: GuideVocabulary):
        self.compiled = compiled
        self.vocabulary = vocabulary
        self.text = bytearray()
        self.call_start: int | None = None  # where the open call's JSON begins in `text`
        self.matcher: Any = None  # set while inside a guided call

    def _open_matcher(self, rest: bytes) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(self.compiled)
        if rest and not self.matcher.accept_string(rest):
            # the opening token carried what no valid call begins with: unguided to its end
            log.debug("tool call began off the grammar: %r", rest[:40])
            self.matcher = None

    def advance(self, token_id: int) -> None:
        piece = self.vocabulary.bytes_of(int(token_id))
        before = len(self.text)
        self.text += piece
        if self.call_start is not None:
            if self.matcher is not None and not self.matcher.accept_token(int(token_id)):
                self.matcher = None  # a token chosen around the mask (never when restrict ran)
            close = self.text.find(CALL_CLOSE, max(self.call_start, before - len(CALL_CLOSE)))
            if close < 0:
                return
            self.call_start, self.matcher = None, None
            search_from = close + len(CALL_CLOSE)  # a second call may open in the same token
        else:
            search_from = max(0, before - len(CALL_OPEN))  # a tag may have begun in the previous token
        start = self.text.find(CALL_OPEN, search_from)
        if start >= 0:
            self.call_start = start + len(CALL_OPEN)
            rest = bytes(self.text[self.call_start:])
            if CALL_CLOSE in rest:  # opened and closed within one token: nothing left to guide
                self.call_start = None
                return
            self._open_matcher(rest)

    @property
    def active(self) -> bool:
        return self.matcher is not None

    def restrict(self, scores) -> None:
        """Set (in place) every token that would break the open call to -inf; `scores` is one
        row of logits, as wide as the model's output (which may exceed the tokenizer)."""
        mask_rows(scores.view(1, -1), {0: self})


def mask_rows(logits, sessions: Mapping[int, GuidedSession]) -> None:
    """Mask, in place, the rows of a batch of logits whose session is inside a call: each
    matcher fills its row of one bitmask on the CPU (while a GPU still computes the logits),
    applied to the whole batch in one pass — other rows' masks allow everything — with one
    asynchronous copy and one kernel on a GPU."""
    import xgrammar as xgr

    rows = [row for row, session in sessions.items() if session.matcher is not None]
    if not rows:
        return
    vocabulary = sessions[rows[0]].vocabulary
    cpu, device = vocabulary.bitmasks(logits.shape[0], logits.device)
    xgr.reset_token_bitmask(cpu)
    for row in rows:
        sessions[row].matcher.fill_next_token_bitmask(cpu, row)
    if device.device.type != "cpu":
        device.copy_(cpu, non_blocking=True)
    width = min(vocabulary.info.vocab_size, logits.shape[-1])
    xgr.apply_token_bitmask_inplace(logits, device, vocab_size=width)
    if logits.shape[-1] > width:  # wider than the vocabulary the guide was built for: no tokens
        import torch

        with torch.inference_mode():  # the decoder's logits are inference tensors
            logits[rows, width:] = float("-inf")


class GuideLogitsProcessor:
    """transformers LogitsProcessor for one row of generate(): follows the row's tokens
    after the prompt and restricts each step's scores with its GuidedSession."""

    def __init__(self, session: GuidedSession, prompt_tokens: int):
        self.session = session
        self.seen = prompt_tokens

    def __call__(self, input_ids, scores):
        row = input_ids[0]
        for token_id in row[self.seen:].tolist():
            self.session.advance(token_id)
        self.seen = int(row.shape[0])
        self.session.restrict(scores[0])
        return scores
