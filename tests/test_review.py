"""The reviewer's workbench: queue, scoping, corrections into samples, export / import."""

import json
import subprocess
import sys

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from finetune.dataset import ImportRefused
from finetune.samples import assign_split
from storage import chats, reviews
from storage.reviews import AlreadyReviewed
from webapp.review import CaseNotFound, ReviewInputError
from webapp.tools.executor import normalise_arguments


def ask(services, username, question, rating=None, comment=None):
    user = services.auth.current_user(username)
    final = list(services.engine.turns.stream_turn(user, question))[-1]
    if rating:
        services.engine.conversations.rate(user, final.message_id, rating, comment)
    return final.message_id


@pytest.fixture
def cases(services, script):
    script("I think sales were fine.", "Vacation is 5 days.", "Revenue went up a lot.", "Hello!", "Payroll is monthly.")
    return {
        "sales": ask(services, "finance-employee", "上季度华东区销售额是多少？", -1, "没有查数据"),
        "hr": ask(services, "hr-employee", "How many vacation days do I get?", -1),
        "trend": ask(services, "finance-employee", "How did South China do last month?", -1),
        "hello": ask(services, "finance-employee", "Hi", 1),
        "unrated": ask(services, "hr-employee", "When is payroll?"),
    }


def reviewer(services, name):
    return services.auth.current_user(name)


def test_queue_is_scoped_to_the_reviewers_departments_and_filtered(services, cases):
    ids = lambda rows: [r["message_id"] for r in rows]  # noqa: E731
    assert ids(services.reviews.queue(reviewer(services, "finance-reviewer"))) == [cases["sales"], cases["trend"]]
    assert ids(services.reviews.queue(reviewer(services, "hr-reviewer"))) == [cases["hr"]]
    assert ids(services.reviews.queue(reviewer(services, "hr-admin"))) == [cases["hr"]], "admins review their own"
    admin = reviewer(services, "company-owner")  # the owner reviews every department
    assert ids(services.reviews.queue(admin)) == [cases["sales"], cases["hr"], cases["trend"]]  # oldest first
    assert ids(services.reviews.queue(admin, with_comment_only=True)) == [cases["sales"]]
    assert ids(services.reviews.queue(admin, rating=1)) == [cases["hello"]]
    assert ids(services.reviews.queue(admin, department="hr")) == [cases["hr"]]
    assert ids(services.reviews.queue(admin, adapter_version="base")) == [cases["sales"], cases["hr"], cases["trend"]]
    assert ids(services.reviews.queue(admin, adapter_version="v9")) == []
    assert ids(services.reviews.queue(admin, since="2000-01-01", until="2000-12-31")) == []
    with pytest.raises(ReviewInputError, match="not a date"):
        services.reviews.queue(admin, since="yesterday")
    with pytest.raises(CaseNotFound):
        services.reviews.queue(reviewer(services, "hr-reviewer"), department="finance")
    # an hr reviewer assigned to finance too sees both
    reviews.assign_reviewer(services.db, reviewer(services, "hr-reviewer").id, ["hr", "finance"])
    assert len(services.reviews.queue(reviewer(services, "hr-reviewer"))) == 3


def test_a_case_shows_its_whole_context(services, cases):
    case = services.reviews.case(reviewer(services, "finance-reviewer"), cases["sales"])
    assert [i["type"] for i in case["items"] if i["type"] != "sources"] == ["user", "text"]
    assert case["items"][-1]["content"] == "I think sales were fine."
    assert (case["comment"], case["rating"], case["username"]) == ("没有查数据", -1, "finance-employee")
    assert case["model"] == "tiny-qwen3" and case["adapter"] is None
    assert {t["function"]["name"] for t in case["tools"]} == {
        "query_sales", "lookup_customer", "send_email", "search_knowledge_base"}
    with pytest.raises(CaseNotFound):
        services.reviews.case(reviewer(services, "hr-reviewer"), cases["sales"])


