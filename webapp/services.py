"""The services a running app needs, built in one place and passed to build_app."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from finetune.refresh import RefreshRunner, RefreshSettings
from storage import Database, migrate
from storage import adapters as adapter_registry
from webapp.adapters import AdapterManager
from webapp.auth import Auth
from webapp.demo import ensure_first_admin, seed_demo_company
from webapp.engine import ChatEngine, TurnSettings
from webapp.models import GenerationParams, ModelService, ModelSpec, load_model_service
from webapp.review import ReviewService, ReviewSettings
from webapp.scheduler import NightlyRefresh
from webapp.settings import Settings
from webapp.tools.builtin import BUILTINS
from webapp.tools.executor import ToolExecutor
from webapp.tools.registry import DEMO_TOOLS_FILE, load_registry

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
    first_admin_password: str | None = field(default=None, repr=False)

    def close(self) -> None:
        self.nightly.stop()
        for department in list(self.refresh.running()):
            self.refresh.cancel(department)
        self.tools.close()
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
    )


def tool_files(settings: Settings) -> list:
    """The demo company's tools in demo mode, plus the admin's own tools file."""
    files = [DEMO_TOOLS_FILE] if settings.demo else []
    if settings.tools_file is not None:
        files.append(settings.tools_file)
    return files


def open_services(settings: Settings, model: ModelService | None = None) -> Services:
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
        auth = Auth(db)
        first_admin_password = None
        if settings.demo:
            if seed_demo_company(db, auth):
                log.info("seeded the demo company (departments finance and hr)")
        else:
            first_admin_password = ensure_first_admin(db, auth)
        registry = load_registry(tool_files(settings), BUILTINS)
        tools = ToolExecutor(registry, db, max_result_chars=settings.tool_result_max_chars)
        if model is None:
            spec = ModelSpec(settings.model, settings.device, settings.dtype, settings.load_in_4bit)
            model = load_model_service(spec, settings.models_dir, settings.context_tokens)
        adapters = AdapterManager(db, model, settings.resolved_adapters_dir, settings.model)
        adapters.load_active()
        engine = ChatEngine(db, model, turn_settings(settings), tools)
        review = ReviewService(db, engine, tools, ReviewSettings(
            settings.system_prompt, settings.scrub_pii, settings.eval_fraction))
        runner = RefreshRunner(
            db, refresh_settings(settings), lambda: model.path, settings.resolved_adapters_dir,
            settings.data_dir / "runs", lambda department: department_tools(db, tools, department),
            adapters.activate)
        nightly = NightlyRefresh(db, runner, settings.refresh_cron)
    except BaseException:
        db.close()
        raise
    return Services(settings, db, auth, model, engine, tools, review, adapters, runner, nightly, first_admin_password)


def refresh_settings(settings: Settings) -> RefreshSettings:
    return RefreshSettings(
        min_new_samples=settings.min_new_samples, general_replay=settings.general_replay,
        start_from_active=settings.start_from_active, auto_promote=settings.auto_promote,
        gate_margin=settings.gate_margin, gate_tolerance=settings.gate_tolerance, lora_r=settings.lora_r,
        lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=[m.strip() for m in settings.lora_target_modules.split(",") if m.strip()],
        epochs=settings.epochs, learning_rate=settings.learning_rate,
        gradient_accumulation=settings.gradient_accumulation, max_seq_len=settings.max_seq_len,
        load_in_4bit=True, eval_max_new_tokens=settings.eval_max_new_tokens, system_prompt=settings.system_prompt)


def department_tools(db, tools: ToolExecutor, department_id: str) -> list[dict]:
    """The tools an employee of the department is offered: what its samples are trained with."""
    from storage.accounts import User

    employee = User(0, "", "", "employee", department_id, False)
    return [spec.function_schema() for spec in tools.tools_for(employee)]
