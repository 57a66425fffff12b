"""Running hangjia in a company: monitoring and audit in the Admin tab, API keys for
everyone in the Chat tab. Every handler checks the caller on the server; every look into
the audit is itself an audit event."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from storage import audit, monitoring
from storage.audit import ConversationFilter
from webapp.auth import NotAuthorized
from webapp.i18n import for_people
from webapp.ui.common import caller, department_scope, download_path, on_open

PERIODS = {"7 days 7天": 7, "30 days 30天": 30, "90 days 90天": 90}
DAILY_COLUMNS = ["day", "department_id", "conversations", "user_messages", "active_users", "answers",
                 "latency_p50_ms", "latency_p95_ms", "prompt_tokens", "completion_tokens", "errors", "thumbs_up",
                 "thumbs_down", "cache_lookups", "cache_hits", "cache_hit_rate"]
SEARCH_COLUMNS = ["conversation_id", "created_at", "username", "department_id", "title", "messages", "tool_calls",
                  "thumbs_down"]


def monitoring_figures(services, days: int, department_id: str | None,
                       today: dt.date | None = None) -> dict[str, pd.DataFrame]:
    """Every figure of the monitoring view, for the last `days` days (today included), of one
    department (None: every department)."""
    since = (today or dt.date.today()) - dt.timedelta(days=days - 1)
    db = services.db
    daily = pd.DataFrame(monitoring.daily(db, since, department_id), columns=DAILY_COLUMNS)
    daily = daily.round({"latency_p50_ms": 0, "latency_p95_ms": 0, "cache_hit_rate": 3})
    daily["day"] = pd.to_datetime(daily["day"])
    # the trend: every day of the period for every department, quiet days as 0 messages
    days = pd.date_range(pd.Timestamp(since), periods=days, freq="D")
    departments = sorted(set(daily["department_id"])) or ["—"]
    grid = pd.MultiIndex.from_product([days, departments], names=["day", "department_id"]).to_frame(index=False)
    trend = grid.merge(daily[["day", "department_id", "user_messages", "latency_p95_ms"]], how="left",
                       on=["day", "department_id"])
    trend["user_messages"] = trend["user_messages"].fillna(0)
    versions = pd.DataFrame(monitoring.daily_by_version(db, since, department_id),
                            columns=["day", "department_id", "version", "status", "rated", "thumbs_down",
                                     "thumbs_down_rate"])
    by_version = (versions.groupby(["department_id", "version", "status"], as_index=False)[["rated", "thumbs_down"]]
                  .sum())
    by_version["thumbs_down_rate"] = (by_version["thumbs_down"] / by_version["rated"]).round(3)
    by_version["label"] = by_version["department_id"] + " " + by_version["version"] + " (" + by_version["status"] + ")"
    tools = pd.DataFrame(monitoring.daily_tool_calls(db, since, department_id),
                         columns=["day", "department_id", "tool", "status", "calls"])
    tools_by_status = tools.groupby(["tool", "status"], as_index=False)["calls"].sum()
    backlog = pd.DataFrame(monitoring.review_backlog(db, dt.datetime.now(), department_id),
                           columns=["department_id", "open_cases", "oldest_hours"])
    runs = pd.DataFrame(monitoring.daily_runs(db, since, department_id), columns=["day", "department_id", "status", "runs", "seconds"])
    return {"daily": daily, "trend": trend, "by_version": by_version, "tools": tools_by_status, "backlog": backlog,
            "runs": runs}


def _filter(admin, username, since, until, text, tool, rating) -> ConversationFilter:
    """The admin's search, always within the admin's own department (the owner's: all, and
    audit_search records every search)."""
    def day(value) -> dt.date | None:
        if value in (None, ""):
            return None
        try:
            return value.date() if isinstance(value, dt.datetime) else dt.date.fromisoformat(str(value)[:10])
        except ValueError:
            raise gr.Error(f"{value!r} is not a date; write it as 2026-11-29. 日期格式如 2026-11-29。")
    ratings = {"👎": -1, "👍": 1, "-1": -1, "1": 1}
    return ConversationFilter(username=(username or "").strip() or None,
                              department_id=None if admin.owner else admin.department_id,
                              since=day(since), until=day(until), text=(text or "").strip() or None,
                              tool=(tool or "").strip() or None, rating=ratings.get(str(rating or "").strip()))


def audit_search(services, admin, flt: ConversationFilter) -> pd.DataFrame:
    audit.record(services.db, admin.id, admin.department_id, "audit.search", filter=flt.__dict__)
    return pd.DataFrame(audit.search(services.db, flt), columns=SEARCH_COLUMNS)


def audit_open(services, admin, conversation_id: int) -> dict[str, Any]:
    record = audit.conversation_record(services.db, int(conversation_id))
    if record is None or (record["department_id"] != admin.department_id and not admin.owner):
        raise gr.Error(f"No conversation {conversation_id} in {admin.department_id}. 未找到该会话。")
    audit.record(services.db, admin.id, admin.department_id, "audit.open", conversation_id=int(conversation_id),
                 department=record["department_id"])
    return json.loads(json.dumps(record, default=str))


def audit_export(services, admin, flt: ConversationFilter, fmt: str) -> tuple[Path, int]:
    target = download_path(f"conversations-{admin.department_id}-{dt.datetime.now():%Y%m%d-%H%M%S}.{fmt}")
    rows = audit.export(services.db, flt, target, fmt)
    audit.record(services.db, admin.id, admin.department_id, "audit.export", filter=flt.__dict__, format=fmt,
                 rows=rows)
    return target, rows


def build_monitoring_section(services, i18n, tab=None) -> None:
    with gr.Accordion(i18n("monitoring_title"), open=False, elem_id="monitoring"):
        with gr.Row():
            period = gr.Dropdown(list(PERIODS), value=list(PERIODS)[0], label=i18n("monitoring_period"),
                                 elem_id="monitoring-period")
            reload = gr.Button(i18n("refresh"), elem_id="monitoring-reload")
        with gr.Row():
            messages = gr.LinePlot(x="day", y="user_messages", color="department_id", title="每日提问 questions per day",
                                   x_title="日期 day", y_title="提问 questions", height=240,
                                   elem_id="monitoring-messages")
            # points, not a line: a day without answers has no latency to join
            latency = gr.ScatterPlot(x="day", y="latency_p95_ms", color="department_id",
                                     title="回答延迟 p95 answer latency (ms)", x_title="日期 day", y_title="ms",
                                     height=240, elem_id="monitoring-latency")
        with gr.Row():
            versions = gr.BarPlot(x="label", y="thumbs_down_rate", color="status", y_lim=[0, 1], height=240,
                                  title="各版本👎比例 thumbs-down rate per adapter version (canary vs active)",
                                  x_title="版本 version", y_title="👎 比例 rate", elem_id="monitoring-versions")
            tools = gr.BarPlot(x="tool", y="calls", color="status", title="工具调用结果 tool calls by status",
                               x_title="工具 tool", y_title="次数 calls", height=240, elem_id="monitoring-tools")
        daily = gr.Dataframe(label=i18n("monitoring_daily"), interactive=False, elem_id="monitoring-daily")
        with gr.Row():
            backlog = gr.Dataframe(label=i18n("monitoring_backlog"), interactive=False, elem_id="monitoring-backlog")
            runs = gr.Dataframe(label=i18n("admin_runs"), interactive=False, elem_id="monitoring-runs")

    def show(period_name, request: gr.Request):
        admin = caller(services, request, "admin")
        figures = monitoring_figures(services, PERIODS.get(period_name, 7),
                                     department_scope(services, admin, "read.monitoring"))
        table = figures["daily"].assign(day=figures["daily"]["day"].dt.strftime("%Y-%m-%d"))
        runs = figures["runs"].assign(day=pd.to_datetime(figures["runs"]["day"]).dt.strftime("%Y-%m-%d"))
        return (figures["trend"], figures["trend"].dropna(subset=["latency_p95_ms"]), figures["by_version"],
                figures["tools"], for_people(table), for_people(figures["backlog"]), for_people(runs))

    outputs = [messages, latency, versions, tools, daily, backlog, runs]
    on_open(tab, reload, show, [period], outputs)
    period.change(show, [period], outputs, api_visibility="private")


def build_audit_section(services, i18n, tab=None) -> None:
    with gr.Accordion(i18n("audit_title"), open=False, elem_id="audit"):
        with gr.Row():
            username = gr.Textbox(label=i18n("audit_user"), elem_id="audit-user")
            since = gr.Textbox(label=i18n("audit_since"), placeholder="2026-11-01", elem_id="audit-since")
            until = gr.Textbox(label=i18n("audit_until"), placeholder="2026-11-30", elem_id="audit-until")
        with gr.Row():
            text = gr.Textbox(label=i18n("audit_text"), elem_id="audit-text")
            tool = gr.Textbox(label=i18n("audit_tool"), placeholder="query_sales", elem_id="audit-tool")
            rating = gr.Dropdown(["", "👎", "👍"], value="", label=i18n("audit_rating"), elem_id="audit-rating")
            search = gr.Button(i18n("audit_search"), variant="primary", elem_id="audit-search")
        found = gr.Dataframe(interactive=False, elem_id="audit-results")
        with gr.Row():
            conversation_id = gr.Number(label=i18n("audit_conversation"), precision=0, elem_id="audit-conversation")
            open_button = gr.Button(i18n("audit_open"), elem_id="audit-open")
            fmt = gr.Radio(["csv", "parquet"], value="csv", label=i18n("audit_format"), elem_id="audit-format")
            export = gr.Button(i18n("audit_export"), elem_id="audit-export")
        detail = gr.JSON(label=i18n("audit_record"), elem_id="audit-record")
        exported = gr.File(label=i18n("audit_file"), elem_id="audit-file")
        status = gr.Markdown(elem_id="audit-status")

    filters = [username, since, until, text, tool, rating]

    def do_search(user_name, since_day, until_day, contains, tool_name, rated, request: gr.Request):
        admin = caller(services, request, "admin")
        table = audit_search(services, admin, _filter(admin, user_name, since_day, until_day, contains, tool_name,
                                                      rated))
        return for_people(table), f"{len(table)} 个会话 conversations · {admin.department_id}"

    def do_open(value, request: gr.Request):
        admin = caller(services, request, "admin")
        if value is None:
            raise gr.Error("Enter a conversation id from the results. 请输入会话编号。")
        return audit_open(services, admin, int(value))

    def do_export(user_name, since_day, until_day, contains, tool_name, rated, chosen, request: gr.Request):
        admin = caller(services, request, "admin")
        flt = _filter(admin, user_name, since_day, until_day, contains, tool_name, rated)
        path, rows = audit_export(services, admin, flt, chosen)
        return str(path), f"exported {rows} messages 已导出"

    on_open(tab, search, do_search, filters, [found, status])
    open_button.click(do_open, [conversation_id], [detail], api_visibility="private")
    export.click(do_export, [*filters, fmt], [exported, status], api_visibility="private")


KEY_COLUMNS = ["id", "username", "name", "key_prefix", "created_at", "last_used_at", "revoked_at"]


def keys_table(services, user) -> pd.DataFrame:
    return for_people(pd.DataFrame(services.auth.keys_visible_to(user), columns=KEY_COLUMNS))


def build_api_keys_section(services, i18n) -> None:
    with gr.Accordion(i18n("keys_title"), open=False, elem_id="api-keys") as accordion:
        gr.Markdown(i18n("keys_help"))
        with gr.Row():
            name = gr.Textbox(label=i18n("keys_name"), placeholder="laptop script", elem_id="keys-name")
            create = gr.Button(i18n("keys_create"), variant="primary", elem_id="keys-create")
            key_id = gr.Number(label=i18n("keys_id"), precision=0, elem_id="keys-id")
            revoke = gr.Button(i18n("keys_revoke"), variant="stop", elem_id="keys-revoke")
        shown = gr.Textbox(label=i18n("keys_new"), interactive=False, buttons=["copy"], elem_id="keys-new")
        table = gr.Dataframe(interactive=False, elem_id="keys-table")

    def do_create(value, request: gr.Request):
        user = caller(services, request)
        _, key = services.auth.create_api_key(user, value)
        return key, keys_table(services, user)

    def do_revoke(value, request: gr.Request):
        user = caller(services, request)
        if value is None:
            raise gr.Error("Enter the id of the key to revoke. 请输入要吊销的密钥编号。")
        try:
            services.auth.revoke_api_key(user, int(value))
        except NotAuthorized as exc:
            raise gr.Error(str(exc))
        return "", keys_table(services, user)

    def do_list(request: gr.Request):
        return keys_table(services, caller(services, request))

    create.click(do_create, [name], [shown, table], api_visibility="private")
    revoke.click(do_revoke, [key_id], [shown, table], api_visibility="private")
    accordion.expand(do_list, None, [table], api_visibility="private")


def register_operations_api(services) -> None:
    def monitoring_api(days: int = 7, request: gr.Request = None) -> dict[str, Any]:
        """The caller's department (the owner: each department): daily figures, thumbs-down per
        adapter version, tool calls, review backlog, runs."""
        admin = caller(services, request, "admin")
        figures = monitoring_figures(services, max(1, min(int(days), 366)),
                                     department_scope(services, admin, "read.monitoring"))
        return {name: json.loads(frame.to_json(orient="records", date_format="iso"))
                for name, frame in figures.items()}

    def audit_search_api(username: str = "", since: str = "", until: str = "", text: str = "", tool: str = "",
                         rating: str = "", request: gr.Request = None) -> list[dict[str, Any]]:
        """Conversations of the admin's department matching every given filter (logged)."""
        admin = caller(services, request, "admin")
        table = audit_search(services, admin, _filter(admin, username, since, until, text, tool, rating))
        return json.loads(table.to_json(orient="records", date_format="iso"))

    def audit_conversation_api(conversation_id: int, request: gr.Request = None) -> dict[str, Any]:
        """One conversation with every message, tool attempt and retrieved passage (logged)."""
        return audit_open(services, caller(services, request, "admin"), int(conversation_id))

    gr.api(monitoring_api, api_name="monitoring")
    gr.api(audit_search_api, api_name="audit_search")
    gr.api(audit_conversation_api, api_name="audit_conversation")