def test_a_tool_call_correction_becomes_a_sample_that_renders_and_keeps_its_split(services, cases):
    rev = reviewer(services, "finance-reviewer")
    outcome = services.reviews.decide(
        rev, cases["sales"], "approved", "should_call_tool", answer="上季度华东区销售收入约 3,519 万元。",
        tool_name="query_sales", tool_arguments='{"region": "East China", "period": "last_quarter"}')
    (sample,) = reviews.list_samples(services.db)
    messages, tools = json.loads(sample["messages"]), json.loads(sample["tools"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = messages[2]["tool_calls"][0]["function"]
    assert call["name"] == "query_sales" and json.loads(call["arguments"]) == {"region": "华东", "period": "last_quarter"}
    assert json.loads(messages[3]["content"])["region"] == "华东"  # the real result from the sales system
    assert sample["origin"] == "correction" and sample["reason"] == "should_call_tool"
    assert sample["source_message_id"] == cases["sales"] and sample["reviewer_id"] == rev.id
    assert sample["split"] == outcome["split"] == assign_split("finance", "上季度华东区销售额是多少？")
    prompt = services.model.render_prompt(messages, tools)
    assert "<tool_call>" in prompt and "query_sales" in prompt and "<tool_response>" in prompt
    # decided cases leave the queue and are never decided twice
    assert cases["sales"] not in [r["message_id"] for r in services.reviews.queue(rev)]
    with pytest.raises(AlreadyReviewed):
        services.reviews.decide(reviewer(services, "finance-admin"), cases["sales"], "rejected", "other")


def test_a_sample_keeps_the_passages_its_question_was_served_with(services, script):
    """Trained without them, the adapter meets passages only when serving and calls a tool for
    a policy question answered by them (#8): the sample's prompt is the prompt as served."""
    script("Within 30 days.")
    message_id = ask(services, "finance-employee", "报销需要在多少天内提交？", -1)
    conversation_id = chats.get_message_owner(services.db, message_id)["conversation_id"]
    served = services.engine.conversations.passages_for(chats.last_user_message_id(services.db, conversation_id))
    assert served and served[0]["title"].startswith("费用报销制度")
    services.reviews.decide(reviewer(services, "finance-reviewer"), message_id, "approved", "wrong_fact",
                            answer="费用须在发生后 30 天内提交报销 [1]。")
    (sample,) = reviews.list_samples(services.db)
    messages = json.loads(sample["messages"])
    assert messages[0] == {"role": "system", "content": services.settings.system_prompt}
    assert messages[-2]["role"] == "user" and messages[-2]["passages"] == served


def test_period_words_are_aliases_of_the_canonical_periods(services):
    spec = services.tools.registry.get("query_sales")
    assert normalise_arguments(spec, {"region": "South China", "period": "Last Month"}) == \
        {"region": "华南", "period": "last_month"}
    assert normalise_arguments(spec, {"region": "华东区", "period": "上季度"}) == {"region": "华东", "period": "last_quarter"}


def test_bad_corrections_are_refused_with_what_to_fix(services, cases):
    rev = reviewer(services, "finance-reviewer")
    for kwargs, message in [
        (dict(reason="should_call_tool", tool_name="query_sales", tool_arguments='{"region": "Northern"}'),
         "choose one of 华东"),
        (dict(reason="should_call_tool", tool_name="query_sales", tool_arguments="{oops"), "not valid JSON"),
        (dict(reason="should_call_tool", tool_name="drop_tables", tool_arguments="{}"), "may not use"),
        (dict(reason="wrong_fact"), "Write the corrected answer"),
        (dict(answer="x"), "Pick a reason"),
        (dict(reason="made_up", answer="x"), "reason must be one of"),
    ]:
        with pytest.raises(ReviewInputError, match=message):
            services.reviews.decide(rev, cases["sales"], "approved", **kwargs)
    assert reviews.list_samples(services.db) == []
    # the case is still open after refused attempts
    assert cases["sales"] in [r["message_id"] for r in services.reviews.queue(rev)]


def test_skip_reject_and_good_examples(services, cases):
    rev, admin = reviewer(services, "finance-reviewer"), reviewer(services, "finance-admin")
    services.reviews.decide(rev, cases["sales"], "skipped")
    assert [r["message_id"] for r in services.reviews.queue(rev)] == [cases["trend"], cases["sales"]]
    services.reviews.decide(rev, cases["trend"], "rejected", "other", note="question was unclear")
    assert [d["decision"] for d in reviews.decisions_of(services.db, cases["trend"])] == ["rejected"]
    outcome = services.reviews.decide(admin, cases["hello"], "approved", "good_example")
    sample = reviews.list_samples(services.db)[0]
    assert outcome["sample_id"] == sample["id"] and sample["origin"] == "good_example"
    assert [m["content"] for m in json.loads(sample["messages"])][1:] == ["Hi", "Hello!"]


def test_export_import_round_trip_is_lossless_and_loads_with_datasets(services, cases, tmp_path):
    admin = reviewer(services, "company-owner")  # decides both departments' cases
    services.reviews.decide(admin, cases["sales"], "approved", "should_call_tool", tool_name="query_sales",
                            tool_arguments='{"region": "华东", "period": "2026-Q3"}')
    services.reviews.decide(admin, cases["trend"], "approved", "wrong_fact", answer="South China grew 9% last month.")
    services.reviews.decide(admin, cases["hr"], "approved", "tone_format", answer="You get 15 days. 电话 13912345678")
    exported = services.reviews.export(admin)
    lines = exported.strip().splitlines()
    assert len(lines) == 3 and "[PHONE]" in exported and "13912345678" not in exported

    path = tmp_path / "samples.jsonl"
    path.write_text(exported, encoding="utf-8")
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(path), split="train")
    # the question as served: after the passages retrieved for it, when there were any
    assert len(dataset) == 3 and dataset[0]["messages"][1]["content"].endswith("上季度华东区销售额是多少？")

    before = [(json.loads(r["messages"]), r["tools"] and json.loads(r["tools"])) for r in reviews.list_samples(services.db)]
    result = services.reviews.import_samples(admin, exported, None)  # departments from metadata
    assert result.imported == 3 and result.near_duplicates == 3  # the same questions again
    after = [(json.loads(r["messages"]), r["tools"] and json.loads(r["tools"])) for r in reviews.list_samples(services.db)][3:]
    assert after == before
    rows = reviews.list_samples(services.db)
    assert [r["split"] for r in rows[3:]] == [r["split"] for r in rows[:3]]  # near-duplicates share a split


def test_a_broken_line_is_reported_by_number_and_nothing_is_imported(services, cases):
    admin = reviewer(services, "finance-admin")
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    with pytest.raises(ImportRefused) as info:
        services.reviews.import_samples(admin, "\n".join([good, good, "{broken", good]), "finance")
    assert info.value.errors == ["line 3: not valid JSON (Expecting property name enclosed in double quotes)"]
    assert reviews.list_samples(services.db) == []
    with pytest.raises(CaseNotFound, match="not among the departments you review"):
        services.reviews.import_samples(reviewer(services, "hr-reviewer"), good, "finance")
    with pytest.raises(ImportRefused, match="not one you may import into"):  # via the file's metadata
        line = json.dumps({**json.loads(good), "metadata": {"department": "finance"}})
        services.reviews.import_samples(reviewer(services, "hr-reviewer"), line, None)


@pytest.mark.slow
def test_cli_export_and_import(services, cases, tmp_path):
    admin = reviewer(services, "finance-admin")
    services.reviews.decide(admin, cases["trend"], "approved", "wrong_fact", answer="It grew 9%.")
    data_dir = services.settings.data_dir
    services.close()  # the CLI needs the database to itself, as when the app is stopped
    out = tmp_path / "out.jsonl"
    run = lambda *args: subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True)  # noqa: E731
    done = run("export", "--data-dir", str(data_dir), "--out", str(out))
    assert done.returncode == 0 and "wrote 1 samples" in done.stdout
    done = run("import", "--data-dir", str(data_dir), str(out), "--department", "hr")
    assert done.returncode == 0 and "imported 1 samples" in done.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(out.read_text() + "not json\n")
    done = run("import", "--data-dir", str(data_dir), str(bad))
    assert done.returncode == 1 and "line 2: not valid JSON" in done.stderr


