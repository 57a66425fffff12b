import datetime as dt
import json
import threading

import pytest

from storage import Database, accounts, company, migrate, tool_audit
from webapp.auth import Auth
from webapp.demo import seed_demo_company
from webapp.tools.builtin import BUILTINS
from webapp.tools.executor import ToolExecutor, TransientToolError
from webapp.tools.parser import ToolCall
from webapp.tools.registry import (
    DEMO_TOOLS_FILE,
    ToolConfigError,
    ToolSpec,
    load_registry,
    load_tool_file,
)

TODAY = dt.date(2026, 11, 28)
ANY_ARGS = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


@pytest.fixture
def world(tmp_path):
    db = Database(tmp_path / "t.duckdb")
    migrate(db)
    auth = Auth(db)
    seed_demo_company(db, auth)
    company.seed_sales(db, TODAY)
    registry = load_registry([DEMO_TOOLS_FILE], BUILTINS)
    sleeps = []
    executor = ToolExecutor(registry, db, today=lambda: TODAY, sleep=sleeps.append)
    yield executor, auth, sleeps
    executor.close()
    db.close()


def rows(executor, call_id):
    return [(r.status, r.attempt) for r in tool_audit.attempts_of(executor.db, call_id)]


def test_each_user_sees_only_the_tools_their_role_and_department_allow(world):
    executor, auth, _ = world
    assert [t.name for t in executor.tools_for(auth.current_user("finance-employee"))] == [
        "lookup_customer", "query_sales", "send_email"]
    assert [t.name for t in executor.tools_for(auth.current_user("hr-admin"))] == ["send_email"]


def test_denied_calls_are_refused_and_audited(world):
    executor, auth, _ = world
    hr = auth.current_user("hr-employee")
    outcome = executor.execute(hr, ToolCall("query_sales", {"region": "华东", "period": "2026-Q3"}))
    assert outcome.status == "denied" and "may not use the tool 'query_sales'" in outcome.content
    audit = tool_audit.attempts_of(executor.db, outcome.call_id)
    assert [(a.status, a.user_id, a.department_id) for a in audit] == [("denied", hr.id, "hr")]


def test_enum_values_are_normalised_or_rejected_with_the_choices(world):
    executor, auth, _ = world
    finance = auth.current_user("finance-employee")
    ok = executor.execute(finance, ToolCall("query_sales", {"region": " east  CHINA ", "period": "last_quarter"}))
    assert ok.status == "ok" and ok.arguments["region"] == "华东"
    result = json.loads(ok.content)
    assert result["period"] == "2026-Q3" and result["previous_period"]["period"] == "2026-Q2"
    assert result["same_period_last_year"]["period"] == "2025-Q3"
    assert result["same_period_last_year"]["change_pct"] > 5  # East China grows year on year
    assert [p["period"] for p in result["trend"]] == ["2025-Q4", "2026-Q1", "2026-Q2", "2026-Q3"]
    bad = executor.execute(finance, ToolCall("query_sales", {"region": "Northern", "period": "2026-Q3"}))
    assert bad.status == "invalid" and "choose one of 华东, 华南, 华北, 西南, 华中" in bad.content
    assert rows(executor, bad.call_id) == [("invalid", 0)]


def test_schema_rejects_missing_and_extra_arguments_without_running(world):
    executor, auth, _ = world
    finance = auth.current_user("finance-employee")
    outcome = executor.execute(finance, ToolCall("query_sales", {"region": "华东", "sql": "DROP TABLE sales"}))
    assert outcome.status == "invalid"
    assert "'period' is a required property" in outcome.content and "'sql' was unexpected" in outcome.content
    assert executor.db.scalar("SELECT count(*) FROM sales") > 0


def test_sql_fragments_in_arguments_are_only_data(world):
    executor, auth, _ = world
    finance = auth.current_user("finance-employee")
    outcome = executor.execute(finance, ToolCall("lookup_customer", {"name_or_id": "' OR 1=1; DROP TABLE customers; --"}))
    assert outcome.status == "error" and "no customer matches" in outcome.content
    wildcard = executor.execute(finance, ToolCall("lookup_customer", {"name_or_id": "%"}))
    assert wildcard.status == "error"  # a LIKE wildcard is matched literally, not as "everything"
    assert executor.db.scalar("SELECT count(*) FROM customers") == 7


def make_executor(world, spec):
    executor, auth, sleeps = world
    executor.registry.add(spec)
    return executor, auth.current_user("finance-employee"), sleeps


def test_a_flaky_tool_succeeds_on_the_third_attempt_with_three_audit_rows(world):
    calls = []

    def flaky(args, ctx):
        calls.append(args)
        if len(calls) < 3:
            raise TransientToolError("503 from the ERP")
        return {"ok": args["x"]}

    spec = ToolSpec("flaky", "test", ANY_ARGS, flaky, retries=2, backoff_s=0.5)
    executor, user, sleeps = make_executor(world, spec)
    outcome = executor.execute(user, ToolCall("flaky", {"x": 7}))
    assert (outcome.status, outcome.attempts, json.loads(outcome.content)) == ("ok", 3, {"ok": 7})
    assert rows(executor, outcome.call_id) == [("error", 1), ("error", 2), ("ok", 3)]
    assert sleeps == [0.5, 1.0]  # exponential backoff


