"""build_app(services) -> gr.Blocks. Launching happens in launch.py only."""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr
from starlette.concurrency import run_in_threadpool

from storage import chats
from webapp.auth import LOGIN_CLIENT
from webapp.demo import DEMO_PASSWORD
from webapp.i18n import EN, build_i18n
from webapp.review import REVIEW_ROLES
from webapp.services import Services
from webapp.ui.admin import build_admin_tab, register_admin_api
from webapp.ui.cache import build_cache_section, register_cache_api
from webapp.ui.chat import (
    GENERATION_QUEUE,
    build_chat_tab,
    conversation_choices,
    conversation_view,
    rate,
    stream_answer,
    stream_resolution,
)
from webapp.ui.common import FILES_CHECK_S, FILES_KEEP_S, caller, guard_handlers
from webapp.ui.knowledge import build_knowledge_section, register_knowledge_api
from webapp.ui.operations import (
    build_api_keys_section,
    build_audit_section,
    build_monitoring_section,
    register_operations_api,
)
from webapp.ui.review import REVIEW_SHORTCUTS_JS, build_review_tab, register_review_api


def header_markdown(services: Services, user) -> str:
    adapter = services.model.adapter_for(user.department_id)
    answering = f"{services.model.name} + {adapter.name}@{adapter.version}" if adapter else f"{services.model.name} (base)"
    return (
        f"👤 **{user.display_name}** · 🏢 {user.department_id} · 🎫 {'owner 公司管理者' if user.owner else user.role}"
        f" &nbsp;&nbsp;|&nbsp;&nbsp; 🤖 {answering}"
    )


def demo_banner(services: Services) -> str:
    """What a newcomer is looking at in demo mode, and the loop to try (both languages)."""
    return (
        f"🧪 **演示模式 Demo** · 模型 model: `{services.model.name}`（内置小模型，未经公司数据训练，常会答错 · the "
        "small embedded model, not yet trained on company data: it often answers wrong）\n\n"
        "试试这个循环 Try the loop: ① `finance-employee` 问 ask “上季度华东区的销售额是多少？” → ② `finance-reviewer` "
        "在 “审核 Review” 里纠正一条（选 query_sales） correct a case → ③ `finance-admin` 在 “管理 Admin” 点 "
        "“立即训练 Retrain now”，约十二分钟 about twelve minutes on 2 cores → ④ 再问一次 ask again: "
        "答案来自新的 finance 适配器，版本显示在顶部 the answer comes from the new finance adapter, its version above. "
        f"密码 password: `{DEMO_PASSWORD}`")


def build_app(services: Services) -> gr.Blocks:
    i18n = build_i18n()
    # Gradio's copies of uploads and downloads go an hour after they were made, and all at shutdown.
    with gr.Blocks(title=EN["app_title"], delete_cache=(FILES_CHECK_S, FILES_KEEP_S)) as app:
        with gr.Row(equal_height=True):
            header = gr.Markdown(elem_id="header")
            gr.Button(i18n("logout"), link="/logout", size="sm", scale=0, min_width=120, elem_id="logout")
        if services.settings.demo:
            gr.Markdown(demo_banner(services), elem_id="demo-banner")
        with gr.Tabs():
            with gr.Tab(i18n("tab_chat"), id="chat"):
                chat = build_chat_tab(services, i18n)
                build_api_keys_section(services, i18n)
            with gr.Tab(i18n("tab_review"), id="review", visible=False) as review_tab:
                build_review_tab(services, i18n, review_tab)
            with gr.Tab(i18n("tab_admin"), id="admin", visible=False) as admin_tab:
                # each screen fills itself when the admin opens the tab
                build_admin_tab(services, i18n, admin_tab)
                build_knowledge_section(services, i18n, admin_tab)
                build_cache_section(services, i18n, admin_tab)
                build_monitoring_section(services, i18n, admin_tab)
                build_audit_section(services, i18n, admin_tab)

        def on_load(request: gr.Request):
            user = caller(services, request)
            return (
                header_markdown(services, user),
                gr.Tab(visible=user.role in REVIEW_ROLES),
                gr.Tab(visible=user.role == "admin"),
                gr.Radio(choices=conversation_choices(services, user), value=None),
            )

        app.load(on_load, None, [header, review_tab, admin_tab, chat["conversations"]], api_visibility="private")
        _register_api(services)
        register_review_api(services)
        register_admin_api(services)
        register_knowledge_api(services)
        register_cache_api(services)
        register_operations_api(services)
    guard_handlers(app)
    return app


