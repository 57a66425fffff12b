"""The services a running app needs, built in one place and passed to build_app."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from finetune.refresh import RefreshRunner, RefreshSettings
from storage import Database, migrate
from storage import adapters as adapter_registry
from webapp.adapters import AdapterManager
from webapp.auth import Auth
from webapp.cache.service import CacheSettings, ResponseCache
from webapp.demo import (
    DEMO_OWNER,
    ensure_first_admin,
    seed_demo_company,
    seed_demo_documents,
    seed_demo_feedback,
)
from webapp.engine import ChatEngine
from webapp.knowledge.base import KnowledgeBase, KnowledgeSettings
from webapp.knowledge.embeddings import E5Embedder, Embedder, load_embedder
from webapp.knowledge.tool import KNOWLEDGE_TOOLS_FILE, knowledge_builtins
from webapp.metrics import Metrics
from webapp.models import (
    GenerationParams,
    ModelLoadError,
    ModelService,
    ModelSpec,
    load_model_service,
)
from webapp.review import ReviewService, ReviewSettings
from webapp.scheduler import NightlyRefresh
from webapp.settings import EMBEDDED_MODEL, Settings
from webapp.tools.builtin import BUILTINS
from webapp.tools.executor import ToolExecutor
from webapp.tools.registry import DEMO_TOOLS_FILE, load_registry
from webapp.turn import TurnSettings

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    auth: Auth
    model: ModelService
    engine: ChatEngine
    tools: ToolExecutor
    reviews: ReviewService
    adapters: AdapterManager
    refresh: RefreshRunner
    nightly: NightlyRefresh
    metrics: Metrics
    knowledge: KnowledgeBase | None = None
    cache: ResponseCache | None = None
    first_admin_password: str | None = field(default=None, repr=False)

    def close(self) -> None:
        self.nightly.stop()
        for department in list(self.refresh.running()):
            self.refresh.cancel(department)
        self.tools.close()
        self.model.close()
        self.db.close()


def turn_settings(settings: Settings) -> TurnSettings:
    return TurnSettings(
        system_prompt=settings.system_prompt,
        max_message_chars=settings.max_message_chars,
        thinking=settings.thinking,
        generation=GenerationParams(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p
        ),
        max_tool_rounds=settings.max_tool_rounds,
        guided_tool_calls=settings.guided_tool_calls,
    )


def tool_files(settings: Settings) -> list:
    """The knowledge-base search, the demo company's tools in demo mode, and the admin's own tools file."""
    files = [KNOWLEDGE_TOOLS_FILE] if settings.knowledge else []
    if settings.demo:
        files.append(DEMO_TOOLS_FILE)
    if settings.tools_file is not None:
        files.append(settings.tools_file)
    return files


def knowledge_settings(settings: Settings) -> KnowledgeSettings:
    return KnowledgeSettings(
        index_dir=settings.knowledge_dir, chunk_tokens=settings.chunk_tokens,
        overlap_tokens=settings.chunk_overlap_tokens, top_k=settings.retrieval_top_k,
        min_margin=settings.retrieval_min_margin, min_coverage=settings.retrieval_min_coverage,
        ann_threshold=settings.ann_threshold)


def cache_settings(settings: Settings) -> CacheSettings:
    return CacheSettings(enabled=settings.cache, semantic=settings.cache_semantic, threshold=settings.cache_threshold,
                         ttl_s=int(settings.cache_ttl_hours * 3600), live_ttl_s=settings.cache_live_ttl_s,
                         max_entries=settings.cache_max_entries, lookups_kept_days=settings.cache_lookups_kept_days)


def open_knowledge(db: Database, settings: Settings, embedder: Embedder | E5Embedder | None = None) -> KnowledgeBase:
    """The knowledge base with its indexes in line with DuckDB (the embedder may be passed in to share it)."""
    embedder = embedder or load_embedder(settings.embedding_model)
    return KnowledgeBase(db, embedder, knowledge_settings(settings)).open()


def open_services(settings: Settings, model: ModelService | None = None,
                  embedder: Embedder | E5Embedder | None = None) -> Services:
    """Open storage (migrations, first users), load the model and its adapters.

    Storage opens first so that a second app on the same data dir is refused before
    spending time on the model; tool definitions are checked before the model loads too.
    """
    db = Database(settings.db_path)
    try:
        applied = migrate(db)
        if applied:
            log.info("database %s: applied %s", settings.db_path, ", ".join(applied))
        stale = adapter_registry.fail_running_runs(db, "the app stopped while it ran")
        if stale:
            log.warning("%d training runs were left running by a stopped app; marked failed", stale)
        owners = {name.strip() for name in settings.owners.split(",") if name.strip()}
        auth = Auth(db, owners=frozenset(owners | ({DEMO_OWNER[0]} if settings.demo else set())))
        first_admin_password = None
        seeded = settings.demo and seed_demo_company(db, auth)
        if seeded:
            log.info("seeded the demo company (departments finance and hr)")
        elif not settings.demo:
            first_admin_password = ensure_first_admin(db, auth)
        knowledge = open_knowledge(db, settings, embedder) if settings.knowledge else None
        if knowledge is not None and settings.demo and seed_demo_documents(knowledge):
            log.info("seeded the demo knowledge base")
        builtins = {**BUILTINS, **(knowledge_builtins(knowledge) if knowledge is not None else {})}
        registry = load_registry(tool_files(settings), builtins)
        tools = ToolExecutor(registry, db, max_result_chars=settings.tool_result_max_chars)
        if model is None:
            model = load_generation_backend(settings)
        if isinstance(model, ModelService) and (settings.decoding == "batched" or (
                settings.decoding == "auto" and model.device.type == "cuda")):
            model.enable_batched_decoding(settings.decode_batch, settings.decode_max_len, settings.stream_interval_ms,
                                          settings.decode_kv_tokens, settings.decode_prefill_chunk)
        adapters = AdapterManager(db, model, settings.resolved_adapters_dir, settings.model)
        adapters.load_active()
        cache = None
        if settings.cache:
            cache = ResponseCache(db, cache_settings(settings), knowledge.embedder if knowledge else embedder,
                                  registry.vocabulary())
        metrics = Metrics(db)
        engine = ChatEngine(db, model, turn_settings(settings), tools, knowledge, cache, metrics)
        review = ReviewService(db, engine, tools, ReviewSettings(
            settings.scrub_pii, settings.eval_fraction))
        if seeded and settings.demo_feedback:
            try:
                corrected, waiting = seed_demo_feedback(db, auth, review, model.name)
                log.info("seeded the demo feedback: %d corrected answers, %d waiting for review", corrected, waiting)
            except Exception:  # e.g. a --tools-file without the demo's query_sales: the demo starts without it
                log.exception("could not seed the demo feedback; the demo starts without it")
        runner = RefreshRunner(
            db, refresh_settings(settings), lambda: model.path, settings.resolved_adapters_dir,
            settings.data_dir / "runs", lambda department: department_tools(db, tools, department),
            adapters.activate, lambda department: department_vocabulary(tools, department),
            department_passages(knowledge), lambda department, said: department_unasked_tools(tools, department, said),
            lambda department, question: department_spelled_tool(tools, department, question))
        nightly = NightlyRefresh(db, runner, settings.refresh_cron,
                                 housekeeping=[cache.prune_lookups] if cache is not None else [])
    except BaseException:
        db.close()
        raise
    return Services(settings, db, auth, model, engine, tools, review, adapters, runner, nightly, metrics,
                    knowledge, cache, first_admin_password)


def load_generation_backend(settings: Settings):
    """The model in this process, or the OpenAI-compatible engine at --backend-url."""
    if settings.backend == "openai":
        from webapp.remote_model import load_remote_model

        if settings.model == EMBEDDED_MODEL:
            raise ModelLoadError("--backend openai needs --model: the hub id or folder of the model the engine "
                                 "serves (hangjia reads its tokenizer and chat template from it).")
        return load_remote_model(settings.model, settings.backend_url, settings.backend_api_key,
                                 settings.backend_model, settings.context_tokens)
    spec = ModelSpec(settings.model, settings.device, settings.dtype, settings.load_in_4bit)
    return load_model_service(spec, settings.models_dir, settings.context_tokens)


def department_passages(knowledge):
    """(department, question) -> the passages a turn would give the question (the relevance
    gate's, within the department), for the refresh to train its variants with."""
    if knowledge is None:
        return lambda department, question: []

    def passages(department: str, question: str) -> list[dict]:
        return [{"title": hit.title, "location": hit.location, "text": hit.text}
                for hit in knowledge.relevant(department, question)]

    return passages


def refresh_settings(settings: Settings) -> RefreshSettings:
    return RefreshSettings(
        min_new_samples=settings.min_new_samples, general_replay=settings.general_replay,
        augment_variants=settings.augment_variants, replay_share=settings.replay_share,
        start_from_active=settings.start_from_active, auto_promote=settings.auto_promote,
        gate_margin=settings.gate_margin, gate_tolerance=settings.gate_tolerance, lora_r=settings.lora_r,
        lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=[m.strip() for m in settings.lora_target_modules.split(",") if m.strip()]
        if settings.lora_target_modules else None,
        epochs=settings.epochs, learning_rate=settings.learning_rate,
        gradient_accumulation=settings.gradient_accumulation, max_seq_len=settings.max_seq_len,
        load_in_4bit=True, eval_max_new_tokens=settings.eval_max_new_tokens, system_prompt=settings.system_prompt,
        guided_tool_calls=settings.guided_tool_calls, detach_shared_prefix=settings.detach_shared_prefix,
        cpu_bf16=settings.cpu_bf16, compile_layers=settings.compile_layers,
        compile_min_tokens=settings.compile_min_tokens, fp8_backward=settings.fp8_backward,
        train_gpus=settings.train_gpus,
        replay_own_answers=settings.replay_own_answers, replay_answer_tokens=settings.replay_answer_tokens,
        thinking=settings.thinking)


def _employee_of(department_id: str):
    from storage.accounts import User

    return User(0, "", "", "employee", department_id, False)


def department_tools(db, tools: ToolExecutor, department_id: str) -> list[dict]:
    """The tools an employee of the department is offered: what its samples are trained with."""
    return [spec.function_schema() for spec in tools.tools_for(_employee_of(department_id))]


def department_unasked_tools(tools: ToolExecutor, department_id: str, said: list[str]) -> list[str]:
    """The tools an employee of the department is offered that `said` asks no call of
    (webapp.tools.grounding.asks_for): what the gate decodes again, as serving does."""
    from webapp.tools.grounding import asks_for

    return [spec.name for spec in tools.tools_for(_employee_of(department_id)) if not asks_for(spec, said)]


def department_spelled_tool(tools: ToolExecutor, department_id: str, question: str) -> str | None:
    """The one tool an employee of the department is offered whose whole call `question` spells
    (webapp.tools.grounding.spelled_call): an answer without a call is decoded again as its
    call, in serving and in the gate."""
    from webapp.tools.grounding import spelled_tool

    spec = spelled_tool(tools.tools_for(_employee_of(department_id)), question, tools.today())
    return spec.name if spec else None


def department_vocabulary(tools: ToolExecutor, department_id: str) -> dict:
    """Every spelling of every closed value of those tools: what slot-swap variants draw on."""
    from finetune.augment import slot_vocabulary

    return slot_vocabulary((spec.name, spec.parameters, spec.aliases)
                           for spec in tools.tools_for(_employee_of(department_id)))
