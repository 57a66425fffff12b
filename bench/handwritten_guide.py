"""The hand-written tool-call guide hangjia used before xgrammar (serving/guided.py), kept on the
benchmark's side only: bench/feedback_loop.py --compare-guides decodes the same night's adapter
with xgrammar, without a guide and with this one, in one run.

It checks tool names, argument names and closed string values (enums and the tool file's
spellings, compared lowercased); patterns, numbers, required fields and nesting are left alone.
It steers among the model's top candidates instead of masking the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

CALL_OPEN, CALL_CLOSE = b"<tool_call>", b"</tool_call>"
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class ToolCallGuide:
    """What a valid call may contain; built once per set of offered tools."""

    names: frozenset[bytes]
    keys: Mapping[bytes, frozenset[bytes]]  # tool -> its parameter names, where no others are allowed
    values: Mapping[tuple[bytes, bytes], frozenset[bytes]]  # (tool, parameter) -> allowed values, lowercased

    @classmethod
    def from_tools(cls, tools: Sequence[Mapping[str, Any]],
                   aliases: Mapping[str, Mapping[str, Mapping[str, str]]] | None = None) -> "ToolCallGuide":
        """`tools` as rendered into the prompt (OpenAI function schemas); `aliases`:
        tool -> parameter -> {spelling: canonical value}, spellings the executor accepts."""
        names, keys, values = set(), {}, {}
        for tool in tools:
            function = tool.get("function", tool)
            name = function.get("name")
            if not isinstance(name, str) or not name:
                continue
            encoded = name.encode()
            names.add(encoded)
            schema = function.get("parameters") or {}
            properties = schema.get("properties") or {}
            if schema.get("additionalProperties") is False and properties:
                keys[encoded] = frozenset(p.encode() for p in properties)
            for parameter, spec in properties.items():
                enum = spec.get("enum") if isinstance(spec, Mapping) else None
                if not enum or not all(isinstance(v, str) for v in enum):
                    continue
                spellings = set(enum) | set(((aliases or {}).get(name) or {}).get(parameter, {}))
                values[(encoded, parameter.encode())] = frozenset(s.encode().lower() for s in spellings if s)
        return cls(frozenset(names), keys, values)

    def session(self, vocabulary) -> "GuidedSession":
        """`vocabulary`: serving.guided.GuideVocabulary, for the bytes each token stands for."""
        return GuidedSession(self, vocabulary.bytes_of)


@dataclass
class _Frame:
    kind: str  # "object" or "array"
    key: bytes | None = None  # the object's current key
    expect: str = "key"  # object: key, colon, value, comma; array: value (or comma)


@dataclass
class _CallScanner:
    """Reads one call's JSON byte by byte and says whether it can still become valid."""

    guide: ToolCallGuide
    stack: list[_Frame] = field(default_factory=list)
    started: bool = False
    done: bool = False  # the top-level object closed (or the body is not guided: a fence)
    ok: bool = True
    string: bytearray | None = None  # the string being read, if any
    string_is_key: bool = False
    escaped: bool = False
    name: bytes | None = None

    def copy(self) -> "_CallScanner":
        return _CallScanner(self.guide, [_Frame(f.kind, f.key, f.expect) for f in self.stack], self.started,
                            self.done, self.ok, None if self.string is None else bytearray(self.string),
                            self.string_is_key, self.escaped, self.name)

    def _allowed(self, is_key: bool) -> frozenset[bytes] | None:
        """The closed set the current string must come from (None: any)."""
        depth = len(self.stack)
        top = self.stack[-1] if self.stack else None
        if top is None or top.kind != "object":
            return None
        if depth == 1 and not is_key and top.key == b"name":
            return self.guide.names
        if depth == 2 and self.stack[0].key == b"arguments" and self.name is not None:
            if is_key:
                return self.guide.keys.get(self.name)
            return self.guide.values.get((self.name, top.key or b""))
        return None

    def _check(self, complete: bool) -> None:
        allowed = self._allowed(self.string_is_key)
        if allowed is None or b"\\" in self.string:
            return
        text = bytes(self.string) if self.string_is_key else bytes(self.string).lower()
        if complete:
            self.ok = text in allowed
        else:
            self.ok = any(choice.startswith(text) for choice in allowed)

    def _value_done(self) -> None:
        if self.stack:
            top = self.stack[-1]
            top.expect = "comma"

    def feed(self, data: bytes) -> None:
        for byte in data:
            if not self.ok or self.done:
                return
            char = bytes([byte])
            if self.string is not None:
                if self.escaped:
                    self.escaped = False
                    self.string.append(byte)
                elif char == b"\\":
                    self.escaped = True
                    self.string.append(byte)
                elif char == b'"':
                    self._check(complete=True)
                    text, self.string = bytes(self.string), None
                    top = self.stack[-1] if self.stack else None
                    if self.string_is_key and top is not None:
                        top.key, top.expect = text, "colon"
                    else:
                        if len(self.stack) == 1 and top is not None and top.key == b"name":
                            self.name = text
                        self._value_done()
                else:
                    self.string.append(byte)
                    self._check(complete=False)
                continue
            if char in _WHITESPACE:
                continue
            if not self.started:
                if char != b"{":  # a fenced or otherwise unusual call: not guided
                    self.done = True
                    return
                self.started = True
                self.stack.append(_Frame("object"))
                continue
            top = self.stack[-1] if self.stack else None
            if top is None:
                self.done = True
                return
            if char == b'"':
                is_key = top.kind == "object" and top.expect == "key"
                self.string, self.string_is_key, self.escaped = bytearray(), is_key, False
                self._check(complete=False)
            elif char == b":" and top.kind == "object":
                top.expect = "value"
            elif char == b",":
                top.expect = "key" if top.kind == "object" else "value"
            elif char in (b"{", b"["):
                if self._allowed(is_key=False) is not None:
                    self.ok = False  # a closed string value cannot be an object or an array
                    return
                self.stack.append(_Frame("object" if char == b"{" else "array",
                                         expect="key" if char == b"{" else "value"))
            elif char in (b"}", b"]"):
                self.stack.pop()
                if not self.stack:
                    self.done = True
                    return
                self._value_done()
            elif top.kind == "object" and top.expect == "value" and self._allowed(is_key=False) is not None:
                self.ok = False  # a number or literal where a closed string value belongs
            # other bytes (numbers, true/false/null) need no guidance


