"""Generation on an OpenAI-compatible engine (vLLM with multi-LoRA in production).

hangjia keeps everything but the forward passes: it renders the prompt with the base
model's own chat template (same tools format, same thinking switch), sends it to the
engine's /v1/completions, and parses tool calls itself, so a turn is the same whether
the model runs here or there. Each department's adapter is a LoRA module of the engine,
named `<department>@<version>`; promotions load the new version through vLLM's runtime
LoRA API (/v1/load_lora_adapter; start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)
from a path the engine can read (a shared adapters dir).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import torch

from webapp.models import (
    AdapterInfo,
    GenerationParams,
    GenerationResult,
    ModelLoadError,
    PromptsAndRouting,
)

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The engine refused or failed a request; the message says what it answered."""


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
    except ValueError:
        message = None
    return f"HTTP {response.status_code}: {message or response.text[:300]}"


@dataclass
class RemoteModelService(PromptsAndRouting):
    tokenizer: Any
    name: str
    base_url: str
    served_model: str  # the engine's name for the base model (vLLM: --served-model-name)
    api_key: str = ""
    context_tokens: int = 0
    path: str = ""  # hub id or folder: the tokenizer's, and what the refresh trains on
    timeout_s: float = 600.0
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    canaries: dict[str, tuple[AdapterInfo, float]] = field(default_factory=dict)
    engine: Any = None  # no local batching engine: the remote engine batches
    _lora_names: dict[str, str] = field(default_factory=dict)  # loaded_as -> engine's LoRA name
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _client: httpx.Client | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # nothing runs here

    @property
    def max_context(self) -> int:
        return self.context_tokens

    def client(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers,
                                        timeout=httpx.Timeout(self.timeout_s, connect=10.0))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- adapters as the engine's LoRA modules ---------------------------------------------

    def load_adapter(self, name: str, path: Path, version: str, slot: str | None = None) -> AdapterInfo:
        info = AdapterInfo(name, version, Path(path), slot or "")
        lora_name = f"{info.loaded_as}@{version}"
        try:
            response = self.client().post("/v1/load_lora_adapter",
                                          json={"lora_name": lora_name, "lora_path": str(Path(path).resolve())})
        except httpx.HTTPError as exc:
            raise BackendError(f"The engine at {self.base_url} could not be reached to load {lora_name}: {exc}")
        if response.status_code >= 400 and "already" not in response.text.lower():
            raise BackendError(
                f"The engine refused to load adapter {lora_name} from {path} ({_error_text(response)}). vLLM loads "
                "adapters at run time when started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora, "
                "and needs to read that path (share the adapters dir).")
        with self._lock:
            previous = self._lora_names.get(info.loaded_as)
            self._lora_names[info.loaded_as] = lora_name
            if not slot:
                self.adapters[name] = info
        if previous and previous != lora_name:
            self._unload(previous)
        return info

    def unload_adapter(self, slot: str) -> None:
        with self._lock:
            lora_name = self._lora_names.pop(slot, None)
        if lora_name:
            self._unload(lora_name)

    def _unload(self, lora_name: str) -> None:
        try:
            self.client().post("/v1/unload_lora_adapter", json={"lora_name": lora_name})
        except httpx.HTTPError as exc:  # the old version only costs the engine memory
            log.warning("could not unload %s from the engine: %s", lora_name, exc)

    # -- generation ------------------------------------------------------------------------

    def stream(self, prompt: str, params: GenerationParams, adapter: str | None = None,
               result: GenerationResult | None = None, guide: Any = None) -> Iterator[str]:
        """Yield text pieces from the engine's streamed /v1/completions. Failures are
        reported through result.error (finish_reason "error"), as the local path does.
        `guide` is not applied here: the engine decodes (vLLM has structured outputs of its own)."""
        result = result if result is not None else GenerationResult()
        result.prompt_tokens = self.count_tokens(prompt)
        model = self._lora_names.get(adapter, self.served_model) if adapter else self.served_model
        body = {"model": model, "prompt": prompt, "max_tokens": params.max_new_tokens, "stream": True,
                "temperature": params.temperature, "top_p": params.top_p if params.temperature > 0 else 1.0,
                "stream_options": {"include_usage": True}, "skip_special_tokens": True}
        finished = False
        try:
            with self.client().stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise BackendError(_error_text(response))
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise BackendError(str(event["error"].get("message", event["error"])))
                    if event.get("usage"):
                        result.completion_tokens = int(event["usage"].get("completion_tokens") or 0)
                    for choice in event.get("choices") or ():
                        if choice.get("text"):
                            yield choice["text"]
                        if choice.get("finish_reason"):
                            result.finish_reason = "stop" if choice["finish_reason"] == "stop" else "length"
            finished = True
        except (BackendError, httpx.HTTPError, ValueError) as exc:
            log.error("generation on %s failed: %s", self.base_url, exc)
            result.error = f"the generation engine answered {exc}" if isinstance(exc, BackendError) \
                else f"the generation engine at {self.base_url} failed: {type(exc).__name__}: {exc}"
            result.finish_reason = "error"
        finally:
            if not finished and not result.error:
                result.finish_reason = "cancelled"  # the listener left; closing the stream stops the engine


def load_remote_model(model: str, base_url: str, api_key: str, served_model: str, context_tokens: int) -> \
        RemoteModelService:
    """The tokenizer and context length of `model` (hub id or folder), generation at base_url."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--backend openai needs the base model's tokenizer and config from {model!r} "
                             f"(a hub id or a folder with tokenizer and config files): {exc}") from exc
    context = context_tokens or int(getattr(config, "max_position_embeddings", 4096) or 4096)
    name = model.rstrip("/").split("/")[-1]
    return RemoteModelService(tokenizer=tokenizer, name=name, base_url=base_url, served_model=served_model or model,
                              api_key=api_key, context_tokens=context, path=model)
