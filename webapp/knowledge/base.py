"""KnowledgeBase: ingest documents, keep the FAISS and BM25 indexes in step with DuckDB,
and answer searches for one department with hybrid retrieval.

DuckDB is the truth (documents, chunks, embeddings, who may read them, a version number);
the indexes are derived. The FAISS file is reused when it matches the database's version
and embedding model, and rebuilt from the stored embeddings otherwise (no re-embedding).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from storage import knowledge as kb_store
from storage.db import Database
from webapp.knowledge.chunking import chunk_text
from webapp.knowledge.dense import DenseIndex
from webapp.knowledge.embeddings import Embedder, readable
from webapp.knowledge.lexical import LexicalIndex
from webapp.knowledge.parsing import DocumentError, ParsedDocument, parse_bytes

log = logging.getLogger(__name__)

RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
Progress = Callable[[float, str], None]


def embedding_input(title: str, text: str) -> str:
    """What is embedded for a passage: its document's title first, so that a bare
    paragraph of "Leave policy" still carries what it is about."""
    return f"{title}\n{text}"


@dataclass(frozen=True)
class KnowledgeSettings:
    index_dir: Path
    chunk_tokens: int = 128  # short passages: one point each, and several fit the prompt
    overlap_tokens: int = 24
    top_k: int = 4
    min_margin: float = 0.0  # cosine above the question's floor; 0: the embedder's relevance_margin
    min_coverage: float = 0.5  # share of the query's IDF weight a lexical match must contain
    ann_threshold: int = 50_000  # chunks; past it the dense index is HNSW instead of exact


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    document_id: int
    title: str
    location: str | None
    text: str
    score: float  # fused
    dense_score: float | None
    dense_margin: float | None  # dense_score less the question's floor (embeddings._Floor)
    lexical_score: float | None
    coverage: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class IngestReport:
    name: str
    status: str  # added / replaced / unchanged / error
    message: str = ""
    document_id: int | None = None
    chunks: int = 0


@dataclass
class _Readers:
    """Bitmaps over chunk ids: readable by everyone, and by each department."""

    public: np.ndarray = field(default_factory=lambda: np.zeros(1024, dtype=bool))
    departments: dict[str, np.ndarray] = field(default_factory=dict)

    def _fit(self, array: np.ndarray, size: int) -> np.ndarray:
        if len(array) >= size:
            return array
        grown = np.zeros(max(size, 2 * len(array)), dtype=bool)
        grown[:len(array)] = array
        return grown

    def set(self, chunk_id: int, company_wide: bool, departments: Iterable[str]) -> None:
        if company_wide:
            self.public = self._fit(self.public, chunk_id + 1)
            self.public[chunk_id] = True
        for department in departments:
            bits = self._fit(self.departments.get(department, np.zeros(1024, dtype=bool)), chunk_id + 1)
            bits[chunk_id] = True
            self.departments[department] = bits

    def clear(self, chunk_ids: Iterable[int]) -> None:
        for chunk_id in chunk_ids:
            for bits in (self.public, *self.departments.values()):
                if chunk_id < len(bits):
                    bits[chunk_id] = False

    def allowed(self, department_id: str, size: int) -> np.ndarray:
        mask = np.zeros(size, dtype=bool)
        mask[:min(size, len(self.public))] = self.public[:size]
        own = self.departments.get(department_id)
        if own is not None:
            n = min(size, len(own))
            mask[:n] |= own[:n]
        return mask


class KnowledgeBase:
    def __init__(self, db: Database, embedder: Embedder, settings: KnowledgeSettings):
        self.db = db
        self.embedder = embedder
        self.settings = settings
        if settings.chunk_tokens > embedder.max_tokens:
            raise ValueError(f"chunk size {settings.chunk_tokens} tokens is more than the embedding model "
                             f"{embedder.name} reads ({embedder.max_tokens}); lower --chunk-tokens.")
        self._lock = threading.RLock()
        self._lexical = LexicalIndex()
        self._readers = _Readers()
        self._dense = DenseIndex(embedder.dim, approximate=False)
        self.version = 0

    @property
    def index_path(self) -> Path:
        return self.settings.index_dir / "chunks.faiss"

    # -- opening ------------------------------------------------------------------------

    def open(self, progress: Progress | None = None) -> "KnowledgeBase":
        """Bring the indexes in line with DuckDB: re-embed if the embedding model changed,
        reuse the FAISS file if current, rebuild it otherwise."""
        state = kb_store.state(self.db)
        if state["embedding_model"] not in (None, self.embedder.name):
            self._reembed(state["embedding_model"], progress)
        chunks = kb_store.indexed_chunks(self.db)
        with self._lock:
            self.version = kb_store.version(self.db)
            loaded = DenseIndex.load(self.index_path)
            if loaded is not None and self._current(loaded[1], len(chunks)):
                self._dense = loaded[0]
                log.info("knowledge: FAISS index %s is current (version %d)", self.index_path, self.version)
                dense_ready = True
            else:
                log.info("knowledge: rebuilding the FAISS index from DuckDB (%d chunks)", len(chunks))
                self._dense = DenseIndex(self.embedder.dim, len(chunks) >= self.settings.ann_threshold)
                dense_ready = False
            self._lexical, self._readers = LexicalIndex(), _Readers()
            self._index(chunks, dense=not dense_ready)
            if not dense_ready:
                self._save()
        return self

    def _current(self, meta: dict, count: int) -> bool:
        return (meta.get("version") == self.version and meta.get("model") == self.embedder.name
                and meta.get("dim") == self.embedder.dim and meta.get("count") == count
                and meta.get("approximate") == (count >= self.settings.ann_threshold))

    def _rebuild_dense_if_due(self) -> None:
        """Exact search turns approximate past the threshold (and back below it); HNSW,
        which cannot delete, is rebuilt once a quarter of its vectors are deleted ones."""
        size = self._dense.size
        wrong_kind = self._dense.approximate != (size >= self.settings.ann_threshold)
        too_many_removed = self._dense.approximate and len(self._dense.removed) > 0.25 * max(self._dense.index.ntotal, 1)
        if wrong_kind or too_many_removed:
            chunks = kb_store.indexed_chunks(self.db)
            self._dense = DenseIndex(self.embedder.dim, len(chunks) >= self.settings.ann_threshold)
            self._dense.add(*self._vectors(chunks))

    def _vectors(self, chunks: Sequence[kb_store.IndexedChunk]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter((c.id for c in chunks), dtype=np.int64, count=len(chunks))
        vectors = np.frombuffer(b"".join(c.embedding for c in chunks), dtype=np.float32)
        return ids, vectors.reshape(len(chunks), self.embedder.dim)

    def _reembed(self, old_model: str, progress: Progress | None) -> None:
        rows = kb_store.chunk_texts(self.db)
        log.warning("knowledge: embedding model changed from %s to %s; embedding %d chunks again",
                    old_model, self.embedder.name, len(rows))
        embeddings: dict[int, bytes] = {}
        batch = 256
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            vectors = self.embedder.encode([embedding_input(title, text) for _, title, text in part])
            embeddings.update({chunk_id: v.tobytes() for (chunk_id, _, _), v in zip(part, vectors)})
            if progress:
                progress(min(1.0, (start + batch) / len(rows)), "re-embedding")
        kb_store.replace_embeddings(self.db, embeddings, self.embedder.name)

    def _index(self, chunks: Sequence[kb_store.IndexedChunk], dense: bool = True) -> None:
        if dense and chunks:
            self._dense.add(*self._vectors(chunks))
        for chunk in chunks:
            self._lexical.add(chunk.id, chunk.text)
            self._readers.set(chunk.id, chunk.company_wide, chunk.departments)

    def _save(self) -> None:
        self._dense.save(self.index_path, {"version": self.version, "model": self.embedder.name,
                                           "count": self._dense.size})

    # -- ingesting ----------------------------------------------------------------------

    def add_files(self, files: Sequence[tuple[str, bytes]], departments: Sequence[str], company_wide: bool,
                  uploaded_by: int | None = None, progress: Progress | None = None,
                  may_replace: Callable[[kb_store.Document], bool] | None = None) -> list[IngestReport]:
        """Parse, chunk, embed and store each file; one bad file is reported, not fatal.
        may_replace: whether the uploader may replace an existing document of the same name
        (default: yes); a file refused by it is reported and nothing of it is stored."""
        departments = sorted({d.strip() for d in departments if d and d.strip()})
        if not company_wide and not departments:
            raise ValueError("choose the departments that may read these documents, or make them company-wide.")
        reports = []
        for number, (name, data) in enumerate(files):
            def step(fraction: float, what: str, number=number, name=name) -> None:
                if progress:
                    progress((number + fraction) / len(files), f"{name}: {what}")
            step(0.0, "parsing")
            try:
                parsed = parse_bytes(data, name)
            except DocumentError as exc:
                reports.append(IngestReport(name, "error", str(exc)))
                continue
            existing = kb_store.find_document(self.db, parsed.source_name)
            if existing is not None and may_replace is not None and not may_replace(existing):
                reports.append(IngestReport(name, "error", "a document of this name is kept by another department;"
                                                           " rename the file. 同名文档属于其他部门，请改名。"))
                continue
            reports.append(self.add_document(parsed, departments, company_wide, uploaded_by, step))
        if progress:
            progress(1.0, "done")
        return reports

    def add_document(self, parsed: ParsedDocument, departments: Sequence[str], company_wide: bool,
                     uploaded_by: int | None = None, progress: Progress | None = None) -> IngestReport:
        existing = kb_store.find_document(self.db, parsed.source_name)
        same_readers = existing is not None and existing.company_wide == company_wide and (
            company_wide or set(existing.departments) == set(departments))
        if existing is not None and existing.sha256 == parsed.sha256 and same_readers:
            return IngestReport(parsed.source_name, "unchanged", "same file and readers as before; nothing to do",
                                existing.id, existing.chunks)
        chunks = []
        for section in parsed.sections:
            chunks.extend(chunk_text(section.text, self.embedder.count_tokens, self.settings.chunk_tokens,
                                     self.settings.overlap_tokens, section.location))
        if progress:
            progress(0.2, f"embedding {len(chunks)} passages")
        vectors = np.zeros((0, self.embedder.dim), dtype=np.float32)
        batch = 64
        parts = []
        for start in range(0, len(chunks), batch):
            parts.append(self.embedder.encode([embedding_input(parsed.title, c.text)
                                               for c in chunks[start:start + batch]]))
            if progress:
                progress(0.2 + 0.7 * min(1.0, (start + batch) / len(chunks)), "embedding")
        if parts:
            vectors = np.concatenate(parts)
        rows = [kb_store.NewChunk(i, c.location, c.text, c.tokens, v.tobytes())
                for i, (c, v) in enumerate(zip(chunks, vectors))]
        with self._lock:
            document_id, removed, added, version = kb_store.put_document(
                self.db, source_name=parsed.source_name, title=parsed.title, sha256=parsed.sha256,
                chars=parsed.chars, company_wide=company_wide, departments=departments, uploaded_by=uploaded_by,
                chunks=rows, embedding_model=self.embedder.name)
            self._forget(removed)
            self._index(kb_store.indexed_chunks(self.db, added))
            self.version = version
            self._rebuild_dense_if_due()
            self._save()
        status = "replaced" if existing is not None else "added"
        return IngestReport(parsed.source_name, status, f"{len(added)} passages", document_id, len(added))

    def delete(self, document_id: int) -> bool:
        with self._lock:
            result = kb_store.delete_document(self.db, int(document_id))
            if result is None:
                return False
            removed, self.version = result
            self._forget(removed)
            self._rebuild_dense_if_due()
            self._save()
        return True

    def _forget(self, chunk_ids: Sequence[int]) -> None:
        self._readers.clear(chunk_ids)
        self._lexical.remove(chunk_ids)
        self._dense.remove(chunk_ids)

    def documents(self, department_id: str | None = None) -> list[kb_store.Document]:
        return kb_store.list_documents(self.db, department_id)

    # -- searching ----------------------------------------------------------------------

    def search(self, department_id: str, query: str, k: int | None = None, mode: str = "hybrid") -> list[Hit]:
        """The k best passages the department may read: dense and BM25 rankings, each over
        the readable chunks only, fused by reciprocal rank. mode 'dense' or 'lexical' uses
        one ranking alone (to compare them: bench/knowledge.py)."""
        k = k or self.settings.top_k
        query = (query or "").strip()
        if not query:
            return []
        # A query the embedding model cannot read ranks by BM25 alone.
        read = mode == "dense" or (mode == "hybrid" and readable(self.embedder, query))
        # (Embedding the query on a second thread while BM25 ranks was measured slower on 2 cores.)
        vector = self.embedder.encode_query(query) if read else None
        depth = max(50, 4 * k)
        with self._lock:
            size = max(self._lexical.capacity, len(self._readers.public),
                       *(len(b) for b in self._readers.departments.values()), 1)
            allowed = self._readers.allowed(department_id, size)
            if not allowed.any():
                return []
            dense = self._dense.search(vector, allowed, depth) if vector is not None else []
            lexical = self._lexical.search(query, allowed, depth) if mode != "dense" else []
        fused: dict[int, float] = {}
        for rank, (chunk_id, _) in enumerate(dense):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1 / (RRF_K + rank + 1)
        for rank, (chunk_id, _, _) in enumerate(lexical):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1 / (RRF_K + rank + 1)
        best = sorted(fused, key=fused.get, reverse=True)[:k]
        dense_scores = dict(dense)
        floor = self.embedder.floor(vector) if vector is not None else None
        lexical_scores = {chunk_id: (score, coverage) for chunk_id, score, coverage in lexical}
        rows = kb_store.chunks_by_id(self.db, best)
        hits = []
        for chunk_id in best:
            row = rows.get(chunk_id)
            if row is None:  # deleted between the search and now
                continue
            lexical_score, coverage = lexical_scores.get(chunk_id, (None, None))
            hits.append(Hit(chunk_id, row["document_id"], row["title"], row["location"], row["text"],
                            round(fused[chunk_id], 6), dense_scores.get(chunk_id),
                            None if chunk_id not in dense_scores else dense_scores[chunk_id] - floor,
                            lexical_score, coverage))
        return hits

    def relevant(self, department_id: str, query: str, k: int | None = None) -> list[Hit]:
        """Passages worth putting in front of the model: a dense match that stands out from
        unrelated text (embeddings._Floor), or a lexical match that contains most of the
        query. 'Hello' retrieves nothing."""
        margin = self.settings.min_margin or self.embedder.relevance_margin
        return [h for h in self.search(department_id, query, k)
                if ((h.dense_margin or 0) >= margin and self._readable(h.text))
                or (h.coverage or 0) >= self.settings.min_coverage]

    def _readable(self, text: str) -> bool:
        """Whether the embedding model read this passage (an English-only model and a
        Chinese passage give a vector of [UNK]s whose similarities mean nothing)."""
        return readable(self.embedder, text, chinese_share=0.3)
