"""Evaluation metrics on constructed outputs and gate decisions on constructed tables."""

import pytest

from finetune.evaluate import (
    EvalCase,
    case_from_sample,
    gate,
    load_functional_set,
    per_case_scores,
    score,
    worse_cases,
)
from finetune.samples import tool_call_message

TOOLS = [{"type": "function", "function": {"name": "query_sales", "parameters": {"type": "object"}}}]
SALES = EvalCase([{"role": "user", "content": "华东上季度？"}], TOOLS, "tool",
                 {"name": "query_sales", "arguments": {"region": "华东", "period": "last_quarter"}})
DEFINITION = EvalCase([{"role": "user", "content": "What is EBITDA?"}], TOOLS, "text", keywords=["earnings", "interest"])
GREETING = EvalCase([{"role": "user", "content": "Hi"}], TOOLS, "general", keywords=["hello"])
CALL = '<tool_call>{"name": "query_sales", "arguments": {"region": "华东", "period": "last_quarter"}}</tool_call>'


def test_metrics_reward_the_right_call_and_punish_false_or_broken_ones():
    perfect = score([SALES, DEFINITION, GREETING], [CALL, "Earnings before interest...", "Hello there"])
    assert perfect == {"tool_exact": 1.0, "tool_format_valid": 1.0, "no_false_tool_calls": 1.0,
                       "keyword_recall": 1.0, "general_recall": 1.0, "cases": 3.0}
    wrong = score([SALES, DEFINITION, GREETING],
                  [CALL.replace("华东", "华南"), "Earnings only", '<tool_call>{"name": "query_sales", </tool_call>'])
    assert wrong["tool_exact"] == 0.0 and wrong["keyword_recall"] == 0.5
    assert wrong["no_false_tool_calls"] == 0.5 and wrong["tool_format_valid"] == 0.5
    assert score([SALES], ["I don't know"])["tool_exact"] == 0.0


@pytest.mark.parametrize("output, keyword, said", [
    ("一周有 5 个工作日", "5", True),
    ("1. 2022-01-01 12:30:52.232: The company has", "5", False),  # a base model's babble scored as a right answer
    ("工作日加班按 1.5 倍计算，休息日加班按 2 倍计算", "5", False),
    ("工作日加班按 1.5 倍计算，休息日加班按 2 倍计算", "2", True),
    ("12 * 12 = 1440", "144", False),
    ("12 times 12 is 144.", "144", True),
    ("Wang to book the client visit", "Li", False),
    ("Li will send the report", "li", True),
    ("a repair within two weeks", "week", True),
    ("The machine must be repaired", "repair", True),
    ("婚假一共 3 天", "婚假", True),
])
def test_keywords_count_only_where_the_answer_says_them(output, keyword, said):
    """Keyword recall guards the gate: a digit inside a date or a name inside another word must
    not make a wrong answer count as right (the base model's '2022-01-01 12:30:52'
    scored '5 working days', and the candidate that said 3 was refused for it)."""
    from finetune.evaluate import mentions

    assert mentions(output, keyword) is said


def test_a_parameter_written_out_at_its_default_is_the_same_call():
    """The gate counted metric="revenue" written out as wrong against an expected call that
    leaves metric out (its schema default): every right sales answer of a candidate that
    spelled the metric was scored a miss."""
    tools = [{"type": "function", "function": {"name": "query_sales", "parameters": {"type": "object", "properties": {
        "region": {"type": "string"}, "period": {"type": "string"},
        "metric": {"type": "string", "enum": ["revenue", "units"], "default": "revenue"}}}}}]
    case = EvalCase(SALES.messages, tools, "tool", SALES.expected_call)
    spelled = CALL.replace('"last_quarter"}', '"last_quarter", "metric": "revenue"}')
    assert score([case], [spelled])["tool_exact"] == 1.0
    assert score([case], [spelled.replace("revenue", "units")])["tool_exact"] == 0.0
    assert score([SALES], [spelled])["tool_exact"] == 0.0  # no default in that schema: a different call


