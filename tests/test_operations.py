"""Monitoring figures and the audit trail, on a seeded DuckDB file, checked against
figures computed by hand; and the admin-only API around them."""

import datetime as dt
import os
import stat
import statistics
import time

import duckdb
import pytest
from gradio_client import Client

from storage import adapters, audit, cache, chats, reviews, tool_audit
from storage.audit import ConversationFilter
from webapp.ui.operations import audit_export, audit_open, audit_search, monitoring_figures


def quantile(values, q):
    """Linear interpolation between closest ranks (what quantile_cont computes)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def seed(services):
    """Two departments' day: finance with an active v1 and a canary v2, hr on the base."""
    db, auth = services.db, services.auth
    fe, fe2, he = (auth.current_user(n) for n in ("finance-employee", "finance-reviewer", "hr-employee"))
    adapters.add_version(db, "finance", "v1", "/x/v1", "m", None, status="active")
    adapters.add_version(db, "finance", "v2", "/x/v2", "m", None, status="candidate")
    latencies = {"finance": [100.0, 300.0, 200.0, 900.0], "hr": [50.0, 70.0]}
    answers = []
    for user, latency, version, tokens in [(fe, 100.0, "v1", 10), (fe, 300.0, "v2", 20), (fe2, 200.0, "v1", 30),
                                           (fe2, 900.0, "v1", 40), (he, 50.0, None, 5), (he, 70.0, None, 6)]:
        conversation = chats.create_conversation(db, user.id, user.department_id, "q")
        chats.add_message(db, conversation.id, "user", f"question {latency}")
        answers.append(chats.add_message(
            db, conversation.id, "assistant", "answer", adapter=user.department_id if version else None,
            adapter_version=version, latency_ms=latency, prompt_tokens=tokens * 10, completion_tokens=tokens,
            finish_reason="stop"))
    # a cached answer: counted as an answer, not in the model's latency
    conversation = chats.create_conversation(db, fe.id, "finance", "cached")
    chats.add_message(db, conversation.id, "user", "question cached")
    chats.add_message(db, conversation.id, "assistant", "answer", latency_ms=3.0, finish_reason="cached",
                      cache_entry_id=1)
    chats.record_feedback(db, answers[0], fe.id, -1, "wrong")   # v1 down
    chats.record_feedback(db, answers[1], fe.id, -1, None)      # v2 (canary) down
    chats.record_feedback(db, answers[2], fe2.id, 1, None)      # v1 up
    chats.record_feedback(db, answers[4], he.id, -1, None)      # hr base down
    reviews.record_decision(db, answers[4], auth.current_user("hr-reviewer").id, "rejected", "other", None, None)
    for outcome in ("exact", "miss", "semantic", "miss"):
        cache.record_lookup(db, "finance", outcome, None, None, 1.0)
    for call_id, statuses in [("c1", ["error", "ok"]), ("c2", ["denied"]), ("c3", ["ok"])]:
        for attempt, status in enumerate(statuses, 1):
            tool_audit.record_attempt(db, call_id=call_id, user_id=fe.id, department_id="finance", tool="query_sales",
                                      arguments="{}", status=status, attempt=attempt, conversation_id=1)
    run = adapters.start_run(db, "finance", "schedule")
    adapters.finish_run(db, run, "succeeded")
    return latencies


