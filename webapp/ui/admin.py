"""The Admin tab: usage, the nightly scheduler, "Retrain now" with live progress and loss,
the gate's comparison table, adapter versions with promote / roll back / canary, and
thumbs-down rates per version side by side."""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import gradio as gr
import pandas as pd

from finetune.refresh import RefreshBusy
from storage import adapters as registry
from storage import chats
from webapp.adapters import AdapterError
from webapp.i18n import minute, percent, reason_text, term
from webapp.ui.common import (
    caller,
    department_choices,
    department_scope,
    in_department,
    on_open,
    user_error,
)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} 分 {rest} 秒 ({minutes} min {rest} s)" if minutes else f"{rest} 秒 ({rest} s)"


def admin_overview(services, request: gr.Request) -> dict:
    admin = caller(services, request, "admin")
    return chats.usage_summary(services.db, department_scope(services, admin, "read.overview"))


def usage_markdown(usage: dict[str, int]) -> str:
    return (f"👥 用户 users **{usage['users']}** · 💬 对话 conversations **{usage['conversations']}** · "
            f"消息 messages **{usage['messages']}** · 👍 **{usage['thumbs_up']}** · 👎 **{usage['thumbs_down']}**")


# The tables below show one department (an admin's own) or, for the owner, all (None). Column
# names and values are in both languages: the server does not know the browser's choice.

def runs_table(services, department_id: str | None) -> pd.DataFrame:
    rows = registry.runs(services.db, department_id)
    return pd.DataFrame([{
        "# 编号": r["id"], "部门 Department": r["department_id"], "触发 Trigger": term(r["trigger"]),
        "状态 Status": term(r["status"]), "原因 Reason": reason_text(r["reason"]),
        "样本 Samples": r["samples"], "新样本 New": r["new_samples"], "步数 Steps": r["steps"],
        "最终损失 Final loss": "" if r["final_loss"] is None else f"{r['final_loss']:.4f}",
        "版本 Version": r["version"] or "", "开始 Started": minute(r["started_at"]),
        "用时 Took": _duration((r["finished_at"] - r["started_at"]).total_seconds() if r["finished_at"] else None),
    } for r in rows], columns=RUN_COLUMNS)


RUN_COLUMNS = ["# 编号", "部门 Department", "触发 Trigger", "状态 Status", "原因 Reason", "样本 Samples",
               "新样本 New", "步数 Steps", "最终损失 Final loss", "版本 Version", "开始 Started", "用时 Took"]
VERSION_COLUMNS = ["部门 Department", "版本 Version", "状态 Status", "灰度 Canary", f"{term('tool_exact')}",
                   f"{term('keyword_recall')}", "评测门 Gate", "创建 Created", "上线 Promoted"]


def versions_table(services, department_id: str | None) -> pd.DataFrame:
    out = []
    for v in registry.versions(services.db, department_id):
        metrics = json.loads(v["metrics"]) if v["metrics"] else {}
        gate = json.loads(v["gate"]) if v["gate"] else {}
        candidate = metrics.get("candidate", {})
        verdict = ("✅ 通过 passed" if gate.get("passed") else "❌ 未通过 refused: " + reason_text(
            "; ".join(gate.get("reasons", [])))) if gate else ""
        out.append([v["department_id"], v["version"], term(v["status"]),
                    percent(v["canary_share"]) if v["canary_share"] else "",
                    percent(candidate.get("tool_exact")), percent(candidate.get("keyword_recall")), verdict,
                    minute(v["created_at"]), minute(v["promoted_at"])])
    return pd.DataFrame(out, columns=VERSION_COLUMNS)


GATE_COLUMNS = ["指标 Metric", "在用 Active", "候选 Candidate", "变化 Change"]


def gate_table(services, department_id: str | None) -> pd.DataFrame:
    """The latest gate decision's comparison: each metric, active against candidate."""
    versions = sorted((v for v in registry.versions(services.db, department_id) if v["gate"]),
                      key=lambda v: v["created_at"])
    if not versions:
        return pd.DataFrame(columns=GATE_COLUMNS)
    rows = json.loads(versions[-1]["gate"])["table"]
    return pd.DataFrame([[term(r["metric"]), percent(r["active"]), percent(r["candidate"]),
                          f"{r['change'] * 100:+.1f} pp"] for r in rows], columns=GATE_COLUMNS)


def feedback_table(services, department_id: str | None) -> pd.DataFrame:
    rows = registry.thumbs_down_by_version(services.db, department_id)
    return pd.DataFrame([[r["department_id"], term(r["version"]) if r["version"] == "base" else r["version"],
                          r["rated"], r["thumbs_down"], percent(r["thumbs_down_rate"])] for r in rows],
                        columns=["部门 Department", "版本 Version", "已评价 Rated", "👎", "👎 比例 rate"])


def scheduler_state(services, department_id: str | None) -> dict[str, Any]:
    """The nightly scheduler's state, naming only the departments in view."""
    state = services.nightly.state()
    return {**state, "refreshing_now": [d for d in state["refreshing_now"] if department_id in (None, d)]}