def test_cases_come_from_samples_and_the_shipped_set():
    sample = {"messages": [{"role": "user", "content": "华东？"}, tool_call_message("query_sales", {"region": "华东"}, "c")],
              "tools": TOOLS}
    case = case_from_sample(sample)
    assert case.kind == "tool" and case.expected_call == {"name": "query_sales", "arguments": {"region": "华东"}}
    text = case_from_sample({"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "Revenue grew 14.8% in 华东地区"}]})
    assert text.kind == "text" and text.keywords == ["Revenue", "grew", "14.8%", "华东地区"]
    finance = load_functional_set(TOOLS, "sys")
    hr = load_functional_set(None, "sys")
    assert any(c.kind == "tool" for c in finance) and not any(c.kind == "tool" for c in hr)
    assert all(c.messages[0] == {"role": "system", "content": "sys"} for c in finance)  # passages or not
    grounded = next(c for c in finance if c.name == "policy question with passages needs no tool")
    assert grounded.kind == "general" and grounded.messages[1]["passages"][0]["title"] == "Employee Handbook"


BASE = {"tool_exact": 0.2, "keyword_recall": 0.5, "tool_format_valid": 1.0, "no_false_tool_calls": 0.9,
        "general_recall": 0.8}


@pytest.mark.parametrize(
    "candidate, passed, reason",
    [
        ({**BASE, "tool_exact": 0.9}, True, None),
        ({**BASE, "tool_exact": 0.21}, False, "less than the margin"),
        ({**BASE, "tool_exact": 0.9, "no_false_tool_calls": 0.6}, False, "no_false_tool_calls fell by 0.300"),
        ({**BASE, "tool_exact": 0.9, "general_recall": 0.7}, False, "general_recall fell"),
        ({**BASE, "tool_exact": 0.9, "general_recall": 0.79}, True, None),  # within tolerance
        # the domain mean rises by 0.3, but the answers' facts fell: not a better adapter
        ({**BASE, "tool_exact": 0.9, "keyword_recall": 0.4}, False, "keyword_recall fell by 0.100"),
        ({**BASE, "tool_exact": 0.9, "keyword_recall": 0.49}, True, None),
    ],
)
def test_gate_promotes_only_a_better_adapter_without_regressions(candidate, passed, reason):
    decision = gate(candidate, BASE, margin=0.02, tolerance=0.02)
    assert decision["passed"] is passed
    if reason:
        assert any(reason in r for r in decision["reasons"])
    assert [row["metric"] for row in decision["table"]][:2] == ["tool_exact", "keyword_recall"]


def test_a_refusal_names_the_cases_that_fell_and_what_they_lost():
    """A candidate the gate refused: it learned the calls and said "Chen leads." for "Chen leads the
    budget review". The reason must say so, so that an admin can judge the refusal."""
    notes = EvalCase([{"role": "user", "content": "Action items from these notes?"}], TOOLS, "text",
                     keywords=["Chen", "budget"], name="meeting notes -> action items")
    cases = [SALES, notes, GREETING, DEFINITION]
    active = ["I don't know", "Chen leads the budget review.", "Hello!", "Earnings before interest"]
    candidate = [CALL, "Chen leads.", '<tool_call>{"name": "query_sales", "arguments": {}}</tool_call>',
                 "Earnings before interest"]
    worse = worse_cases(cases, active, candidate)
    assert worse == {"keyword_recall": ["meeting notes -> action items: no longer says 'budget'"],
                     "no_false_tool_calls": ["Hi: called query_sales"],
                     "general_recall": ["Hi: no longer says 'hello'"]}
    decision = gate(score(cases, candidate), score(cases, active), worse=worse)
    assert not decision["passed"]
    assert any("keyword_recall fell by 0.250" in r and "no longer says 'budget'" in r for r in decision["reasons"])
    assert any("no_false_tool_calls fell" in r and "called query_sales" in r for r in decision["reasons"])
    # the other way round the calls are what fell: the wrong or missing call is shown
    back = worse_cases(cases, candidate, active)
    assert back["tool_exact"] == ["华东上季度？: no call"] and "keyword_recall" not in back
    assert gate(score(cases, active), score(cases, active), worse={})["reasons"] == [
        "domain metrics improved by +0.000, less than the margin 0.020"]


def test_one_rephrased_answer_does_not_decide_but_many_fallen_answers_do():
    """The night the gate must pass: the calls are learned, one answer of six drops one keyword
    of seven. The night it must refuse: the calls are learned, and half the answers lost
    their facts."""
    texts = [EvalCase([{"role": "user", "content": f"notes {i}"}], TOOLS, "text", keywords=list("abcdefg"),
                      name=f"text {i}") for i in range(6)]
    cases = [SALES, *texts]
    full = " ".join("abcdefg")
    active = ["I don't know", *[full] * 6]
    one_keyword = [CALL, " ".join("abcdef"), *[full] * 5]
    recall = lambda outputs: per_case_scores(cases, outputs)  # noqa: E731
    decision = gate(score(cases, one_keyword), score(cases, active), per_case=(recall(active), recall(one_keyword)))
    assert decision["passed"], decision["reasons"]
    # without the per-case view the same fall (0.024) is past the tolerance
    assert not gate(score(cases, one_keyword), score(cases, active))["passed"]
    forgot = [CALL, "a", "b", "c", full, full, full]
    decision = gate(score(cases, forgot), score(cases, active), per_case=(recall(active), recall(forgot)))
    assert not decision["passed"]
    assert any(r.startswith("keyword_recall fell by 0.429, more than its noise") for r in decision["reasons"])
    # one answer of six that says none of its facts any more is a regression, not noise
    lost_one = [CALL, "不知道。", *[full] * 5]
    decision = gate(score(cases, lost_one), score(cases, active), per_case=(recall(active), recall(lost_one)))
    assert not decision["passed"]
    assert any(r.startswith("keyword_recall fell by 0.167, more than its noise 0.100") for r in decision["reasons"])


def test_one_stray_call_among_many_answers_does_not_decide_but_stray_calls_do():
    """The recorded night's other refusal: the calls learned, and one of fourteen questions
    needing no tool (write an email about a meeting) now calls query_sales."""
    plain = [EvalCase([{"role": "user", "content": f"question {i}"}], TOOLS, "general", keywords=["ok"],
                      name=f"general {i}") for i in range(14)]
    cases = [SALES, *plain]
    active = ["I don't know", *["ok"] * 14]
    stray = '<tool_call>{"name": "query_sales", "arguments": {"region": "华东"}}</tool_call>'
    one = [CALL, stray, *["ok"] * 13]
    per_case = lambda outputs: per_case_scores(cases, outputs)  # noqa: E731
    decision = gate(score(cases, one), score(cases, active), per_case=(per_case(active), per_case(one)))
    assert decision["passed"], decision["reasons"]
    assert not gate(score(cases, one), score(cases, active))["passed"]  # 0.071 is past the tolerance alone
    three = [CALL, stray, stray, stray, *["ok"] * 11]
    decision = gate(score(cases, three), score(cases, active), per_case=(per_case(active), per_case(three)))
    assert not decision["passed"]
    assert any(r.startswith("no_false_tool_calls fell by 0.214") for r in decision["reasons"])


@pytest.mark.parametrize("output, unasked, made_up", [
    ('<tool_call>\n{"name": "query_sales", "arguments": {"region": "华南"}}\n</tool_call>', ["query_sales"], True),
    ('<tool_call>\n{"name": "query_sales", "arguments": {"region": "华南"}}\n</tool_call>', [], False),
    ('<tool_call>\n{"name": "lookup_customer", "arguments": {"name_or_id": "C001"}}\n</tool_call>', ["query_sales"],
     False),
    ('早上好！<tool_call>\n{"name": "query_sales", "arguments": {"region": "华南"}}\n</tool_call>', ["query_sales"],
     False),  # text first: its first token is no call, and the text is shown
    ("早上好！", ["query_sales"], False),
])
def test_an_answer_that_is_only_a_call_nothing_asked_for_is_told(output, unasked, made_up):
    from finetune.evaluate import calls_unasked

    assert calls_unasked(output, unasked) is made_up