def test_monitoring_figures_equal_the_ones_computed_by_hand(services):
    latencies = seed(services)
    figures = monitoring_figures(services, 7, None)
    daily = {r["department_id"]: r for r in figures["daily"].to_dict(orient="records")}
    fin, hr = daily["finance"], daily["hr"]
    assert (fin["conversations"], fin["user_messages"], fin["active_users"], fin["answers"]) == (5, 5, 2, 5)
    assert (hr["conversations"], hr["user_messages"], hr["active_users"], hr["answers"]) == (2, 2, 1, 2)
    assert fin["latency_p50_ms"] == pytest.approx(statistics.median(latencies["finance"]))
    assert fin["latency_p95_ms"] == pytest.approx(quantile(latencies["finance"], 0.95))
    assert hr["latency_p95_ms"] == pytest.approx(quantile(latencies["hr"], 0.95))
    assert (fin["prompt_tokens"], fin["completion_tokens"]) == (1000, 100)
    assert (fin["thumbs_up"], fin["thumbs_down"], hr["thumbs_down"]) == (1, 2, 1)
    assert (fin["cache_lookups"], fin["cache_hits"], fin["cache_hit_rate"]) == (4, 2, 0.5)
    trend = figures["trend"]  # what the messages-per-day plot draws: every day, quiet ones as 0
    assert len(trend) == 7 * 2 and trend["user_messages"].tolist().count(0) == 12
    assert trend["user_messages"].sum() == 5 + 2

    by_version = {(r["department_id"], r["version"]): r for r in figures["by_version"].to_dict(orient="records")}
    assert by_version[("finance", "v1")]["status"] == "active"
    assert by_version[("finance", "v1")]["thumbs_down_rate"] == pytest.approx(1 / 2)
    assert by_version[("finance", "v2")]["status"] == "candidate"  # the canary, side by side
    assert by_version[("finance", "v2")]["thumbs_down_rate"] == 1.0
    assert by_version[("hr", "base")]["thumbs_down_rate"] == 1.0

    tools = {r["status"]: r["calls"] for r in figures["tools"].to_dict(orient="records")}
    assert tools == {"ok": 2, "denied": 1}, "a retried call counts once, by its last attempt"
    backlog = {r["department_id"]: r["open_cases"] for r in figures["backlog"].to_dict(orient="records")}
    assert backlog == {"finance": 2}, "hr's case was reviewed"
    runs = figures["runs"].to_dict(orient="records")
    assert [(r["department_id"], r["status"], r["runs"]) for r in runs] == [("finance", "succeeded", 1)]
    # a day outside the period is not counted
    assert monitoring_figures(services, 1, None, today=dt.date.today() + dt.timedelta(days=3))["daily"].empty


def test_audit_finds_opens_and_exports_and_every_look_is_logged(services, tmp_path, script):
    script('<tool_call>\n{"name": "query_sales", "arguments": {"region": "华东", "period": "last_quarter"}}\n'
           '</tool_call>', "华东 sold 1.2M.", "Leave is 10 days.")
    fe = services.auth.current_user("finance-employee")
    he = services.auth.current_user("hr-employee")
    sales = list(services.engine.turns.stream_turn(fe, "Sales in East China last quarter?"))[-1]
    list(services.engine.turns.stream_turn(he, "How much leave? sales"))
    services.engine.conversations.rate(fe, sales.message_id, -1, "too vague")
    admin = services.auth.current_user("finance-admin")

    found = audit_search(services, admin, ConversationFilter(department_id="finance", text="EAST CHINA"))
    assert found["conversation_id"].tolist() == [sales.conversation_id]
    assert found["tool_calls"].tolist() == [1] and found["thumbs_down"].tolist() == [1]
    assert audit_search(services, admin, ConversationFilter(department_id="finance", tool="query_sales",
                                                            rating=-1))["conversation_id"].tolist() \
        == [sales.conversation_id]
    assert audit_search(services, admin, ConversationFilter(department_id="finance", username="hr-employee")).empty
    assert audit_search(services, admin, ConversationFilter(department_id="finance", text="100%")).empty, \
        "a % is matched literally"
    assert audit_search(services, admin, ConversationFilter(
        department_id="finance", until=dt.date.today() - dt.timedelta(days=1))).empty

    record = audit_open(services, admin, sales.conversation_id)
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert record["tool_calls"][0]["tool"] == "query_sales" and record["messages"][-1]["rating"] == -1
    hr_conversation = chats.list_conversations(services.db, he.id)[0].id
    with pytest.raises(Exception, match="No conversation"):
        audit_open(services, admin, hr_conversation)  # another department's conversation

    flt = ConversationFilter(department_id="finance")
    csv_path, rows = audit_export(services, admin, flt, "csv")
    parquet_path, _ = audit_export(services, admin, flt, "parquet")
    for path in (csv_path, parquet_path):
        exported = duckdb.sql(f"SELECT * FROM '{path}'").fetchall()
        assert len(exported) == rows == 4
    assert duckdb.sql(f"SELECT DISTINCT username FROM '{parquet_path}'").fetchall() == [("finance-employee",)]
    actions = [e["action"] for e in audit.events(services.db, "audit.")]
    assert actions == ["audit.export", "audit.export", "audit.open", "audit.search", "audit.search", "audit.search",
                       "audit.search", "audit.search"]
    assert all(e["username"] == "finance-admin" for e in audit.events(services.db, "audit."))


def test_an_export_is_private_to_the_server_and_gone_an_hour_later(services):
    """Exported conversations are sensitive: readable by the server's OS user only, and not
    left in /tmp once the download is long done."""
    admin = services.auth.current_user("finance-admin")
    flt = ConversationFilter(department_id="finance")
    first, _ = audit_export(services, admin, flt, "csv")
    assert first.is_file() and stat.S_IMODE(first.parent.parent.stat().st_mode) == 0o700
    later, _ = audit_export(services, admin, flt, "parquet")
    assert first.is_file(), "a fresh export stays for its download"
    hour_ago = time.time() - 3601
    os.utime(first.parent, (hour_ago, hour_ago))
    newest, _ = audit_export(services, admin, flt, "csv")
    assert not first.parent.exists() and later.is_file() and newest.is_file()