def scheduler_markdown(services, department_id: str | None) -> str:
    state = scheduler_state(services, department_id)
    return (f"🕑 Nightly refresh 夜间训练: `{services.settings.refresh_cron}` · "
            f"{'on' if state['running'] else 'off'} · next {state['next_run'] or '—'} · last {state['last_run'] or '—'}"
            + (f" · refreshing now: {', '.join(state['refreshing_now'])}" if state["refreshing_now"] else ""))


def build_admin_tab(services, i18n, tab=None) -> None:
    with gr.Row():
        summary = gr.Markdown(elem_id="admin-summary")
        scheduler = gr.Markdown(elem_id="admin-scheduler")
    refresh = gr.Button(i18n("refresh"), elem_id="admin-refresh")
    with gr.Row():
        department = gr.Dropdown(choices=[], label=i18n("review_department"), elem_id="admin-department")
        force = gr.Checkbox(label=i18n("admin_force"), value=True)
        retrain = gr.Button(i18n("admin_retrain"), variant="primary", elem_id="admin-retrain")
        cancel = gr.Button(i18n("admin_cancel"), variant="stop", elem_id="admin-cancel")
    progress_text = gr.Markdown(elem_id="admin-progress")
    loss_plot = gr.LinePlot(x="step", y="loss", title="训练损失 training loss", height=220, elem_id="admin-loss")
    gate = gr.Dataframe(label=i18n("admin_gate"), interactive=False, elem_id="admin-gate")
    versions = gr.Dataframe(label=i18n("admin_versions"), interactive=False, elem_id="admin-versions")
    with gr.Row():
        version = gr.Textbox(label=i18n("admin_version"), placeholder="v2", elem_id="admin-version")
        promote = gr.Button(i18n("admin_promote"), elem_id="admin-promote")
        canary_share = gr.Slider(0, 0.5, value=0.1, step=0.05, label=i18n("admin_canary_share"))
        canary = gr.Button(i18n("admin_canary"), elem_id="admin-canary")
    admin_result = gr.Markdown(elem_id="admin-result")
    feedback = gr.Dataframe(label=i18n("admin_feedback"), interactive=False, elem_id="admin-feedback")
    runs = gr.Dataframe(label=i18n("admin_runs"), interactive=False, elem_id="admin-runs")

    def everything(chosen, request: gr.Request):
        admin = caller(services, request, "admin")
        scope = department_scope(services, admin, "read.adapters")
        departments = department_choices(services, admin)
        # the department the admin chose stays chosen: a Promote must act where they looked
        keep = chosen if chosen in departments else (departments[0] if departments else None)
        return (usage_markdown(chats.usage_summary(services.db, scope)), scheduler_markdown(services, scope),
                gr.Dropdown(choices=departments, value=keep),
                gate_table(services, scope), versions_table(services, scope), feedback_table(services, scope),
                runs_table(services, scope))

    def retrain_now(department_id, force_value, request: gr.Request, progress=gr.Progress()):
        admin = caller(services, request, "admin")
        in_department(services, admin, department_id, "adapters.retrain")
        scope = department_scope(services, admin, "read.adapters")
        events: queue.Queue = queue.Queue()

        def work():
            try:
                outcome = services.refresh.refresh(department_id, "manual", bool(force_value), on_progress=events.put)
                events.put({"event": "__end__", "outcome": outcome})
            except Exception as exc:  # reported in the UI below
                events.put({"event": "__error__", "error": exc})

        # the refresh runs on its own thread: closing the browser does not stop it
        threading.Thread(target=work, name=f"refresh-{department_id}", daemon=True).start()
        losses: list[dict] = []
        while True:
            event = events.get()
            kind = event["event"]
            if kind == "__error__":
                error = event["error"]
                if isinstance(error, RefreshBusy):
                    raise gr.Error(str(error))
                raise user_error("retrain_now", error)
            if kind == "__end__":
                outcome = event["outcome"]
                text = f"**{term(outcome.status)}**" + (f" · {reason_text(outcome.reason)}" if outcome.reason else "")
                if outcome.version:
                    verdict = "✅ 通过 passed" if outcome.gate["passed"] else "❌ 未通过 refused: " + reason_text(
                        "; ".join(outcome.gate["reasons"]))
                    text += f" · 候选 candidate {outcome.version} · 评测门 gate {verdict}"
                    text += " · 已上线 promoted" if outcome.promoted else ""
                yield (text, gr.skip(), gate_table(services, department_id), versions_table(services, scope),
                       runs_table(services, scope), scheduler_markdown(services, scope))
                return
            if kind == "augmented":
                yield (f"{event['samples']} 条审核样本 reviewed samples + {event['variants']} 条换槽变体 slot-swap variants",
                       gr.skip(), *[gr.skip()] * 4)
            elif kind == "mode":
                yield f"{event['mode']} · {event['samples']} samples", gr.skip(), *[gr.skip()] * 4
            elif kind == "step":
                progress((event["step"], event["total_steps"]), desc="training")
                losses.append({"step": event["step"], "loss": event["loss"]})
                text = (f"步 step {event['step']}/{event['total_steps']} · 损失 loss {event['loss']:.4f} · "
                        f"lr {event['lr']:.2e} · 剩余 ETA {event['eta_s']:.0f} s")
                yield text, pd.DataFrame(losses), *[gr.skip()] * 4
            elif kind == "replay_answers":
                progress((event["prompt"], event["prompts"]), desc="replay: the model's own answers")
                yield f"回放答案 replay answers {event['prompt']}/{event['prompts']}", gr.skip(), *[gr.skip()] * 4
            elif kind == "eval_progress":
                progress((event["case"], event["cases"]), desc="evaluating")
                yield f"评测 evaluating {event['case']}/{event['cases']}", gr.skip(), *[gr.skip()] * 4

    def cancel_refresh(department_id, request: gr.Request):
        in_department(services, caller(services, request, "admin"), department_id, "adapters.cancel")
        return "正在取消 cancelling…" if services.refresh.cancel(department_id or "") else "没有进行中的训练 nothing is running"

    def promote_version(department_id, version_value, request: gr.Request):
        admin = caller(services, request, "admin")
        in_department(services, admin, department_id, "adapters.promote")
        try:
            services.adapters.activate(department_id, (version_value or "").strip())
        except AdapterError as exc:
            raise gr.Error(str(exc))
        return (f"{department_id} {version_value}: 已切换 is active now",
                versions_table(services, department_scope(services, admin, "read.adapters")))

    def set_canary(department_id, version_value, share, request: gr.Request):
        admin = caller(services, request, "admin")
        in_department(services, admin, department_id, "adapters.canary")
        try:
            services.adapters.set_canary(department_id, (version_value or "").strip() or None, float(share))
        except AdapterError as exc:
            raise gr.Error(str(exc))
        return (f"canary {department_id} {version_value}: {share:.0%}",
                versions_table(services, department_scope(services, admin, "read.adapters")))

    on_open(tab, refresh, everything, [department], [summary, scheduler, department, gate, versions, feedback, runs])
    retrain.click(retrain_now, [department, force],
                  [progress_text, loss_plot, gate, versions, runs, scheduler], api_visibility="private")
    cancel.click(cancel_refresh, [department], [progress_text], api_visibility="private")
    promote.click(promote_version, [department, version], [admin_result, versions], api_visibility="private")
    canary.click(set_canary, [department, version, canary_share], [admin_result, versions], api_visibility="private")


