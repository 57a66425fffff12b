"""A long document attached to one chat message: whole when it fits the model's context,
otherwise the passages most related to the question (or, when nothing in it relates to
the question, as for "summarise this", passages spread evenly through it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from webapp.knowledge.chunking import chunk_text
from webapp.knowledge.embeddings import readable
from webapp.knowledge.lexical import LexicalIndex

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Selection:
    mode: str  # 'passages_relevant' or 'passages_spread'
    prompt_text: str
    passages: int
    total_passages: int


MAX_DENSE_PASSAGES = 48


def whole_block(name: str, text: str) -> str:
    return f'<attachment name="{name}">\n{text}\n</attachment>'


def select_passages(name: str, text: str, question: str, embedder, count_chat_tokens: CountTokens,
                    budget_tokens: int, chunk_tokens: int = 128, min_coverage: float = 0.5) -> Selection:
    """Passages of the attachment that fit budget_tokens (in the chat model's tokens),
    kept in document order so the model reads them as the author wrote them."""
    count_tokens = embedder.count_tokens if embedder is not None else (
        lambda texts: [count_chat_tokens(t) for t in texts])
    chunks = chunk_text(text, count_tokens, chunk_tokens, 0)
    if not chunks:
        return Selection("passages_spread", whole_block(name, ""), 0, 0)
    lexical = LexicalIndex()
    for number, chunk in enumerate(chunks):
        lexical.add(number, chunk.text)
    allowed = np.ones(lexical.capacity, dtype=bool)
    lexical_hits = lexical.search(question, allowed, len(chunks))
    fused = np.zeros(len(chunks))
    strong = any(coverage >= min_coverage for _, _, coverage in lexical_hits)
    for rank, (number, _, _) in enumerate(lexical_hits):
        fused[number] += 1 / (60 + rank + 1)
    if embedder is not None and readable(embedder, question):
        # a bounded number read by meaning: those BM25 ranks first, then passages spread
        # through the rest (embedding every passage of a long report takes minutes on a CPU)
        scored = list(dict.fromkeys([n for n, _, _ in lexical_hits[:MAX_DENSE_PASSAGES // 2]]
                                    + _spread(len(chunks))))[:MAX_DENSE_PASSAGES]
        vectors = embedder.encode([chunks[n].text for n in scored])
        query = embedder.encode_query(question)
        similarities = vectors @ query
        strong = strong or bool(similarities.max() - embedder.floor(query) >= embedder.relevance_margin)
        for rank, position in enumerate(np.argsort(-similarities)):
            fused[scored[position]] += 1 / (60 + rank + 1)
    if strong:
        order = list(np.argsort(-fused, kind="stable"))
        mode = "passages_relevant"
    else:
        order = _spread(len(chunks))
        mode = "passages_spread"
    chosen: list[int] = []  # in rank order
    used = 0
    for number in order:
        cost = count_chat_tokens(chunks[number].text) + 4
        if used + cost > budget_tokens:
            continue
        chosen.append(int(number))
        used += cost
    prompt_text = _excerpt(name, chunks, chosen)
    # the tags and […] markers cost tokens too: drop the weakest passages until it fits
    while chosen and count_chat_tokens(prompt_text) > budget_tokens:
        chosen.pop()
        prompt_text = _excerpt(name, chunks, chosen)
    return Selection(mode, prompt_text, len(chosen), len(chunks))


def _excerpt(name: str, chunks, chosen: list[int]) -> str:
    parts, previous = [], -1
    for number in sorted(chosen):
        if number != previous + 1:
            parts.append("[…]")
        parts.append(chunks[number].text)
        previous = number
    if previous != len(chunks) - 1:
        parts.append("[…]")
    body = "\n".join(parts)
    return f'<attachment name="{name}" excerpt="true">\n{body}\n</attachment>'


def _spread(count: int) -> list[int]:
    """An order that visits the document evenly: first, last, middle, quarters, ..."""
    order, seen = [], set()
    step = count
    while step >= 1 and len(order) < count:
        for number in range(0, count, step):
            if number not in seen:
                seen.add(number)
                order.append(number)
        if count - 1 not in seen:
            seen.add(count - 1)
            order.append(count - 1)
        step //= 2
    return order

