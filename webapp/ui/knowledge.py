"""Company knowledge in the Admin tab (upload with progress, list, delete) and the search
endpoint for programs. Uploading and deleting are for admins; searching is for everyone,
over their own department's documents only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from storage import accounts
from webapp.i18n import bilingual
from webapp.knowledge.parsing import SUPPORTED
from webapp.ui.common import caller

DOCUMENT_COLUMNS = ["id", "title", "source_name", "readers", "chunks", "chars", "updated_at"]
COMPANY_WIDE = "*"  # the choice "company-wide" among the departments


def documents_table(services, department_id: str | None = None) -> pd.DataFrame:
    if services.knowledge is None:
        return pd.DataFrame(columns=DOCUMENT_COLUMNS)
    rows = [[d.id, d.title, d.source_name, "company-wide 全公司" if d.company_wide else ", ".join(d.departments),
             d.chunks, d.chars, d.updated_at] for d in services.knowledge.documents(department_id)]
    return pd.DataFrame(rows, columns=DOCUMENT_COLUMNS)


def reports_markdown(reports) -> str:
    icon = {"added": "✅", "replaced": "🔄", "unchanged": "➖", "error": "❌"}
    return "\n".join(f"- {icon.get(r.status, '')} **{r.name}** · {r.status} · {r.message}" for r in reports)


def upload(services, user, files: list[tuple[str, bytes]], readers: list[str], progress=None):
    company_wide = COMPANY_WIDE in readers
    departments = [r for r in readers if r != COMPANY_WIDE]
    if not company_wide and not departments:
        raise gr.Error(bilingual("knowledge_no_departments"))
    known = {d.id for d in accounts.list_departments(services.db)}
    unknown = sorted(set(departments) - known)
    if unknown:
        raise gr.Error(f"Unknown departments 未知部门: {', '.join(unknown)}")
    return services.knowledge.add_files(files, departments, company_wide, uploaded_by=user.id, progress=progress)


def build_knowledge_section(services, i18n) -> None:
    enabled = services.knowledge is not None
    with gr.Accordion(i18n("knowledge_title"), open=False, elem_id="knowledge"):
        if not enabled:
            gr.Markdown("The knowledge base is off (`--no-knowledge`). 知识库已关闭。")
            return
        with gr.Row():
            files = gr.File(label=i18n("knowledge_files"), file_count="multiple", file_types=list(SUPPORTED),
                            elem_id="knowledge-files")
            with gr.Column():
                readers = gr.CheckboxGroup(label=i18n("knowledge_readers"), choices=[], elem_id="knowledge-readers")
                add = gr.Button(i18n("knowledge_add"), variant="primary", elem_id="knowledge-add")
        result = gr.Markdown(elem_id="knowledge-result")
        documents = gr.Dataframe(label=i18n("knowledge_documents"), interactive=False, elem_id="knowledge-documents")
        with gr.Row():
            document_id = gr.Number(label=i18n("knowledge_document_id"), precision=0, elem_id="knowledge-document-id")
            delete = gr.Button(i18n("knowledge_delete"), variant="stop", elem_id="knowledge-delete")
            reload = gr.Button(i18n("refresh"), elem_id="knowledge-reload")

    def listing(request: gr.Request):
        caller(services, request, "admin")
        choices = [("company-wide 全公司", COMPANY_WIDE)] + [
            (d.name, d.id) for d in accounts.list_departments(services.db)]
        return gr.CheckboxGroup(choices=choices), documents_table(services)

    def add_documents(paths, chosen, request: gr.Request, progress=gr.Progress()):
        user = caller(services, request, "admin")
        if not paths:
            raise gr.Error("Choose files first. 请先选择文件。")
        batch = [(Path(p).name, Path(p).read_bytes()) for p in paths]
        reports = upload(services, user, batch, chosen or [],
                         progress=lambda fraction, what: progress(fraction, desc=what))
        # The documents now live in the knowledge base; Gradio's copies of the uploads would
        # outlive a later delete there. The upload box is emptied, so nobody sends these paths again.
        for p in paths:
            Path(p).unlink(missing_ok=True)
        return reports_markdown(reports), documents_table(services), None

    def delete_document(value, request: gr.Request):
        caller(services, request, "admin")
        if value is None or not services.knowledge.delete(int(value)):
            raise gr.Error(f"No document {value}. 没有这个文档。")
        return f"🗑 document {int(value)} deleted 已删除", documents_table(services)

    reload.click(listing, None, [readers, documents], api_visibility="private")
    add.click(add_documents, [files, readers], [result, documents, files], api_visibility="private")
    delete.click(delete_document, [document_id], [result, documents], api_visibility="private")


def register_knowledge_api(services) -> None:
    def knowledge_search(query: str, top_k: int = 4, request: gr.Request = None) -> list[dict[str, Any]]:
        """Passages of the documents the caller's department may read, best first."""
        user = caller(services, request)
        if services.knowledge is None:
            raise gr.Error("The knowledge base is off on this server.")
        top_k = max(1, min(int(top_k), 20))
        return [h.as_dict() for h in services.knowledge.search(user.department_id, query, top_k)]

    def knowledge_documents(request: gr.Request = None) -> list[dict[str, Any]]:
        """Documents the caller's department may read (admins: all of them)."""
        user = caller(services, request)
        department = None if user.role == "admin" else user.department_id
        table = documents_table(services, department)
        return table.astype({"updated_at": str}).to_dict(orient="records")

    gr.api(knowledge_search, api_name="knowledge_search")
    gr.api(knowledge_documents, api_name="knowledge_documents")