def _record(row: dict[str, Any]) -> dict[str, Any]:
    """A registry row for the API: machine-readable names and values (the tables above are
    for people), times in ISO 8601, the stored metrics and gate decision as objects."""
    out = {}
    for key, value in row.items():
        if key in ("path", "log_path"):  # where the server keeps files is not the caller's business
            continue
        if hasattr(value, "isoformat"):
            value = value.isoformat()
        elif key in ("metrics", "gate", "losses") and isinstance(value, str):
            value = json.loads(value)
        out[key] = value
    return out


def register_admin_api(services) -> None:
    def admin_overview_api(request: gr.Request = None) -> dict:
        return admin_overview(services, request)

    def adapters_api(request: gr.Request = None) -> dict[str, Any]:
        """The adapter versions and refresh runs of the caller's department (the owner: all)."""
        scope = department_scope(services, caller(services, request, "admin"), "read.adapters")
        return {"versions": [_record(v) for v in registry.versions(services.db, scope)],
                "runs": [_record(r) for r in registry.runs(services.db, scope)],
                "scheduler": scheduler_state(services, scope)}

    def promote_api(department: str, version: str, request: gr.Request = None) -> str:
        in_department(services, caller(services, request, "admin"), department, "adapters.promote")
        try:
            services.adapters.activate(department, version)
        except AdapterError as exc:
            raise gr.Error(str(exc))
        return f"{department} {version} active"

    def retrain_api(department: str, force: bool = True, request: gr.Request = None) -> dict[str, Any]:
        """Retrain one department's adapter now, as the Admin tab's button does; returns when
        the run has ended (trained, evaluated, gated, promoted or not)."""
        admin = caller(services, request, "admin")
        in_department(services, admin, department, "adapters.retrain")  # refuses another department
        if department not in department_choices(services, admin):
            raise gr.Error(f"There is no department {department!r}.")
        try:
            outcome = services.refresh.refresh(department, "manual", bool(force))
        except RefreshBusy as exc:
            raise gr.Error(str(exc))
        return {"run_id": outcome.run_id, "status": outcome.status, "reason": outcome.reason,
                "version": outcome.version, "promoted": outcome.promoted,
                "gate_passed": bool(outcome.gate and outcome.gate.get("passed"))}

    gr.api(admin_overview_api, api_name="admin_overview")
    gr.api(retrain_api, api_name="retrain")
    gr.api(adapters_api, api_name="adapters")
    gr.api(promote_api, api_name="promote")