def _register_api(services: Services) -> None:
    """Endpoints for programs (gradio_client, scripts, benchmarks). They call the same
    functions as the browser's handlers, with the same login and checks."""

    def whoami(request: gr.Request) -> dict[str, Any]:
        user = caller(services, request)
        adapter = services.model.adapter_for(user.department_id)
        return {
            "username": user.username, "role": user.role, "owner": user.owner, "department": user.department_id,
            "model": services.model.name,
            "adapter": adapter.name if adapter else None,
            "adapter_version": adapter.version if adapter else None,
        }

    def chat(message: str, conversation_id: int | None = None, fresh: bool = False,
             request: gr.Request = None) -> Iterator[dict[str, Any]]:
        """Stream one turn: dicts with conversation_id, message_id, answer, items (text,
        sources and tool actions), pending (actions to approve with /approve), cached,
        completion_tokens (generated by the rounds finished so far; on the final update, the
        whole turn's, tool rounds included) and done.
        fresh=true asks the model even when the response cache has the answer."""
        user = caller(services, request)
        first, rest = stream_answer(services, user, message, conversation_id, None, bool(fresh))
        yield _update_dict(first)
        for update in rest:
            yield _update_dict(update)

    def approve(call_id: str, approve: bool, request: gr.Request = None) -> Iterator[dict[str, Any]]:
        """Approve (true) or decline (false) a pending action; the turn then goes on, streamed."""
        user = caller(services, request)
        first, rest = stream_resolution(services, user, call_id, bool(approve))
        yield _update_dict(first)
        for update in rest:
            yield _update_dict(update)

    def feedback(message_id: int, rating: int, comment: str = "", request: gr.Request = None) -> dict[str, Any]:
        """rating 1 = thumbs up, -1 = thumbs down (comment optional)."""
        user = caller(services, request)
        feedback_id = rate(services, user, message_id, rating, comment or None)
        return {"feedback_id": feedback_id, "message_id": int(message_id), "rating": int(rating)}

    def conversations(request: gr.Request) -> list[dict[str, Any]]:
        user = caller(services, request)
        return [
            {"id": c.id, "title": c.title, "updated_at": c.updated_at.isoformat()}
            for c in chats.list_conversations(services.db, user.id)
        ]

    def conversation(conversation_id: int, request: gr.Request) -> dict[str, Any]:
        user = caller(services, request)
        items, pending = conversation_view(services, user, int(conversation_id))
        return {"items": items, "pending": pending}

    gr.api(whoami, api_name="whoami")
    gr.api(chat, api_name="chat", concurrency_id=GENERATION_QUEUE,
           concurrency_limit=services.settings.generation_concurrency)
    gr.api(approve, api_name="approve", concurrency_id=GENERATION_QUEUE,
           concurrency_limit=services.settings.generation_concurrency)
    gr.api(feedback, api_name="feedback")
    gr.api(conversations, api_name="conversations")
    gr.api(conversation, api_name="conversation")


def _update_dict(update) -> dict[str, Any]:
    return {
        "conversation_id": update.conversation_id,
        "user_message_id": update.user_message_id,
        "message_id": update.message_id,
        "answer": update.answer,
        "done": update.done,
        "adapter": update.adapter,
        "adapter_version": update.adapter_version,
        "items": update.items,
        "pending": update.pending,
        "cached": update.cached,
        "completion_tokens": update.completion_tokens,
    }


def launch_options(services: Services) -> dict[str, Any]:
    """Keyword arguments for Blocks.launch shared by launch.py and the tests."""
    async def check_login(username: str, password: str) -> bool:
        # scrypt takes ~40 ms: on a worker thread, so logins never stall the server's event loop
        return await run_in_threadpool(services.auth.check_login, username, password, LOGIN_CLIENT.get())

    return {
        "auth": check_login,
        "auth_message": "hangjia 行家 — log in with your company account · 请使用公司账号登录",
        "i18n": build_i18n(),
        "footer_links": ["settings"],
        "max_threads": 64,
        # Big enough for long pasted messages; the engine refuses what exceeds the setting.
        "max_file_size": "50mb",
        # gr.Error messages are always shown; anything else (Gradio's own input processing too)
        # reaches the client without its Python text (guard_handlers covers the handlers)
        "show_error": False,
        "head": REVIEW_SHORTCUTS_JS,
    }
