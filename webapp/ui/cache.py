"""The response cache in the Admin tab: hit rate, entries and savings per department;
turn it or its semantic layer off, change the threshold, clear it. Admins only."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from webapp.ui.common import caller

STATS_COLUMNS = ["department_id", "entries", "lookups", "exact_hits", "semantic_hits", "guarded", "hit_rate",
                 "saved_s", "saved_tokens", "avg_lookup_ms"]


def stats_table(services) -> pd.DataFrame:
    if services.cache is None:
        return pd.DataFrame(columns=STATS_COLUMNS)
    return pd.DataFrame(services.cache.stats(), columns=STATS_COLUMNS)


def build_cache_section(services, i18n) -> None:
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
            department = gr.Textbox(label="department (empty: all)", elem_id="cache-department")
            clear = gr.Button(i18n("cache_clear"), variant="stop", elem_id="cache-clear")
            reload = gr.Button(i18n("refresh"), elem_id="cache-reload")
        result = gr.Markdown(elem_id="cache-result")
        table = gr.Dataframe(interactive=False, elem_id="cache-stats")
        plot = gr.BarPlot(x="department_id", y="hit_rate", title="hit rate per department", y_lim=[0, 1],
                          height=220, elem_id="cache-plot")

    def current(request: gr.Request):
        caller(services, request, "admin")
        config = services.cache.settings()
        stats = stats_table(services)
        return config["enabled"], config["semantic"], config["threshold"], stats, stats

    def save_settings(on, paraphrases, value, request: gr.Request):
        caller(services, request, "admin")
        try:
            services.cache.configure(bool(on), bool(paraphrases), float(value))
        except ValueError as exc:
            raise gr.Error(str(exc))
        return f"saved: cache {'on' if on else 'off'}, semantic {'on' if paraphrases else 'off'}, threshold {value:.2f}"

    def clear_cache(department_id, request: gr.Request):
        caller(services, request, "admin")
        count = services.cache.clear((department_id or "").strip() or None)
        stats = stats_table(services)
        return f"🗑 {count} entries evicted 已清除", stats, stats

    reload.click(current, None, [enabled, semantic, threshold, table, plot], api_visibility="private")
    save.click(save_settings, [enabled, semantic, threshold], [result], api_visibility="private")
    clear.click(clear_cache, [department], [result, table, plot], api_visibility="private")


def register_cache_api(services) -> None:
    def cache_stats(request: gr.Request = None) -> dict[str, Any]:
        """Per department: entries, lookups, exact and semantic hits, hit rate, time saved."""
        caller(services, request, "admin")
        if services.cache is None:
            return {"enabled": False, "departments": []}
        return {**services.cache.settings(), "departments": stats_table(services).to_dict(orient="records")}

    def cache_clear(department: str = "", request: gr.Request = None) -> int:
        caller(services, request, "admin")
        return services.cache.clear(department.strip() or None) if services.cache is not None else 0

    gr.api(cache_stats, api_name="cache_stats")
    gr.api(cache_clear, api_name="cache_clear")
