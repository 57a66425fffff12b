"""Slot-swap variants of reviewed tool calls (finetune/augment.py), from the demo company's
own tool file: the question and the call change together, spelled as the asker spelled."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tomllib

from finetune.augment import slot_variants, slot_vocabulary, wrapped
from finetune.samples import normalize_question, tool_call_message

DEMO_TOOLS = Path(__file__).resolve().parent.parent / "webapp" / "tools" / "demo_tools.toml"


@pytest.fixture(scope="module")
def vocabulary():
    tools = tomllib.loads(DEMO_TOOLS.read_text(encoding="utf-8"))["tool"]
    return slot_vocabulary((t["name"], t.get("parameters", {}), t.get("aliases", {})) for t in tools)


def correction(question: str, arguments: dict) -> dict:
    return {"messages": [
        {"role": "system", "content": "You are hangjia."}, {"role": "user", "content": question},
        tool_call_message("query_sales", arguments, "call_1"),
        {"role": "tool", "content": '{"value": 1}', "tool_call_id": "call_1"},
        {"role": "assistant", "content": "华东区上季度销售额为 1 元。"}], "tools": [{"type": "function"}]}


def calls(variants):
    return [(v["messages"][1]["content"], json.loads(v["messages"][2]["tool_calls"][0]["function"]["arguments"]))
            for v in variants]


def test_chinese_question_gets_other_regions_and_periods_in_the_same_spelling(vocabulary):
    sample = correction("上季度华东区销售额是多少？", {"region": "华东", "period": "last_quarter", "metric": "revenue"})
    variants = slot_variants(sample, vocabulary, 6, random.Random(0))
    assert len(variants) == 6
    table = vocabulary["query_sales"]
    for question, arguments in calls(variants):
        assert question.endswith("区销售额是多少？")  # the affix 区 kept, the rest untouched
        region_spelling = question[question.index("区") - 2:question.index("区") + 1]
        assert table["region"][region_spelling] == arguments["region"]
        period_spelling = question[:question.index(region_spelling)]
        assert table["period"][period_spelling] == arguments["period"]
        assert arguments["metric"] == "revenue"  # optional parameters are never swapped
        assert (arguments["region"], arguments["period"]) != ("华东", "last_quarter")
    # a variant ends at the call: the tool result and the answer were about East China
    assert all(len(v["messages"]) == 3 and v["tools"] == sample["tools"] for v in variants)
    assert len({q for q, _ in calls(variants)}) == 6


def test_english_question_keeps_english_names_and_capitals(vocabulary):
    sample = correction("Last quarter, what were sales in South China?",
                        {"region": "华南", "period": "last_quarter", "metric": "revenue"})
    table = vocabulary["query_sales"]
    variants = calls(slot_variants(sample, vocabulary, 8, random.Random(1)))
    assert len(variants) == 8
    for question, arguments in variants:
        period, rest = question.split(", what were sales in ")
        assert period[0].isupper() and table["period"][period.lower()] == arguments["period"]
        assert table["region"][rest.removesuffix("?")] == arguments["region"]
        assert rest.removesuffix("?").endswith(("China", "Southwest"))  # English names, not 华北区


def test_south_is_not_found_inside_southwest_and_unspelled_values_stay(vocabulary):
    sample = correction("How many units did Southwest China sell in Q3 2025?",
                        {"region": "西南", "period": "2025-Q3", "metric": "units"})
    for question, arguments in calls(slot_variants(sample, vocabulary, 10, random.Random(2))):
        assert arguments["period"] == "2025-Q3" and "in Q3 2025" in question  # not a closed value: kept
        assert arguments["region"] != "西南"
        assert "Southwest" not in question
    # nothing of the call spelled in the question: no variant
    assert slot_variants(correction("那个区域呢？", {"region": "华东", "period": "this_year"}), vocabulary, 4,
                         random.Random(0)) == []


def test_evaluation_questions_are_never_produced(vocabulary):
    sample = correction("华东区今年的销售额", {"region": "华东", "period": "this_year"})
    everything = slot_variants(sample, vocabulary, 100, random.Random(0))
    held_out = {normalize_question(q) for q, _ in calls(everything)[:5]}
    again = slot_variants(sample, vocabulary, 100, random.Random(0), avoid=held_out)
    assert len(again) == len(everything) - 5
    assert not held_out & {normalize_question(q) for q, _ in calls(again)}


def test_samples_that_are_not_one_tool_call_are_left_alone(vocabulary):
    text_answer = {"messages": [{"role": "user", "content": "华东区是什么？"},
                                {"role": "assistant", "content": "华东区是……"}]}
    assert slot_variants(text_answer, vocabulary, 4, random.Random(0)) == []
    broken = correction("华东区今年的销售额", {"region": "华东"})
    broken["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{not json"
    assert slot_variants(broken, vocabulary, 4, random.Random(0)) == []
    assert slot_variants(correction("华东区今年的销售额", {"region": "华东"}), vocabulary, 0, random.Random(0)) == []


def test_a_question_asked_inside_chat_context_names_nothing_else_a_call_holds():
    """The shipped openings and closings, around any question, in its language: the grounding
    reads no region, period or metric in them, so the twin's call stays right."""
    from finetune.refresh import CHAT_WRAPPERS
    from webapp.tools.builtin import BUILTINS
    from webapp.tools.grounding import asks_for
    from webapp.tools.registry import DEMO_TOOLS_FILE, load_registry

    wrappers = json.loads(CHAT_WRAPPERS.read_text(encoding="utf-8"))
    spec = load_registry([DEMO_TOOLS_FILE], BUILTINS).get("query_sales")
    pieces = [p for language in ("zh", "en") for side in ("before", "after") for p in wrappers[language][side]]
    assert len(pieces) >= 120 and not [p for p in pieces if asks_for(spec, [p])]
    rng = random.Random(0)
    zh = [wrapped("上季度华东区销售额是多少？", wrappers, rng) for _ in range(40)]
    en = [wrapped("How much revenue did North China make last month?", wrappers, rng) for _ in range(40)]
    for asked, language, joiner in (("上季度华东区销售额是多少？", zh, ""),
                                     ("How much revenue did North China make last month?", en, " ")):
        table = wrappers["zh" if language is zh else "en"]
        for q in language:  # the question itself, with its language's opening and closing around it
            before, after = q.split(asked)
            assert before.removesuffix(joiner) in {"", *table["before"]}, q
            assert after.removeprefix(joiner) in {"", *table["after"]} and (before or after), q
    assert len(set(zh)) > 30 and len(set(en)) > 30
    assert {q.startswith("上季度") for q in zh} == {True, False} and {q.endswith("？") for q in zh} == {True, False}
