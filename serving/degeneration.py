"""Stopping a generation that has fallen into a loop, early, instead of at the token limit.

Small models under greedy decoding fall into two loops that fill a page before the limit:
the same line (or phrase) over and over, and JSON that nests deeper and deeper (copying the
tool schemas back: `"data": {"type": "object", "properties": {"data": {...`). Both are read
from the text as it streams; real answers and real tool calls are neither (a tool call's
arguments nest two or three levels).
"""

from __future__ import annotations

MAX_NESTING = 6  # brackets open at once, outside strings
REPEATS = 4  # the same piece this many times in a row at the end of the text
MIN_PERIOD, MAX_PERIOD = 8, 200  # characters of the repeated piece
SAME_LINE = 5  # one line of 8+ characters this many times among the last 40 lines


class DegenerationWatch:
    """Feed it the whole text so far; `why` says what loop it fell into, or None."""

    def __init__(self, check_every: int = 16):
        self.check_every, self._checked = check_every, 0
        self.why: str | None = None

    def degenerate(self, text: str) -> bool:
        if self.why is None and len(text) - self._checked >= self.check_every:
            self._checked = len(text)
            self.why = nesting(text) or repetition(text)
        return self.why is not None


def nesting(text: str) -> str | None:
    depth, deepest, in_string, escaped = 0, 0, False, False
    for ch in text:
        if in_string:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                in_string = False
            elif ch != "\\":
                escaped = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}]":
            depth = max(depth - 1, 0)
    return "nested JSON" if deepest > MAX_NESTING else None


def repetition(text: str) -> str | None:
    tail = text[-REPEATS * MAX_PERIOD:]
    for period in range(MIN_PERIOD, min(MAX_PERIOD, len(tail) // REPEATS) + 1):
        piece = tail[-period:]
        # a rule of one character ("=====", "-----") is layout, not a loop
        if len(set(piece.strip())) >= 3 and tail.endswith(piece * REPEATS):
            return "repeated text"
    lines = [line.strip() for line in text.splitlines()[-40:] if len(line.strip()) >= 8]
    if lines and max(lines.count(line) for line in set(lines)) >= SAME_LINE:
        return "repeated lines"
    return None