def test_retries_give_up_and_say_so(world):
    def down(args, ctx):
        raise ConnectionError("connection refused")

    executor, user, _ = make_executor(world, ToolSpec("down", "test", ANY_ARGS, down, retries=1, backoff_s=0))
    outcome = executor.execute(user, ToolCall("down", {"x": 1}))
    assert outcome.status == "error" and "connection refused" in outcome.content
    assert rows(executor, outcome.call_id) == [("error", 1), ("error", 2)]


def test_no_retry_on_validation_errors_or_tool_bugs(world):
    calls = []

    def buggy(args, ctx):
        calls.append(1)
        raise KeyError("oops")

    executor, user, _ = make_executor(world, ToolSpec("buggy", "test", ANY_ARGS, buggy, retries=3))
    invalid = executor.execute(user, ToolCall("buggy", {"x": "not a number"}))
    assert invalid.status == "invalid" and calls == []
    broken = executor.execute(user, ToolCall("buggy", {"x": 1}))
    assert broken.status == "error" and calls == [1]
    assert rows(executor, broken.call_id) == [("error", 1)]


def test_a_slow_tool_times_out_and_is_retried(world):
    release = threading.Event()

    def slow(args, ctx):
        release.wait(5)
        return "late"

    spec = ToolSpec("slow", "test", ANY_ARGS, slow, timeout_s=0.05, retries=1, backoff_s=0)
    executor, user, _ = make_executor(world, spec)
    outcome = executor.execute(user, ToolCall("slow", {"x": 1}))
    release.set()
    assert outcome.status == "timeout" and "did not answer within 0.05 s" in outcome.content
    assert rows(executor, outcome.call_id) == [("timeout", 1), ("timeout", 2)]


def test_long_results_are_cut(world):
    executor, user, _ = make_executor(world, ToolSpec("big", "test", ANY_ARGS, lambda a, c: "x" * 10_000))
    outcome = executor.execute(user, ToolCall("big", {"x": 1}))
    assert len(outcome.content) < 4100 and "truncated 6,000 characters" in outcome.content


def test_side_effects_wait_for_approval_and_only_the_owner_decides(world):
    executor, auth, _ = world
    hr = auth.current_user("hr-employee")
    outcome = executor.execute(hr, ToolCall("send_email", {"to": "boss@example.com", "subject": "Hi", "body": "Report"}))
    assert outcome.status == "pending" and company.outbox(executor.db) == []
    with pytest.raises(LookupError):
        executor.resolve_pending(auth.current_user("finance-employee"), outcome.call_id, True)
    sent = executor.resolve_pending(hr, outcome.call_id, True)
    assert sent.status == "ok"
    assert [(m["recipient"], m["user_id"]) for m in company.outbox(executor.db)] == [("boss@example.com", hr.id)]
    assert rows(executor, outcome.call_id) == [("pending", 0), ("ok", 1)]
    with pytest.raises(LookupError, match="already ok"):
        executor.resolve_pending(hr, outcome.call_id, True)  # never twice


def test_declined_side_effects_never_run(world):
    executor, auth, _ = world
    hr = auth.current_user("hr-employee")
    outcome = executor.execute(hr, ToolCall("send_email", {"to": "a@b.co", "subject": "s", "body": "b"}))
    declined = executor.resolve_pending(hr, outcome.call_id, False)
    assert declined.status == "declined" and company.outbox(executor.db) == []
    assert rows(executor, outcome.call_id) == [("pending", 0), ("declined", 0)]


def test_approval_checks_permission_again(world):
    executor, auth, _ = world
    hr = auth.current_user("hr-employee")
    outcome = executor.execute(hr, ToolCall("send_email", {"to": "a@b.co", "subject": "s", "body": "b"}))
    accounts.add_department(executor.db, "legal", "Legal")
    accounts.move_user(executor.db, hr.id, "legal")
    moved = auth.current_user("hr-employee")  # moved to a department without send_email
    assert executor.resolve_pending(moved, outcome.call_id, True).status == "denied"
    assert company.outbox(executor.db) == []


def test_tool_files_report_every_problem_at_once(tmp_path):
    path = tmp_path / "tools.toml"
    path.write_text(
        """
[[tool]]
name = "bad name"
descripton = "typo"
roles = ["boss"]
kind = "http"
url = "ftp://x/${NOT_SET_ANYWHERE}"
ground = ["priority"]
[tool.parameters]
type = "array"
[tool.spellings.level]
"urgent" = "p0"
"""
    )
    with pytest.raises(ToolConfigError) as info:
        load_tool_file(path, BUILTINS, environ={})
    message = str(info.value)
    for expected in ("unknown key 'descripton'. Did you mean 'description'", "name must be letters",
                     "needs a description", "unknown roles ['boss']", "NOT_SET_ANYWHERE is not set",
                     "url must start with http", 'type = "object"', "ground must list required parameters",
                     "spellings.level must map words to values of the parameter's enum"):
        assert expected in message, expected
