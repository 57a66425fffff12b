"""Streamed text from streamed tokens, at a constant cost per token.

Decoding the whole answer again for every new token costs O(n) per token, and on a GPU
serving eight users that Python time holds the GIL the decode loop needs. This keeps two
offsets, as vLLM's detokenizer does: the text of the last few tokens is decoded with one
token of context before them, so byte-level pieces and leading spaces come out as a full
decode would give them."""

from __future__ import annotations

from typing import Sequence


class IncrementalText:
    """Feed tokens with `push`; each call returns the text they complete. A token that ends
    inside a multi-byte character is held back until the character is whole (or `flush`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # start of the context tokens decoded with the new ones
        self._read = 0  # tokens before this one have been returned as text

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _delta(self, final: bool) -> str:
        before = self._decode(self.tokens[self._prefix:self._read])
        text = self._decode(self.tokens[self._prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return text[len(before):]

    def push(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(tokens)
        return self._delta(final=False)

    def flush(self) -> str:
        """What was held back, once no token will follow."""
        return self._delta(final=True) if self._read < len(self.tokens) else ""
