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
the tag. Until the call's JSON is complete, no control token (end of text, `</tool_call>`,
`<think>` …) may be written, nor the ordinary tokens that would spell `</tool_call>` inside a
string; once it is complete, the text is free again (the model closes the tag), and a
second call gets a fresh matcher. A `<tool_call>` written while thinking is not guided
(calls in thinking are not run), and a call longer than the parser takes is let go.

Used by both decoding paths: `GuideLogitsProcessor` for transformers' generate(), and
`GuidedSession.restrict` called by the batching engine (serving/decoding.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

CALL_OPEN, CALL_CLOSE = b"<tool_call>", b"</tool_call>"
# How the chat templates open a call: an answer required to call begins with it in its prompt.
CALL_OPENING = "<tool_call>\n"
THINK_OPEN, THINK_CLOSE = b"<think>", b"</think>"
# Whitespace the model may put around the call's JSON and inside it: Qwen3 writes one newline
# on each side; a bound keeps a weak model from filling its budget with blank lines.
_MAX_WHITESPACE = 4
_SPACE = f"root ::= [ \\t\\r\\n]{{0,{_MAX_WHITESPACE}}}"
# A call longer than this is refused by the parser (webapp/tools/parser.py MAX_CALL_CHARS):
# past it the guide lets go, so that the model may stop.
MAX_CALL_BYTES = 20_000


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
    """The call's grammar: whitespace, the JSON, whitespace. Cached: the same users see the
    same tools turn after turn. Keys come in the schema's order ("name" first, as Qwen3 writes
    calls; arguments as the tool file lists them): xgrammar's any-order mode does not hold
    required fields, and a missing required argument is the worse error."""
    import xgrammar as xgr

    body = xgr.Grammar.from_json_schema(schema_json, any_whitespace=True, strict_mode=False,
                                        max_whitespace_cnt=_MAX_WHITESPACE)
    return xgr.Grammar.concat(xgr.Grammar.from_ebnf(_SPACE), body, xgr.Grammar.from_ebnf(_SPACE))


def _expressible(choice: dict) -> dict:
    """The tool's call schema, or — where xgrammar cannot express its parameters (a regex with a
    lookbehind, a dangling $ref) — the call with any JSON object as arguments: the name is still
    held, and the executor still validates the arguments against the full schema."""
    return json.loads(_expressible_json(json.dumps(choice, ensure_ascii=False, sort_keys=False)))


@lru_cache(maxsize=256)
def _expressible_json(choice_json: str) -> str:
    try:  # cached, so a schema xgrammar refuses is warned about once
        _grammar(choice_json)
        return choice_json
    except Exception as exc:  # xgrammar's converters raise RuntimeError with the reason
        name = json.loads(choice_json)["properties"]["name"]["const"]
        log.warning("the arguments of %s are decoded unguided (xgrammar: %s)", name, str(exc).splitlines()[0][:200])
        return json.dumps(_call(name, {"type": "object"}), ensure_ascii=False)


@dataclass(frozen=True)
class ToolCallGuide:
    """What a valid call may contain; built once per set of offered tools."""

    schema_json: str  # the calls' schema, serialized (key order kept): the cache key of the compiled grammar
    inside: bool = False  # the answer's prompt ends with CALL_OPENING: it starts inside the call

    @classmethod
    def from_tools(cls, tools: Sequence[Mapping[str, Any]],
                   aliases: Mapping[str, Mapping[str, Mapping[str, str]]] | None = None) -> "ToolCallGuide | None":
        """The guide for these tools (None when none is named)."""
        choices = [_expressible(choice) for choice in call_schemas(tools, aliases)]
        if not choices:
            return None
        schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
        return cls(json.dumps(schema, ensure_ascii=False, sort_keys=False))

    def opened(self) -> "ToolCallGuide":
        """This guide for an answer whose prompt already opened the call (ends with CALL_OPENING)."""
        return dataclasses.replace(self, inside=True)

    def session(self, vocabulary: "GuideVocabulary") -> "GuidedSession":
        session = GuidedSession(vocabulary.compile(self), vocabulary)
        if self.inside:
            session.begin_inside(CALL_OPENING.encode())
        return session


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
        # Never inside a call's JSON: the tokenizer's added tokens (end of text, the chat and call
        # tags, thinking tags; xgrammar reads them as text) and any token holding `</tool_call>`.
        control = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        control |= {i for i, piece in enumerate(self.token_bytes) if CALL_CLOSE in piece}
        self._closers: dict[int, Any] = {0: self._allowed_row(control)}

    def _allowed_row(self, forbidden: set[int]):
        """A bitmask row allowing every token but `forbidden`."""
        import xgrammar as xgr

        row = xgr.allocate_token_bitmask(1, self.info.vocab_size)[0]
        for token in forbidden:
            if 0 <= token < self.info.vocab_size:
                row[token // 32] &= ~(1 << (token % 32))
        return row

    def outside_tag(self, spelled: int):
        """The allowed-row for a text that ends with the first `spelled` bytes of `</tool_call>`:
        no control token, and no token that would complete the tag (a vocabulary that spells
        the tag in several tokens could otherwise close the call inside a string)."""
        row = self._closers.get(spelled)
        if row is None:
            rest = CALL_CLOSE[spelled:]
            completing = {i for i, piece in enumerate(self.token_bytes) if piece.startswith(rest)}
            row = self._closers[spelled] = self._closers[0] & self._allowed_row(completing)
        return row

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
        self.matcher: Any = None  # set while a call's JSON is being written under guidance

    def _open_matcher(self, rest: bytes) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(self.compiled)
        if rest and not self.matcher.accept_string(rest):
            # the opening token carried what no valid call begins with: unguided to its end
            log.debug("tool call began off the grammar: %r", rest[:40])
            self.matcher = None

    def begin_inside(self, opening: bytes) -> None:
        """The answer's prompt ends with `opening` (a call's tag and what follows it): the first
        token is already the call's."""
        self.text += opening
        self.call_start = len(self.text) - len(opening) + len(CALL_OPEN)
        self._open_matcher(bytes(self.text[self.call_start:]))

    def _thinking_at(self, position: int) -> bool:
        return self.text.rfind(THINK_OPEN, 0, position) > self.text.rfind(THINK_CLOSE, 0, position)

    def advance(self, token_id: int) -> None:
        piece = self.vocabulary.bytes_of(int(token_id))
        before = len(self.text)
        self.text += piece
        if self.call_start is not None:
            if self.matcher is not None:
                try:
                    accepted = self.matcher.accept_token(int(token_id))
                except Exception:  # never let the guide stop an answer
                    log.exception("the tool-call matcher failed; the call goes on unguided")
                    accepted = False
                if not accepted or self.matcher.is_completed() or len(self.text) - self.call_start > MAX_CALL_BYTES:
                    # complete (the model writes the closing tag), a token chosen around the mask
                    # (never when restrict ran), or longer than any call the parser takes
                    self.matcher = None
            close = self.text.find(CALL_CLOSE, max(self.call_start, before - len(CALL_CLOSE)))
            if close < 0:
                return
            self.call_start, self.matcher = None, None
            search_from = close + len(CALL_CLOSE)  # a second call may open in the same token
        else:
            search_from = max(0, before - len(CALL_OPEN))  # a tag may have begun in the previous token
        start = self.text.find(CALL_OPEN, search_from)
        if start >= 0 and not self._thinking_at(start):  # a call written while thinking is not run
            self.call_start = start + len(CALL_OPEN)
            rest = bytes(self.text[self.call_start:])
            if CALL_CLOSE in rest:  # opened and closed within one token: nothing left to guide
                self.call_start = None
                return
            self._open_matcher(rest)

    @property
    def active(self) -> bool:
        return self.matcher is not None

    def spelled_close(self) -> int:
        """How many leading bytes of `</tool_call>` the text ends with (0 to 11)."""
        for spelled in range(len(CALL_CLOSE) - 1, 0, -1):
            if self.text.endswith(CALL_CLOSE[:spelled]):
                return spelled
        return 0

    def fill(self, bitmask, row: int) -> None:
        """Write the allowed tokens into `bitmask[row]` (one bit per token)."""
        try:
            self.matcher.fill_next_token_bitmask(bitmask, row)
        except Exception:  # never let the guide stop an answer
            log.exception("the tool-call matcher failed; the call goes on unguided")
            self.matcher = None
            return
        bitmask[row] &= self.vocabulary.outside_tag(self.spelled_close())

    def restrict(self, scores) -> None:
        """Set (in place) every token that would break the open call to -inf; `scores` is one
        row of logits, as wide as the model's output (which may exceed the tokenizer)."""
        mask_rows(scores.view(1, -1), {0: self})


def mask_rows(logits, sessions: Mapping[int, GuidedSession]) -> None:
    """Mask, in place, the rows of a batch of logits whose session is inside a call: each
    matcher fills its row of one bitmask on the CPU (while a GPU still computes the logits),
    applied in one pass — on a GPU to the whole batch (other rows' masks allow everything),
    with one asynchronous copy and one kernel. A failure leaves those calls unguided."""
    rows = [row for row, session in sessions.items() if session.matcher is not None]
    if not rows:
        return
    try:
        _apply(logits, rows, sessions)
    except Exception:  # never let the guide stop an answer: these calls go on unguided
        log.exception("guided decoding failed; the open calls go on unguided")
        for row in rows:
            sessions[row].matcher = None


def _apply(logits, rows: list[int], sessions: Mapping[int, GuidedSession]) -> None:
    import xgrammar as xgr

    vocabulary = sessions[rows[0]].vocabulary
    cpu, device = vocabulary.bitmasks(logits.shape[0], logits.device)
    xgr.reset_token_bitmask(cpu)
    for row in rows:
        sessions[row].fill(cpu, row)
    width = min(vocabulary.info.vocab_size, logits.shape[-1])
    if device.device.type != "cpu":  # the whole batch: an index list would be one more (blocking) copy
        device.copy_(cpu, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, device, vocab_size=width)
    else:  # the guided rows only: on a CPU each row costs about half a millisecond at Qwen3's width
        xgr.apply_token_bitmask_inplace(logits, cpu, vocab_size=width, indices=rows)
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
