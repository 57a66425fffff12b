"""Split text into overlapping passages that end at sentence ends, sized in the embedding
model's tokens (what it can actually read: all-MiniLM-L6-v2 reads 256)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

# A sentence ends after Chinese 。！？； (and their full-width friends), after English . ! ? ;
# followed by a space or a Chinese character, and at a line break (headings, list items, table rows).
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;…])(?![」』”’\"）)])|(?<=[.])(?=\s|[\u4e00-\u9fff])|\n+")

CountTokens = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True)
class Chunk:
    text: str
    tokens: int
    location: str | None


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _hard_split(sentence: str, tokens: int, limit: int) -> list[str]:
    """A 'sentence' longer than a chunk (a table, a run-on line): cut it by length."""
    pieces = -(-tokens // limit)
    size = -(-len(sentence) // pieces)
    return [sentence[i:i + size] for i in range(0, len(sentence), size)]


def chunk_text(text: str, count_tokens: CountTokens, chunk_tokens: int, overlap_tokens: int,
               location: str | None = None) -> list[Chunk]:
    if chunk_tokens <= 0 or not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError("need chunk_tokens > 0 and 0 <= overlap_tokens < chunk_tokens")
    sentences = split_sentences(text)
    if not sentences:
        return []
    counts = count_tokens(sentences)
    units: list[tuple[str, int]] = []
    for sentence, tokens in zip(sentences, counts):
        if tokens <= chunk_tokens:
            units.append((sentence, tokens))
        else:
            pieces = _hard_split(sentence, tokens, chunk_tokens)
            units.extend(zip(pieces, count_tokens(pieces)))

    chunks: list[Chunk] = []
    current: list[tuple[str, int]] = []
    for unit in units:
        if current and sum(t for _, t in current) + unit[1] > chunk_tokens:
            chunks.append(_join(current, location))
            # carry the last sentences (up to overlap_tokens) into the next chunk
            carried: list[tuple[str, int]] = []
            for previous in reversed(current):
                if sum(t for _, t in carried) + previous[1] > overlap_tokens:
                    break
                carried.insert(0, previous)
            if carried and sum(t for _, t in carried) + unit[1] > chunk_tokens:
                carried = []
            current = carried
        current.append(unit)
    if current:
        chunks.append(_join(current, location))
    return chunks


def _join(units: list[tuple[str, int]], location: str | None) -> Chunk:
    text = ""
    for sentence, _ in units:
        # no space between CJK sentences; one between English ones
        if text and not (_is_cjk(text[-1]) and _is_cjk(sentence[0])):
            text += " "
        text += sentence
    return Chunk(text, sum(t for _, t in units), location)


def _is_cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef"
