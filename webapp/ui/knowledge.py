"""Company knowledge in the Admin tab (upload with progress, list, delete) and the search
endpoint for programs. Searching is for everyone, over their own department's documents only.
A document is managed by the admin of the one department that reads it; company-wide and
shared documents by the owner. Admins see only the documents their department reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from storage import accounts
from webapp.i18n import bilingual, for_people
from webapp.knowledge.parsing import SUPPORTED
from webapp.ui.common import caller, department_scope, on_open

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


def manages(user, document) -> bool:
    """Whether `user` may replace or delete `document`: the owner any; an admin those read by
    their own department alone."""
    return user.owner or (not document.company_wide and set(document.departments) == {user.department_id})


def reader_choices(services, user) -> list[tuple[str, str]]:
    if user.owner:
        return [("company-wide 全公司", COMPANY_WIDE)] + [(d.name, d.id) for d in accounts.list_departments(services.db)]
    return [(d.name, d.id) for d in accounts.list_departments(services.db) if d.id == user.department_id]


def upload(services, user, files: list[tuple[str, bytes]], readers: list[str], progress=None):
    company_wide = COMPANY_WIDE in readers
    departments = [r for r in readers if r != COMPANY_WIDE]
    if not company_wide and not departments:
        raise gr.Error(bilingual("knowledge_no_departments"))
    allowed = {value for _, value in reader_choices(services, user)}
    refused = sorted(set(readers) - allowed)
    if refused:
        raise gr.Error(f"{bilingual('not_allowed')} (you add documents for {user.department_id} only; "
                       f"not for {', '.join(refused)}. 只能为本部门添加文档。)")
    return services.knowledge.add_files(files, departments, company_wide, uploaded_by=user.id, progress=progress,
                                        may_replace=lambda document: manages(user, document))


def build_knowledge_section(services, i18n, tab=None) -> None:
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
        admin = caller(services, request, "admin")
        scope = department_scope(services, admin, "read.documents")
        return gr.CheckboxGroup(choices=reader_choices(services, admin)), for_people(documents_table(services, scope))

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
        return reports_markdown(reports), for_people(documents_table(services, department_scope(
            services, user, "read.documents"))), None

    def delete_document(value, request: gr.Request):
        admin = caller(services, request, "admin")
        document = next((d for d in services.knowledge.documents(department_scope(services, admin, "read.documents"))
                         if value is not None and d.id == value), None)
        if document is None:
            raise gr.Error(f"No document {value} among your department's. 本部门没有这个文档。")
        if not manages(admin, document):
            raise gr.Error(f"{bilingual('not_allowed')} (document {document.id} is read by other departments too;"
                           " the owner manages it. 该文档由其他部门共用，只有公司管理者可以删除。)")
        services.knowledge.delete(document.id)
        return f"🗑 document {document.id} deleted 已删除", for_people(documents_table(services, department_scope(
            services, admin, "read.documents")))

    on_open(tab, reload, listing, None, [readers, documents])
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
        """Documents the caller's department may read (the owner: all of them)."""
        user = caller(services, request)
        table = documents_table(services, department_scope(services, user, "read.documents"))
        return table.astype({"updated_at": str}).to_dict(orient="records")

    gr.api(knowledge_search, api_name="knowledge_search")
    gr.api(knowledge_documents, api_name="knowledge_documents")
