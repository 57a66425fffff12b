"""Stopping a generation that has fallen into a loop, early, instead of at the token limit.

Small models under greedy decoding fall into two loops that fill a page before the limit:
the same line (or phrase) over and over, and JSON that nests deeper and deeper (copying the
tool schemas back: `"data": {"type": "object", "properties": {"data": {...`). Both are read
from the text as it streams; real answers and real tool calls are neither (a tool call's
arguments nest two or three levels).
"""

from __future__ import annotations

import re

MAX_NESTING = 6  # JSON objects open at once, outside strings
REPEATS = 4  # the same piece this many times in a row at the end of the text
MIN_PERIOD, MAX_PERIOD = 8, 200  # characters of the repeated piece
SAME_LINE = 5  # one line of 8+ characters this many times back to back
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
