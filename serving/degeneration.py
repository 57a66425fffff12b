"""Stopping a generation that has fallen into a loop, early, instead of at the token limit.

Small models under greedy decoding fall into two loops that fill a page before the limit:
the same line (or phrase) over and over, and JSON that nests deeper and deeper (copying the
tool schemas back: `"data": {"type": "object", "properties": {"data": {...`). Both are read
from the text as it streams; real answers and real tool calls are neither (a tool call's
arguments nest two or three levels).

A third failure is not a loop but is no answer either: the offered tools' definitions copied
back from the prompt as code (```{"type": "function", "function": {"name": "query_sales", ...),
where the model reached for a tool in the wrong form. `copies_tools` reads it from the start
of the answer, and the turn decodes again without the copy's first token.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

MAX_NESTING = 6  # JSON objects open at once, outside strings
REPEATS = 4  # the same piece this many times in a row at the end of the text
MIN_PERIOD, MAX_PERIOD = 8, 200  # characters of the repeated piece
SAME_LINE = 5  # one line of 8+ characters this many times back to back
COPIED_TOOLS = "tool definitions copied"
COPY_RETRIES = 2  # decodings again of an answer that copied the tool definitions back
COPY_PIECE = 24  # characters (whitespace aside) of a tool's or parameter's description that make a copy ...
MIN_COPY_PIECE = 12  # ... or the whole of a shorter one (Chinese descriptions are short), from this many
COPY_WINDOW = 200  # characters at the start of an answer in code or JSON where a copy is looked for
SAME_ITEM = 10  # one item of a numbered list, numbered on (1, 2, 3 ...), this many times in a row
# a list item's number: "[12] ", "(12) ", "12. ", "12) ", "12、" (not 1.50, 09:00 or 2.0.1)
ITEM_NUMBER = re.compile(r"^(?:\[(\d+)\]\s*|\((\d+)\)\s*|(\d+)[.)]\s+|(\d+)、\s*)")


class DegenerationWatch:
    """Feed it the whole text so far; `why` says what loop it fell into, or None. Each check
    reads only what arrived since the last one and a bounded tail, so a long answer costs
    the same per character as a short one."""

    def __init__(self, check_every: int = 16):
        self.check_every, self._read = check_every, 0
        self._depth, self._in_string, self._escaped = 0, False, False
        self.why: str | None = None

    def degenerate(self, text: str) -> bool:
        if self.why is None and len(text) - self._read >= self.check_every:
            self._nest(text[self._read:])
            self._read = len(text)
            self.why = ("nested JSON" if self._depth > MAX_NESTING else None) or repetition(text)
        return self.why is not None

    def _nest(self, new: str) -> None:
        """Objects ({ }) open at once, outside strings; brackets of prose ("[0, 10)") do not count."""
        for ch in new:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch == "{":
                self._depth += 1
            elif ch == "}":
                self._depth = max(self._depth - 1, 0)


def repetition(text: str) -> str | None:
    tail = text[-REPEATS * MAX_PERIOD:]
    for period in range(MIN_PERIOD, min(MAX_PERIOD, len(tail) // REPEATS) + 1):
        piece = tail[-period:]
        # a rule ("=====", "-=-=-=", "─ ─ ─") is layout, not a loop; a word or two over and
        # over ("走害走害走害…") is
        if any(ch.isalnum() for ch in piece) and tail.endswith(piece * REPEATS):
            return "repeated text"
    # the same line back to back (several tool calls or code repeat lines, but not in a row);
    # a numbered list that names one item over and over ("[7] 屋槁", "[8] 屋槁", ...) is a loop
    # however short the item, but a checklist may answer "符合" five times: ten in a row
    run, previous, items, last_item, last_number = 0, None, 0, None, None
    for line in text[-2000:].splitlines():
        line = line.strip()
        if not line:
            continue
        run = run + 1 if line == previous else 1
        previous = line
        if run >= SAME_LINE and len(line) >= 8:
            return "repeated lines"
        numbered = ITEM_NUMBER.match(line)
        if numbered:
            number, item = int(next(g for g in numbered.groups() if g)), line[numbered.end():]
            items = items + 1 if item and item == last_item and number == (last_number or 0) + 1 else 1
            last_item, last_number = item, number
            if items >= SAME_ITEM:
                return "repeated lines"
        else:
            items, last_item, last_number = 0, None, None
    return None


def tool_copies(tools: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """What an answer copying the offered tools back contains, whitespace removed: the marker
    of a tool definition and the start of each tool's and parameter's description."""
    descriptions = []
    for tool in tools:
        function = tool.get("function", tool)
        descriptions.append(function.get("description") or "")
        properties = (function.get("parameters") or {}).get("properties") or {}
        descriptions += [spec.get("description") or "" for spec in properties.values() if isinstance(spec, dict)]
    pieces = {_squash(d)[:COPY_PIECE] for d in descriptions}
    return ('"type":"function"', *sorted(p for p in pieces if len(p) >= MIN_COPY_PIECE)) if descriptions else ()


def copies_tools(text: str, copies: tuple[str, ...]) -> bool | None:
    """Whether the answer (after any thinking) is the offered tools copied back: code or JSON from
    its first character that writes a tool definition or a tool's description within its first
    COPY_WINDOW characters. None while it cannot yet tell (it opens with code and is short); a
    caller holds such text back. An answer in prose, a tool call or thinking is not a copy:
    an answer may well explain a tool, or quote its description, in words."""
    if not copies:
        return False
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    text = text.lstrip()
    if not text or text.startswith("<think>") or "<think>".startswith(text):  # nothing of the answer yet
        return None
    if not (text.startswith(("{", "```")) or "```".startswith(text)):
        return False
    window = _squash(text[:COPY_WINDOW])
    if any(piece in window for piece in copies):
        return True
    return False if len(text) >= COPY_WINDOW else None


def decode_again(text: str, first_token: int | None, banned: frozenset[int], attempt: int) -> bool:
    """Whether an answer found copying the tools (`text`, its first token, attempt number from
    0) is decoded again without its first token: at most COPY_RETRIES times, where the token is
    known and new, and not after thinking (the first token is then <think>)."""
    return (attempt < COPY_RETRIES and first_token is not None and first_token not in banned
            and not text.lstrip().startswith("<think>"))


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)
