"""The response cache in the Admin tab: hit rate, entries and savings per department;
turn it or its semantic layer off, change the threshold, clear it. An admin sees and clears
their own department's cache; its settings are the company's, changed by the owner."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from storage import accounts
from webapp.i18n import bilingual, for_people
from webapp.ui.common import caller, department_scope, in_department, on_open

STATS_COLUMNS = ["department_id", "entries", "lookups", "exact_hits", "semantic_hits", "guarded", "hit_rate",
                 "saved_s", "saved_tokens", "avg_lookup_ms"]


def stats_table(services, department_id: str | None) -> pd.DataFrame:
    """One department's figures (None: every department's); a department nobody has asked yet
    is a row of zeros, not a missing row."""
    if services.cache is None:
        return pd.DataFrame(columns=STATS_COLUMNS)
    rows = {r["department_id"]: r for r in services.cache.stats() if department_id in (None, r["department_id"])}
    departments = [department_id] if department_id else [d.id for d in accounts.list_departments(services.db)]
    for department in departments:
        rows.setdefault(department, {"department_id": department, "entries": 0, "lookups": 0, "exact_hits": 0,
                                     "semantic_hits": 0, "guarded": 0, "saved_s": 0.0, "saved_tokens": 0})
    return pd.DataFrame(sorted(rows.values(), key=lambda r: r["department_id"]), columns=STATS_COLUMNS)


def clear_scoped(services, admin, department_id: str) -> int:
    """Clear one department's entries (empty: the admin's own; the owner's empty: all)."""
    department_id = (department_id or "").strip()
    if not department_id and admin.owner:
        department_scope(services, admin, "cache.clear")
        return services.cache.clear(None)
    department_id = in_department(services, admin, department_id or admin.department_id, "cache.clear")
    return services.cache.clear(department_id)


def build_cache_section(services, i18n, tab=None) -> None:
    with gr.Accordion(i18n("cache_title"), open=False, elem_id="cache"):
        if services.cache is None:
            gr.Markdown("The response cache is off (`--no-cache`). 回答缓存已关闭。")
            return
        with gr.Row():
            enabled = gr.Checkbox(label=i18n("cache_enabled"), elem_id="cache-enabled")
            semantic = gr.Checkbox(label=i18n("cache_semantic"), elem_id="cache-semantic")
            threshold = gr.Slider(0.5, 1.0, step=0.01, label=i18n("cache_threshold"), elem_id="cache-threshold")
            save = gr.Button(i18n("cache_save"), elem_id="cache-save")
        with gr.Row():
            department = gr.Textbox(label="部门（留空：本部门）department (empty: your own)", elem_id="cache-department")
            clear = gr.Button(i18n("cache_clear"), variant="stop", elem_id="cache-clear")
            reload = gr.Button(i18n("refresh"), elem_id="cache-reload")
        result = gr.Markdown(elem_id="cache-result")
        table = gr.Dataframe(interactive=False, elem_id="cache-stats")
        plot = gr.BarPlot(x="department_id", y="hit_rate", title="各部门命中率 hit rate per department", y_lim=[0, 1],
                          x_title="部门 department", y_title="命中率 hit rate", height=220, elem_id="cache-plot")

    def current(request: gr.Request):
        admin = caller(services, request, "admin")
        config = services.cache.settings()
        stats = stats_table(services, department_scope(services, admin, "read.cache"))
        return config["enabled"], config["semantic"], config["threshold"], for_people(stats), stats

    def save_settings(on, paraphrases, value, request: gr.Request):
        admin = caller(services, request, "admin")
        if not admin.owner:
            raise gr.Error(f"{bilingual('not_allowed')} (the cache's settings are the company's; the owner"
                           " changes them. 缓存设置属于全公司，由公司管理者修改。)")
        try:
            services.cache.configure(bool(on), bool(paraphrases), float(value))
        except ValueError as exc:
            raise gr.Error(str(exc))
        return f"saved: cache {'on' if on else 'off'}, semantic {'on' if paraphrases else 'off'}, threshold {value:.2f}"

    def clear_cache(department_id, request: gr.Request):
        admin = caller(services, request, "admin")
        count = clear_scoped(services, admin, department_id)
        stats = stats_table(services, department_scope(services, admin, "read.cache"))
        return f"🗑 已清除 {count} 条 entries evicted", for_people(stats), stats

    on_open(tab, reload, current, None, [enabled, semantic, threshold, table, plot])
    save.click(save_settings, [enabled, semantic, threshold], [result], api_visibility="private")
    clear.click(clear_cache, [department], [result, table, plot], api_visibility="private")


def register_cache_api(services) -> None:
    def cache_stats(request: gr.Request = None) -> dict[str, Any]:
        """The caller's department (the owner: each department): entries, lookups, exact and
        semantic hits, hit rate, time saved."""
        admin = caller(services, request, "admin")
        if services.cache is None:
            return {"enabled": False, "departments": []}
        scope = department_scope(services, admin, "read.cache")
        return {**services.cache.settings(), "departments": stats_table(services, scope).to_dict(orient="records")}

    def cache_clear(department: str = "", request: gr.Request = None) -> int:
        """Clear the caller's department's entries (the owner: the one named, or all)."""
        admin = caller(services, request, "admin")
        return clear_scoped(services, admin, str(department or "")) if services.cache is not None else 0

    gr.api(cache_stats, api_name="cache_stats")
    gr.api(cache_clear, api_name="cache_clear")
