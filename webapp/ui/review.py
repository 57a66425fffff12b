"""The Review tab: the queue of rated answers, one case with its context, the correction
form (answer and/or tool call), approve / reject / skip, and sample export / import."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import gradio as gr

from finetune.dataset import ImportRefused
from finetune.samples import REASONS
from storage.reviews import AlreadyReviewed
from webapp.review import (
    REVIEW_ROLES,
    CaseNotFound,
    ReviewInputError,
    tool_argument_skeleton,
)
from webapp.ui.chat import render_items
from webapp.ui.common import caller, download_path, on_open

NO_TOOL = "(none)"
QUEUE_HEADERS = ["# 编号", "部门 department", "评价 rated", "问题 question", "评论 comment", "版本 adapter"]
# A reviewer works the queue from the keyboard: each case opens with the cursor in the
# correction box; Alt+1..8 picks a reason (a click on the radio, in the page: no round trip
# that a quick Alt+A could overtake); Alt+A approve, Alt+R reject, Alt+S skip.
# e.code, not e.key: on a Mac, Alt with a letter types another character.
REVIEW_SHORTCUTS_JS = """
<script>
document.addEventListener('keydown', (e) => {
  if (!e.altKey || e.ctrlKey || e.metaKey) return;
  const digit = /^Digit([1-9])$/.exec(e.code);
  if (digit) {
    const choice = document.querySelectorAll('#review-reason input[type=radio]')[Number(digit[1]) - 1];
    if (choice) { e.preventDefault(); choice.click(); }
    return;
  }
  const target = {KeyA: 'review-approve', KeyR: 'review-reject', KeyS: 'review-skip'}[e.code];
  const button = target && document.getElementById(target);
  if (button) { e.preventDefault(); button.click(); }
});
</script>
"""
FOCUS_CORRECTION_JS = "() => { document.querySelector('#review-answer textarea')?.focus(); }"


@contextlib.contextmanager
def review_errors():
    """Review failures as messages for the reviewer."""
    try:
        yield
    except (ReviewInputError, CaseNotFound, AlreadyReviewed) as exc:
        raise gr.Error(str(exc))
    except ImportRefused as exc:
        raise gr.Error(str(exc).replace("\n", "<br>"))


def queue_rows(cases: list[dict[str, Any]]) -> list[list[Any]]:
    return [[c["message_id"], c["department_id"], f"{c['rated_at']:%Y-%m-%d %H:%M}",
             (c["question"] or "")[:80], (c["comment"] or "")[:60],
             f"{c['adapter'] or 'base'}@{c['adapter_version'] or '-'}"] for c in cases]


def case_markdown(case: dict[str, Any]) -> str:
    rating = "👎" if case["rating"] == -1 else "👍" if case["rating"] == 1 else "—"
    lines = [
        f"**Case {case['message_id']}** · {case['department_id']} · {case['username']} · {rating}",
        f"🤖 {case['model']} + {case['adapter'] or 'base'}@{case['adapter_version'] or '-'} · {case['answered_at'][:16]}",
    ]
    if case["comment"]:
        lines.append(f"💬 {case['comment']}")
    if case["turn_tools"]:
        lines.append("🔧 " + "; ".join(f"{t['tool']} {json.dumps(t['arguments'], ensure_ascii=False)} → {t['status']}"
                                       for t in case["turn_tools"]))
    for d in case["decisions"]:
        lines.append(f"🗂 {d['created_at'][:16]} {d['reviewer']}: {d['decision']} {d['reason'] or ''}")
    return "  \n".join(lines)


def build_review_tab(services, i18n, tab=None) -> None:
    case_id = gr.State(None)
    with gr.Row():
        rating = gr.Radio([("👎", -1), ("👍", 1)], value=-1, label=i18n("review_rating"), scale=1)
        department = gr.Dropdown(choices=[], value=None, label=i18n("review_department"), scale=1,
                                 allow_custom_value=False)
        version = gr.Textbox(label=i18n("review_version"), placeholder="v3 / base", scale=1)
        since = gr.Textbox(label=i18n("review_since"), placeholder="2026-11-01", scale=1)
        until = gr.Textbox(label=i18n("review_until"), placeholder="2026-11-30", scale=1)
        with_comment = gr.Checkbox(label=i18n("review_with_comment"), scale=1)
        refresh = gr.Button(i18n("refresh"), elem_id="review-refresh", scale=1)
    summary = gr.Markdown(elem_id="review-summary")
    queue = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, elem_id="review-queue", max_height=240)
    with gr.Row():
        with gr.Column(scale=3):
            case_info = gr.Markdown(elem_id="review-case-info")
            case_chat = gr.Chatbot(label="case", height=380, elem_id="review-case")
        with gr.Column(scale=2):
            answer = gr.Textbox(label=i18n("review_answer"), lines=5, elem_id="review-answer")
            tool = gr.Dropdown(choices=[NO_TOOL], value=NO_TOOL, label=i18n("review_tool"), elem_id="review-tool")
            arguments = gr.Code(value="{}", language="json", label=i18n("review_arguments"), elem_id="review-arguments")
            reason = gr.Radio(choices=[(f"{number} · {label}", key) for number, (key, label)
                                       in enumerate(REASONS.items(), start=1)],
                              value=None, label=i18n("review_reason"), elem_id="review-reason")
            note = gr.Textbox(label=i18n("review_note"), elem_id="review-note")
            with gr.Row():
                approve = gr.Button(i18n("review_approve"), variant="primary", elem_id="review-approve")
                reject = gr.Button(i18n("review_reject"), variant="stop", elem_id="review-reject")
                skip = gr.Button(i18n("review_skip"), elem_id="review-skip")
            result = gr.Markdown(elem_id="review-result")
    with gr.Accordion(i18n("samples_title"), open=False):
        with gr.Row():
            export_button = gr.Button(i18n("samples_export"), elem_id="samples-export")
            export_file = gr.File(label="JSONL", interactive=False)
        with gr.Row():
            import_file = gr.File(label=i18n("samples_import_file"), file_types=[".jsonl", ".json"], type="filepath")
            import_button = gr.Button(i18n("samples_import"), elem_id="samples-import")
        import_result = gr.Markdown()

    filters = [rating, department, version, since, until, with_comment]

    def open_case(message_id, request: gr.Request):
        reviewer = caller(services, request, *REVIEW_ROLES)
        if message_id is None:
            return None, "", [], gr.Dropdown(choices=[NO_TOOL], value=NO_TOOL), "", gr.skip(), None, "", ""
        with review_errors():
            case = services.reviews.case(reviewer, int(message_id))
        shown, _ = render_items(case["items"])
        tools = [NO_TOOL] + [t["function"]["name"] for t in case["tools"]]
        return (case["message_id"], case_markdown(case), shown, gr.Dropdown(choices=tools, value=NO_TOOL),
                "", "{}", None, "", "")

    def load_queue(rating_value, department_value, version_value, since_value, until_value, comment_only,
                   open_id=None, request: gr.Request = None):
        reviewer = caller(services, request, *REVIEW_ROLES)
        with review_errors():
            cases = services.reviews.queue(reviewer, int(rating_value or -1), department_value or None,
                                           version_value, since_value, until_value, bool(comment_only))
        allowed = services.reviews.departments_of(reviewer)
        scope = "all departments 全部部门" if allowed is None else ", ".join(allowed)
        text = f"**{len(cases)}** cases waiting · 待审核 — {scope}"
        first = cases[0]["message_id"] if cases else None
        listing = (text, queue_rows(cases),
                   gr.Dropdown(choices=[("", None)] + [(d, d) for d in (allowed or _all_departments(services))]))
        if open_id is not None and any(c["message_id"] == open_id for c in cases):
            # back on the tab with a case open: the reviewer's unsaved correction stays
            return (*listing, *[gr.skip()] * len(case_outputs))
        return (*listing, *open_case(first, request))

    def select_case(table, evt: gr.SelectData, request: gr.Request):
        caller(services, request, *REVIEW_ROLES)  # before reading anything the caller sent
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        message_id = table.iloc[row, 0] if hasattr(table, "iloc") else table[row][0]
        return open_case(int(message_id), request)

    def on_tool(message_id, tool_name, request: gr.Request):
        reviewer = caller(services, request, *REVIEW_ROLES)
        if not tool_name or tool_name == NO_TOOL or message_id is None:
            return "{}"
        with review_errors():
            case = services.reviews.case(reviewer, int(message_id))
        schema = next((t["function"]["parameters"] for t in case["tools"] if t["function"]["name"] == tool_name), {})
        return tool_argument_skeleton(schema)

    def decide(decision):
        def handler(message_id, answer_text, tool_name, arguments_json, reason_key, note_text, rating_value,
                    department_value, version_value, since_value, until_value, comment_only, request: gr.Request):
            filter_values = (rating_value, department_value, version_value, since_value, until_value, comment_only)
            reviewer = caller(services, request, *REVIEW_ROLES)
            if message_id is None:
                raise gr.Error("No case is open. 没有打开的案例。")
            with review_errors():
                outcome = services.reviews.decide(
                    reviewer, int(message_id), decision, reason_key if decision != "skipped" else None,
                    answer_text if decision == "approved" else None,
                    tool_name if decision == "approved" and tool_name != NO_TOOL else None,
                    arguments_json, note_text)
            done = {"approved": "✅ approved 已通过", "rejected": "🚫 rejected 已驳回", "skipped": "⏭ skipped 已跳过"}
            message = f"{done[decision]} · case {message_id}"
            if outcome["sample_id"]:
                message += f" → sample {outcome['sample_id']} ({outcome['split']})"
                if outcome["near_duplicate_of"]:
                    message += f", near-duplicate of sample {outcome['near_duplicate_of']}"
            # the next case opens at once
            refreshed = load_queue(*filter_values, request=request)
            return (*refreshed[:-1], message)
        return handler

    def export_samples(department_value, request: gr.Request):
        user = caller(services, request, *REVIEW_ROLES)
        with review_errors():
            text = services.reviews.export(user, department_value or None)
        path = download_path("hangjia-samples.jsonl")
        path.write_text(text, encoding="utf-8")
        return str(path)

    def import_samples(path, department_value, request: gr.Request):
        user = caller(services, request, *REVIEW_ROLES)
        if not path:
            raise gr.Error("Choose a JSONL file first. 请先选择 JSONL 文件。")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise gr.Error("The file is not UTF-8 text. 文件不是 UTF-8 文本。")
        with review_errors():
            outcome = services.reviews.import_samples(user, text, department_value or None)
        return (f"Imported **{outcome.imported}** samples {outcome.by_split}; "
                f"{outcome.near_duplicates} near-duplicates of earlier ones. 导入完成。")

    # in the order open_case returns them
    case_outputs = [case_id, case_info, case_chat, tool, answer, arguments, reason, note, result]
    queue_outputs = [summary, queue, department, *case_outputs]
    on_open(tab, refresh, load_queue, [*filters, case_id], queue_outputs).then(None, js=FOCUS_CORRECTION_JS)
    queue.select(select_case, [queue], case_outputs, api_visibility="private").then(None, js=FOCUS_CORRECTION_JS)
    tool.input(on_tool, [case_id, tool], [arguments], api_visibility="private")
    for button, decision in ((approve, "approved"), (reject, "rejected"), (skip, "skipped")):
        # the next case opens once this decision is saved, the cursor in its correction box
        button.click(decide(decision), [case_id, answer, tool, arguments, reason, note, *filters],
                     [*queue_outputs[:-1], result], api_visibility="private").then(None, js=FOCUS_CORRECTION_JS)
    export_button.click(export_samples, [department], [export_file], api_visibility="private")
    import_button.click(import_samples, [import_file, department], [import_result], api_visibility="private")


def _all_departments(services) -> list[str]:
    from storage import accounts

    return [d.id for d in accounts.list_departments(services.db)]


def register_review_api(services) -> None:
    """The same workbench for programs: queue, case, decide, export, import."""

    def review_queue(rating: int = -1, department: str = "", adapter_version: str = "", since: str = "",
                     until: str = "", with_comment_only: bool = False, request: gr.Request = None) -> list[dict]:
        reviewer = caller(services, request, *REVIEW_ROLES)
        with review_errors():
            cases = services.reviews.queue(reviewer, int(rating), department or None, adapter_version, since,
                                           until, bool(with_comment_only))
        return [{**c, "rated_at": c["rated_at"].isoformat()} for c in cases]

    def review_case(message_id: int, request: gr.Request = None) -> dict:
        reviewer = caller(services, request, *REVIEW_ROLES)
        with review_errors():
            return services.reviews.case(reviewer, int(message_id))

    def review_decide(message_id: int, decision: str, reason: str = "", answer: str = "", tool_name: str = "",
                      tool_arguments: str = "{}", note: str = "", request: gr.Request = None) -> dict:
        reviewer = caller(services, request, *REVIEW_ROLES)
        with review_errors():
            return services.reviews.decide(reviewer, int(message_id), decision, reason or None, answer or None,
                                           tool_name or None, tool_arguments, note or None)

    def samples_export(department: str = "", split: str = "", request: gr.Request = None) -> str:
        user = caller(services, request, *REVIEW_ROLES)
        with review_errors():
            return services.reviews.export(user, department or None, split or None)

    def samples_import(jsonl: str, department: str = "", request: gr.Request = None) -> dict:
        user = caller(services, request, *REVIEW_ROLES)
        with review_errors():
            outcome = services.reviews.import_samples(user, jsonl, department or None)
        return {"imported": outcome.imported, "near_duplicates": outcome.near_duplicates, "by_split": outcome.by_split}

    for fn in (review_queue, review_case, review_decide, samples_export, samples_import):
        gr.api(fn, api_name=fn.__name__)