class GuidedSession:
    """One generation's guide: fed every emitted token, asked to restrict the next."""

    def __init__(self, guide: ToolCallGuide, token_bytes, first_candidates: int = 32):
        self.guide = guide
        self.token_bytes = token_bytes
        self.first_candidates = first_candidates
        self.text = bytearray()
        self.scanner: _CallScanner | None = None  # set while inside <tool_call>

    def advance(self, token_id: int) -> None:
        piece = self.token_bytes(token_id)
        before = len(self.text)
        self.text += piece
        search_from = max(0, before - len(CALL_OPEN))  # a tag may have begun in the previous token
        if self.scanner is not None:
            self.scanner.feed(piece)
            close = self.text.find(CALL_CLOSE, max(0, before - len(CALL_CLOSE)))
            if close < 0:
                return
            self.scanner = None
            search_from = close + len(CALL_CLOSE)  # a second call may open in the same token
        start = self.text.find(CALL_OPEN, search_from)
        if start >= 0:
            self.scanner = _CallScanner(self.guide)
            self.scanner.feed(bytes(self.text[start + len(CALL_OPEN):]))

    @property
    def active(self) -> bool:
        return self.scanner is not None and not self.scanner.done

    def allows(self, token_id: int) -> bool:
        if not self.active:
            return True
        trial = self.scanner.copy()
        trial.feed(self.token_bytes(token_id))
        return trial.ok

    def restrict(self, scores, greedy: bool = True) -> None:
        """Mask (in place, to -inf) the model's top candidates that would break the call.
        Greedy: up to the first allowed one. Sampling: every refused one among the first
        `first_candidates`. If none of those is allowed, the next 256 are tried."""
        if not self.active:
            return
        import torch

        first = min(self.first_candidates, scores.shape[-1])
        order = torch.topk(scores, min(first + 256, scores.shape[-1])).indices.tolist()
        refused = []
        found = False
        for rank, token_id in enumerate(order):
            if rank == first and found:  # sampling: past the first candidates only if none was allowed
                break
            if self.allows(token_id):
                found = True
                if greedy:
                    break
            else:
                refused.append(token_id)
        if refused:
            scores[refused] = float("-inf")