def test_review_api_refuses_other_departments_and_employees(running_app, monkeypatch):
    from tests.conftest import ScriptedModel

    url, services = running_app
    monkeypatch.setattr(services.model, "stream", ScriptedModel("wrong answer"))
    employee = Client(url, auth=("finance-employee", "hangjia-demo"), verbose=False)
    answer = employee.predict("上季度华东区销售额是多少？", None, api_name="/chat")
    employee.predict(answer["message_id"], -1, "no numbers", api_name="/feedback")
    with pytest.raises(AppError, match="not allowed"):
        employee.predict(api_name="/review_queue")
    hr = Client(url, auth=("hr-reviewer", "hangjia-demo"), verbose=False)
    assert hr.predict(api_name="/review_queue") == []
    with pytest.raises(AppError, match="no answer .* among the departments you review"):
        hr.predict(answer["message_id"], api_name="/review_case")
    with pytest.raises(AppError, match="no answer .* among the departments you review"):
        hr.predict(answer["message_id"], "approved", "wrong_fact", "x", "", "{}", "", api_name="/review_decide")
    finance = Client(url, auth=("finance-reviewer", "hangjia-demo"), verbose=False)
    assert [c["message_id"] for c in finance.predict(api_name="/review_queue")] == [answer["message_id"]]
    decided = finance.predict(answer["message_id"], "approved", "should_call_tool", "",
                              "query_sales", '{"region": "华东", "period": "last_quarter"}', "", api_name="/review_decide")
    assert decided["sample_id"] and "query_sales" in finance.predict(api_name="/samples_export")


def test_demo_mode_starts_with_a_reviewed_history_and_cases_waiting(tmp_path, tiny_model, embedder):
    """A newcomer's first Review tab: five thumbed-down sales answers wait in finance's queue,
    and the reviewer's earlier corrections are training samples, so one Retrain shows the loop."""
    from tests.conftest import make_settings
    from webapp.services import open_services

    services = open_services(make_settings(tmp_path, demo_feedback=True, knowledge=False), model=tiny_model,
                             embedder=embedder)
    try:
        reviewer = services.auth.current_user("finance-reviewer")
        waiting = services.reviews.queue(reviewer, rating=-1, department="finance")
        assert len(waiting) == 5 and all(case["rating"] == -1 for case in waiting)
        samples = services.db.query("SELECT department_id, origin, split FROM training_samples")
        assert len(samples) == 25 and {s["department_id"] for s in samples} == {"finance"}
        assert {s["origin"] for s in samples} == {"correction"}
        hr = services.auth.current_user("hr-reviewer")
        assert services.reviews.queue(hr, rating=-1, department="hr") == []  # finance's cases stay in finance
    finally:
        services.close()
    reopened = open_services(make_settings(tmp_path, demo_feedback=True, knowledge=False), model=tiny_model,
                             embedder=embedder)
    try:  # seeded once, on the empty data dir only
        assert reopened.db.scalar("SELECT count(*) FROM training_samples") == 25
    finally:
        reopened.close()
