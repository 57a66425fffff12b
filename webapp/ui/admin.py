"""The Admin tab (placeholder until retraining, documents and users land): usage counts."""

from __future__ import annotations

import gradio as gr

from storage import chats
from webapp.ui.common import caller


def admin_overview(services, request: gr.Request) -> dict:
    caller(services, request, "admin")
    return chats.usage_summary(services.db)


def build_admin_tab(services, i18n) -> None:
    gr.Markdown(i18n("admin_intro"))
    summary = gr.JSON(label="usage", elem_id="admin-summary")
    refresh = gr.Button(i18n("refresh"), elem_id="admin-refresh")
    def on_refresh(request: gr.Request):
        return admin_overview(services, request)

    refresh.click(on_refresh, None, summary, api_name="admin_overview")
