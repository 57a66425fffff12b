"""BM25 over words and CJK character bigrams, with incremental add/remove.

The embedded embedding model reads English well and Chinese poorly; character bigrams
give Chinese queries exact-term matching without a segmenter. Scoring is vectorised over
per-term posting arrays, and restricted to the chunks the caller may read *before*
ranking: document frequencies and average length are computed over that set too, so one
department's documents do not even shift another's scores.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_STOPWORDS = frozenset("a an and are as at be by can could did do does for from get had has have how i if in is it "
                       "its me much many my of on or our please should tell the their them there this to was we "
                       "were what when where which who why will with would you your".split())
# Function characters of questions (的, 是, 几, 怎么 ...): a bigram with one carries no topic,
# and across word boundaries it is an artefact (上季度华东 -> 度华) that matches nothing.
_CJK_FUNCTION_CHARS = frozenset("的了是有几多少么怎什吗呢哪谁要在我你他她它们请帮和与及一个些这那吧啊给把被对从到需可以能会该如何为")


def singular(word: str) -> str:
    """laptops -> laptop, policies -> policy: plural forms are the commonest miss in English."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def terms(text: str) -> list[str]:
    text = text.lower()
    out = [singular(w) for w in _WORD.findall(text) if w not in _STOPWORDS]
    for run in _CJK_RUN.findall(text):
        if len(run) == 1:
            if run not in _CJK_FUNCTION_CHARS:
                out.append(run)
            continue
        for i in range(len(run) - 1):
            if run[i] not in _CJK_FUNCTION_CHARS and run[i + 1] not in _CJK_FUNCTION_CHARS:
                out.append(run[i:i + 2])
    return out


class LexicalIndex:
    """Postings as one typed array per term (4-byte chunk id and count pairs), keyed by a term
    number, and each chunk's terms as term numbers: 12 bytes per posting and one array per
    term. Python lists of ints and a tuple of term strings per chunk took 135 bytes per posting
    on 20,000 chunks of Zipf-distributed words and characters; this takes 55, the terms' own
    cost included (tests/test_knowledge.py checks it on a smaller corpus)."""

    K1, B = 1.2, 0.75

    def __init__(self) -> None:
        self._term_ids: dict[str, int] = {}
        self._postings_of: list[array] = []  # per term number: (chunk id, count) pairs, flat
        self._stale: set[int] = set()  # terms of removed chunks: postings to drop when next read
        self._lengths = np.zeros(1024, dtype=np.float32)
        self._alive = np.zeros(1024, dtype=bool)
        self._terms_of: dict[int, array] = {}

    def __len__(self) -> int:
        return len(self._terms_of)

    def _grow(self, chunk_id: int) -> None:
        if chunk_id >= len(self._alive):
            size = max(chunk_id + 1, 2 * len(self._alive))
            self._lengths = np.resize(self._lengths, size)
            self._lengths[len(self._alive):] = 0
            alive = np.zeros(size, dtype=bool)
            alive[:len(self._alive)] = self._alive
            self._alive = alive

    @property
    def capacity(self) -> int:
        return len(self._alive)

    def add(self, chunk_id: int, text: str) -> None:
        if chunk_id in self._terms_of:
            self.remove([chunk_id])
        counts = Counter(terms(text))
        self._grow(chunk_id)
        self._lengths[chunk_id] = sum(counts.values())
        self._alive[chunk_id] = True
        numbers = array("i")
        for term, count in counts.items():
            number = self._term_ids.get(term)
            if number is None:
                number = self._term_ids[term] = len(self._postings_of)
                self._postings_of.append(array("i"))
            self._postings_of[number].extend((chunk_id, count))
            numbers.append(number)
        self._terms_of[chunk_id] = numbers

    def remove(self, chunk_ids) -> None:
        """Forget chunks. Their postings are dropped lazily, when a term's postings are next read."""
        for chunk_id in chunk_ids:
            self._stale.update(self._terms_of.pop(chunk_id, ()))
            if chunk_id < len(self._alive):
                self._alive[chunk_id] = False
                self._lengths[chunk_id] = 0

    def _postings(self, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(chunk ids, counts) of a term; the ids are a view of its array, valid until the next add."""
        number = self._term_ids.get(term)
        if number is None:
            return None
        pairs = np.frombuffer(self._postings_of[number], dtype=np.int32).reshape(-1, 2)
        if number in self._stale:
            self._stale.discard(number)
            live = self._alive[pairs[:, 0]]
            if not live.all():
                kept = array("i", pairs[live].tobytes())
                del pairs  # the old array must have no view left before it is replaced
                self._postings_of[number] = kept
                pairs = np.frombuffer(kept, dtype=np.int32).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1].astype(np.float32)

    def search(self, query: str, allowed: np.ndarray, k: int) -> list[tuple[int, float, float]]:
        """Top k (chunk id, BM25 score, coverage) among chunks where allowed[id] is True.

        coverage is the share of the query's IDF weight the chunk contains: 1.0 when every
        query term occurs in it. It tells a real match from a few stray common bigrams.
        """
        query_terms = list(dict.fromkeys(terms(query)))
        if not query_terms:
            return []
        size = min(len(allowed), len(self._alive))
        mask = np.zeros(len(self._alive), dtype=bool)
        mask[:size] = allowed[:size] & self._alive[:size]
        n_docs = int(mask.sum())
        if n_docs == 0:
            return []
        avg_length = float(self._lengths[mask].mean()) or 1.0
        scores = np.zeros(len(self._alive), dtype=np.float32)
        matched_idf = np.zeros(len(self._alive), dtype=np.float32)
        total_idf = 0.0
        for term in query_terms:
            postings = self._postings(term)
            ids, tfs = postings if postings is not None else (np.zeros(0, np.int32), np.zeros(0, np.float32))
            readable = mask[ids]
            ids, tfs = ids[readable], tfs[readable]
            df = len(ids)
            idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
            # A term no readable chunk has counts fully against coverage: it is sometimes a
            # bigram across two words (假工 of 病假工资) but often the very subject asked
            # about (宏达 of 宏达的负责人); precision first, the model can still search.
            total_idf += idf
            if df == 0:
                continue
            norm = self.K1 * (1 - self.B + self.B * self._lengths[ids] / avg_length)
            scores[ids] += idf * tfs * (self.K1 + 1) / (tfs + norm)
            matched_idf[ids] += idf
        candidates = np.flatnonzero(scores)
        if len(candidates) == 0:
            return []
        if len(candidates) > k:
            candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        return [(int(i), float(scores[i]), float(matched_idf[i] / total_idf)) for i in order]
