"""The Review tab (placeholder until the review workbench lands): reviewers and admins see
how many thumbs-down answers wait in their departments."""

from __future__ import annotations

import gradio as gr

from storage import chats
from webapp.ui.common import caller

REVIEW_ROLES = ("reviewer", "admin")


def review_overview(services, request: gr.Request) -> str:
    user = caller(services, request, *REVIEW_ROLES)
    # Reviewers are assigned their own department for now; admins see all.
    departments = None if user.role == "admin" else [user.department_id]
    waiting = chats.count_thumbs_down(services.db, departments)
    scope = "all departments 全部部门" if departments is None else user.department_id
    return f"**{waiting}** thumbs-down answers waiting · 待审核的点踩回答 — {scope}"


def build_review_tab(services, i18n) -> None:
    gr.Markdown(i18n("review_intro"))
    summary = gr.Markdown(elem_id="review-summary")
    refresh = gr.Button(i18n("refresh"), elem_id="review-refresh")
    def on_refresh(request: gr.Request):
        return review_overview(services, request)

    refresh.click(on_refresh, None, summary, api_name="review_overview")
