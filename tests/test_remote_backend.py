"""--backend openai: generation on a real OpenAI-compatible server on 127.0.0.1 — a second
hangjia process serving /v1 on the tiny model — while this app keeps auth, tools, logging."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from storage import Database, accounts, adapters, chats, migrate
from tests.conftest import free_port, make_lora_adapter, make_settings
from webapp.adapters import AdapterError
from webapp.auth import Auth
from webapp.models import GenerationParams, GenerationResult
from webapp.turn import GenerationFailed

pytestmark = pytest.mark.slow  # a second hangjia process serves /v1

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory, tiny_model_dir):
    """hangjia as a plain generation engine: its own data dir, one admin key for us."""
    data_dir = tmp_path_factory.mktemp("engine")
    db = Database(data_dir / "hangjia.duckdb")
    migrate(db)
    accounts.add_department(db, "ops", "Operations")
    auth = Auth(db)
    admin = auth.create_user("engine", "engine-password", "admin", "ops")
    _, key = auth.create_api_key(admin, "the front app")
    db.close()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, "launch.py", "--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--port",
         str(port), "--no-knowledge", "--no-cache", "--no-scheduler", "--device", "cpu", "--temperature", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the engine did not start:\n" + process.stdout.read()[-3000:])
        time.sleep(0.5)
    yield url, key, tiny_model_dir.name
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def front(tmp_path, engine_server, tiny_model_dir, embedder):
    from webapp.services import open_services

    url, key, served = engine_server
    settings = make_settings(tmp_path, model=str(tiny_model_dir), backend="openai", backend_url=url,
                             backend_api_key=key, backend_model=served, context_tokens=8192, scheduler=False)
    services = open_services(settings, embedder=embedder)
    yield services
    services.close()


class Spy:
    """Passes through to the real stream and keeps the prompts it was given."""

    def __init__(self, stream):
        self.stream, self.prompts, self.pieces = stream, [], []

    def __call__(self, prompt, params, adapter=None, result=None, guide=None):
        self.prompts.append(prompt)
        for piece in self.stream(prompt, params, adapter, result, guide=guide):
            self.pieces.append(piece)
            yield piece


def test_turns_are_generated_by_the_engine_and_logged_here(front, tiny_model, monkeypatch):
    spy = Spy(front.model.stream)
    monkeypatch.setattr(front.model, "stream", spy)
    user = front.auth.current_user("finance-employee")
    final = list(front.engine.turns.stream_turn(user, "What is a balance sheet?"))[-1]
    assert len(spy.pieces) > 1, "the engine's answer arrived streamed"
    # the engine ran the same model on the same prompt: the answer is what the model says greedily
    local = "".join(tiny_model.stream(spy.prompts[0], GenerationParams(max_new_tokens=12, temperature=0.0)))
    assert "".join(spy.pieces) == local
    stored = chats.list_messages(front.db, final.conversation_id)[-1]
    outcome = chats.message_outcome(front.db, stored.id)
    assert outcome["finish_reason"] in ("stop", "length") and outcome["completion_tokens"] > 0
    assert "query_sales" in spy.prompts[0], "tools are offered by this app, with the user's permissions"


def test_an_error_from_the_engine_is_a_clear_failure_and_the_turn_is_logged(front):
    user = front.auth.current_user("finance-employee")
    # this app allows 8192 tokens of context; the engine's model only 2048: the engine refuses
    long_message = "balance sheet " * 1100  # ~3,300 tokens, under 16,000 characters
    with pytest.raises(GenerationFailed, match="context"):
        list(front.engine.turns.stream_turn(user, long_message))
    conversation = chats.list_conversations(front.db, user.id)[0]
    last = chats.list_messages(front.db, conversation.id)[-1]
    assert last.role == "assistant" and chats.message_outcome(front.db, last.id)["finish_reason"] == "error"

    front.model.close()
    front.model.api_key = "hj-wrong"
    result = GenerationResult()
    assert list(front.model.stream("hello", GenerationParams(max_new_tokens=4), None, result)) == []
    assert result.finish_reason == "error" and "401" in result.error


def test_a_promotion_asks_the_engine_to_load_the_adapter_and_says_why_when_it_cannot(front, tiny_model_dir, tmp_path):
    path = make_lora_adapter(tiny_model_dir, tmp_path / "finance-v1", seed=3)
    adapters.add_version(front.db, "finance", "v1", str(path), "tiny", None)
    # hangjia as an engine has no runtime LoRA loading (vLLM has): the admin is told what to do
    with pytest.raises(AdapterError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        front.adapters.activate("finance", "v1")
    assert front.model.adapter_for("finance") is None, "the base keeps serving"
