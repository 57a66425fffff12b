"""ResponseCache: look up a question before retrieval and generation; store answers after.

Only context-free turns take part: the first message of a conversation, without
attachments. Every entry lives in a scope (department, model, system prompt, adapter
version, knowledge-base version, the tools the user may call): a promotion or a change to
the documents starts a new scope, and nothing crosses departments. Exact hits compare
normalised text; semantic hits need a similarity above the threshold *and* agreement on
numbers, periods, entities, people, negation and comparison order (webapp/cache/guards.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from storage import cache as cache_store
from storage.db import Database
from webapp.cache.guards import disagreement, normalize, slots
from webapp.knowledge.embeddings import readable
from webapp.knowledge.lexical import terms

# Tools whose answers do not go stale by themselves: the knowledge base is in the scope.
STABLE_TOOLS = frozenset({"search_knowledge_base"})


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True
    semantic: bool = False  # exact repeats only unless the admin turns paraphrases on (docs/accuracy.md)
    threshold: float = 0.85
    ttl_s: int = 7 * 24 * 3600
    live_ttl_s: int = 0  # answers that used live-data tools: 0 = never cached
    max_entries: int = 5000  # per scope
    lookups_kept_days: int = 90  # then as daily totals (prune_lookups)


@dataclass(frozen=True)
class Hit:
    entry_id: int
    answer: str
    sources: list[dict[str, Any]]
    layer: str  # exact / semantic
    similarity: float
    question: str


def similarity(a: str, b: str, vector_a: np.ndarray | None, vector_b: np.ndarray | None) -> float:
    """The larger of embedding cosine (when the model reads both) and the cosine of word
    and CJK-bigram counts (the embedded embedding model reads no Chinese)."""
    lexical = _term_cosine(a, b)
    if vector_a is None or vector_b is None:
        return lexical
    return max(lexical, float(vector_a @ vector_b))


def _term_cosine(a: str, b: str) -> float:
    ca, cb = Counter(terms(a)), Counter(terms(b))
    if not ca or not cb:
        return 0.0
    dot = sum(ca[t] * cb[t] for t in ca.keys() & cb.keys())
    return dot / math.sqrt(sum(v * v for v in ca.values()) * sum(v * v for v in cb.values()))


class ResponseCache:
    def __init__(self, db: Database, defaults: CacheSettings, embedder=None,
                 vocabulary: Mapping[str, str] | None = None, clock=None):
        self.db = db
        self.defaults = defaults
        self.embedder = embedder
        self.vocabulary = dict(vocabulary or {})
        self._clock = clock or (lambda: dt.datetime.now())
        self._lock = threading.Lock()
        self._scopes: dict[str, tuple[list[dict], np.ndarray | None]] = {}  # scope -> live entries, vectors

    # -- settings -----------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return cache_store.settings(self.db, {"enabled": self.defaults.enabled, "semantic": self.defaults.semantic,
                                              "threshold": self.defaults.threshold})

    def configure(self, enabled: bool, semantic: bool, threshold: float) -> None:
        if not 0.5 <= threshold <= 1.0:
            raise ValueError("the similarity threshold must be between 0.5 and 1.0.")
        cache_store.save_settings(self.db, bool(enabled), bool(semantic), float(threshold))

    # -- scope --------------------------------------------------------------------------

    @staticmethod
    def scope(department_id: str, model: str, system_prompt: str, adapter: str | None, kb_version: int | None,
              tools: list[str]) -> str:
        key = json.dumps([department_id, model, system_prompt, adapter, kb_version, sorted(tools)], ensure_ascii=False)
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def _vector(self, text: str) -> np.ndarray | None:
        if self.embedder is None:
            return None
        if not readable(self.embedder, text):
            return None  # its vector of Chinese text is noise
        return self.embedder.encode_query(text)

    # -- lookup -------------------------------------------------------------------------

    def lookup(self, department_id: str, scope: str, question: str) -> Hit | None:
        started = time.perf_counter()
        config = self.settings()
        if not config["enabled"]:
            return None
        now = self._clock()
        outcome, hit = "miss", None
        exact = cache_store.exact_entry(self.db, scope, normalize(question), now)
        if exact is not None:
            outcome, hit = "exact", self._hit(exact, "exact", 1.0)
        elif config["semantic"]:
            outcome, hit = self._semantic(scope, question, float(config["threshold"]), now)
        cache_store.record_lookup(self.db, department_id, outcome, hit.entry_id if hit else None,
                                  hit.similarity if hit else None, (time.perf_counter() - started) * 1000)
        if hit is not None:
            cache_store.record_hit(self.db, hit.entry_id)
        return hit

    def _semantic(self, scope: str, question: str, threshold: float, now: dt.datetime) -> tuple[str, Hit | None]:
        entries, vectors = self._scope_entries(scope, now)
        if not entries:
            return "miss", None
        vector = self._vector(question)
        scored = []
        for index, entry in enumerate(entries):
            other = vectors[index] if vectors is not None and vector is not None and entry["embedding"] else None
            scored.append((similarity(question, entry["question"], vector, other), index))
        scored.sort(reverse=True)
        asked = slots(question, self.vocabulary)
        guarded = False
        for score, index in scored[:5]:
            if score < threshold:
                break
            if disagreement(asked, slots(entries[index]["question"], self.vocabulary)) is None:
                return "semantic", self._hit(entries[index], "semantic", score)
            guarded = True
        return ("guarded" if guarded else "miss"), None

    def _scope_entries(self, scope: str, now: dt.datetime) -> tuple[list[dict], np.ndarray | None]:
        with self._lock:
            cached = self._scopes.get(scope)
        if cached is None:
            entries = cache_store.live_entries(self.db, scope, now)
            dim = self.embedder.dim if self.embedder is not None else 0
            vectors = None
            if dim:
                vectors = np.stack([np.frombuffer(e["embedding"], dtype=np.float32) if e["embedding"]
                                    else np.zeros(dim, np.float32) for e in entries]) if entries else None
            cached = (entries, vectors)
            with self._lock:
                self._scopes[scope] = cached
        entries, vectors = cached
        live = [i for i, e in enumerate(entries) if e["expires_at"] > now]
        if len(live) != len(entries):
            entries = [entries[i] for i in live]
            vectors = vectors[live] if vectors is not None and live else None
        return entries, vectors

    @staticmethod
    def _hit(entry: dict, layer: str, score: float) -> Hit:
        return Hit(entry["id"], entry["answer"], json.loads(entry["sources"] or "[]"), layer, round(score, 4),
                   entry["question"])

    # -- storing and evicting -----------------------------------------------------------

    def store(self, *, department_id: str, scope: str, question: str, answer: str, sources: list[dict],
              source_message_id: int, tools_used: list[str], generation_ms: float | None,
              completion_tokens: int | None) -> int | None:
        """Keep an answer; None when it may not be cached (live data with live_ttl_s = 0)."""
        if not self.settings()["enabled"] or not answer.strip():
            return None
        live = any(t not in STABLE_TOOLS for t in tools_used)
        ttl = self.defaults.live_ttl_s if live else self.defaults.ttl_s
        if ttl <= 0:
            return None
        vector = self._vector(question)
        entry_id = cache_store.add_entry(
            self.db, scope=scope, department_id=department_id, question=question, normalized=normalize(question),
            embedding=vector.astype(np.float32).tobytes() if vector is not None else None, answer=answer,
            sources=json.dumps(sources, ensure_ascii=False, default=str), source_message_id=source_message_id,
            generation_ms=generation_ms, completion_tokens=completion_tokens, live_tools=live,
            expires_at=self._clock() + dt.timedelta(seconds=ttl))
        cache_store.evict_beyond(self.db, scope, self.defaults.max_entries)
        self._forget(scope)
        return entry_id

    def evict_for_feedback(self, message_id: int, cache_entry_id: int | None) -> list[int]:
        """A thumbs-down on a cached answer, or on the answer an entry replays, evicts it."""
        evicted = cache_store.evict(self.db, "thumbs-down", entry_ids=[cache_entry_id] if cache_entry_id else [],
                                    source_message_id=message_id)
        if evicted:
            self._forget()
        return evicted

    def clear(self, department_id: str | None = None) -> int:
        evicted = cache_store.evict(self.db, "cleared by an admin", department_id=department_id,
                                    everything=department_id is None)
        self._forget()
        return len(evicted)

    def _forget(self, scope: str | None = None) -> None:
        with self._lock:
            if scope is None:
                self._scopes.clear()
            else:
                self._scopes.pop(scope, None)

    def stats(self) -> list[dict[str, Any]]:
        return cache_store.stats(self.db, self._clock())

    def prune_lookups(self) -> int:
        """Lookups older than lookups_kept_days become daily totals (run nightly): the log of
        every lookup would otherwise grow without end. Cut at a day's start, so a day is kept
        either one by one or as totals."""
        start_of_today = self._clock().replace(hour=0, minute=0, second=0, microsecond=0)
        return cache_store.prune_lookups(self.db, start_of_today - dt.timedelta(days=self.defaults.lookups_kept_days))