def test_monitoring_and_audit_apis_are_for_admins_only(running_app):
    url, services = running_app
    for username in ("finance-employee", "finance-reviewer"):
        client = Client(url, auth=(username, "hangjia-demo"), verbose=False)
        for api_name, args in (("/monitoring", (7,)), ("/audit_search", ()), ("/audit_conversation", (1,))):
            with pytest.raises(Exception, match="not allowed|不允许|没有权限"):
                client.predict(*args, api_name=api_name)
    assert audit.events(services.db, "audit.") == [], "refused calls leave no trace of a look"
    admin = Client(url, auth=("finance-admin", "hangjia-demo"), verbose=False)
    figures = admin.predict(7, api_name="/monitoring")
    assert set(figures) == {"daily", "trend", "by_version", "tools", "backlog", "runs"}
    assert admin.predict(api_name="/audit_search") == []
    assert [e["action"] for e in audit.events(services.db, "audit.")] == ["audit.search"]


def test_the_admin_tables_speak_both_languages_and_read_as_people_read(services):
    """Admin tab: statuses, triggers, metrics and the refresh's reasons in Chinese and English,
    shares as percentages, times to the minute, durations in minutes (no raw column names)."""
    from webapp.ui.admin import gate_table, runs_table, versions_table

    db = services.db
    skipped = adapters.start_run(db, "finance", "schedule")
    adapters.finish_run(db, skipped, "skipped", reason="3 new approved samples since the last refresh; 20 are needed")
    trained = adapters.start_run(db, "finance", "manual")
    adapters.finish_run(db, trained, "succeeded", steps=12, final_loss=0.81234, version="v1")
    db.write("UPDATE training_runs SET started_at = finished_at - INTERVAL 150 SECOND WHERE id = ?", [trained])
    adapters.add_version(db, "finance", "v1", "/adapters/finance/v1", "base", trained)
    adapters.record_evaluation(db, "finance", "v1", {"candidate": {"tool_exact": 0.5714, "keyword_recall": 0.4444}}, {
        "passed": False, "reasons": ["no_false_tool_calls fell by 0.214, more than its noise 0.100 (mail: called query_sales)"],
        "table": [{"metric": "tool_exact", "active": 0.0, "candidate": 0.5714, "change": 0.5714},
                  {"metric": "no_false_tool_calls", "active": 1.0, "candidate": 0.7857, "change": -0.2143}]})

    runs = runs_table(services, "finance").to_dict(orient="records")
    assert [r["状态 Status"] for r in runs] == ["✅ 成功 succeeded", "⏭ 跳过 skipped"]
    assert [r["触发 Trigger"] for r in runs] == ["手动 manual", "夜间 nightly"]
    assert runs[1]["原因 Reason"].startswith("自上次训练以来新增 3 条已审核样本，需要 20 条（3 new approved samples")
    assert runs[0]["用时 Took"] == "2 分 30 秒 (2 min 30 s)" and runs[0]["最终损失 Final loss"] == "0.8123"
    assert len(runs[0]["开始 Started"]) == len("2026-12-06 02:00")
    version = versions_table(services, "finance").to_dict(orient="records")[0]
    assert version["状态 Status"] == "候选 candidate" and version["工具调用准确 tool calls exact"] == "57%"
    assert version["评测门 Gate"].startswith("❌ 未通过 refused: 无误调用 下降 0.214，超过允许的 0.100")
    gate = gate_table(services, "finance").to_dict(orient="records")
    assert gate[1] == {"指标 Metric": "无误调用 no false calls", "在用 Active": "100%", "候选 Candidate": "79%",
                       "变化 Change": "-21.4 pp"}


def test_server_tables_are_shown_with_both_languages_percentages_and_minutes():
    import pandas as pd

    from webapp.i18n import for_people

    raw = pd.DataFrame({"department_id": ["finance"], "cache_hit_rate": [0.4567], "status": ["denied"],
                        "created_at": pd.to_datetime(["2026-12-06 10:11:12"]), "thumbs_down_rate": [None]})
    assert for_people(raw).to_dict(orient="records") == [{
        "部门 department": "finance", "命中率 hit rate": "46%", "状态 status": "⛔ 无权限 denied",
        "创建 created": "2026-12-06 10:11", "👎 比例 rate": ""}]
    assert list(raw.columns)[0] == "department_id"  # the figures themselves keep their names
