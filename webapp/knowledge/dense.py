"""The FAISS index of chunk embeddings, keyed by chunk id.

Exact inner-product search while the knowledge base is small; HNSW past a size threshold
(rebuilt from DuckDB when it is crossed). Who may read what is passed in as a bitmap of
chunk ids and applied inside the search (faiss IDSelector), so the top k are the best
*readable* chunks, never a filtered remainder of someone else's top k.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import faiss
import numpy as np

HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


@contextlib.contextmanager
def _one_thread():
    """Run faiss on the calling thread alone. One query needs no threads, and the pool faiss
    wakes anyway (its id map's label loop) then spins for milliseconds on the core the query
    embedding needs next, where faiss has an OpenMP runtime of its own (imported before torch):
    a query embedding took 10.8 ms p50 instead of 8.1 at 100k chunks. OpenMP keeps the thread
    count per calling thread, so index builds on other threads keep every core."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


class DenseIndex:
    def __init__(self, dim: int, approximate: bool):
        self.dim = dim
        self.approximate = approximate
        if approximate:
            inner = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        else:
            inner = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIDMap2(inner)
        # HNSW cannot remove vectors: removed ids stay in the graph but out of every
        # search (the caller's bitmap never includes them) until the next rebuild.
        self.removed: set[int] = set()

    @property
    def size(self) -> int:
        return self.index.ntotal - len(self.removed)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def remove(self, ids) -> None:
        ids = np.asarray(list(ids), dtype=np.int64)
        if not len(ids):
            return
        if self.approximate:
            self.removed.update(int(i) for i in ids)
        else:
            self.index.remove_ids(ids)

    def search(self, query: np.ndarray, allowed: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Top k (chunk id, cosine) among ids where allowed[id] is True."""
        if self.index.ntotal == 0 or not allowed.any():
            return []
        bits = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
        if self.approximate:
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(HNSW_EF_SEARCH, k))
        else:
            params = faiss.SearchParameters(sel=selector)
        with _one_thread():
            scores, ids = self.index.search(query.reshape(1, -1).astype(np.float32), k, params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    # -- persistence --------------------------------------------------------------------

    def save(self, path: Path, meta: dict) -> None:
        """Atomically: a crash mid-write leaves the previous file, which is then stale and rebuilt."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        meta = {**meta, "dim": self.dim, "approximate": self.approximate, "removed": sorted(self.removed)}
        meta_tmp = path.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps(meta))
        os.replace(meta_tmp, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: Path) -> tuple["DenseIndex", dict] | None:
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            index = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError):
            return None
        dense = cls.__new__(cls)
        dense.dim, dense.approximate = int(meta["dim"]), bool(meta["approximate"])
        dense.index = index
        dense.removed = set(meta.get("removed", ()))
        return dense, meta
