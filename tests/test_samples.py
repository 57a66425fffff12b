import json

import pytest

from finetune.samples import (
    Existing,
    assign_split,
    find_near_duplicate,
    normalize_question,
    parse_jsonl,
    scrub_messages,
    scrub_pii,
    similarity,
    tool_call_message,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("请联系 13812345678 或 +86 139-1234-5678", "请联系 [PHONE] 或 [PHONE]"),
        ("座机 010-62345678，邮箱 li.lei@example.com.cn", "座机 [PHONE]，邮箱 [EMAIL]"),
        ("身份证 11010519491231002X 已核验", "身份证 [ID_NUMBER] 已核验"),
        ("call +1 415 555 0134 today", "call [PHONE] today"),
        ("revenue 35188601.44 CNY in 2026-Q3, order 20261128", "revenue 35188601.44 CNY in 2026-Q3, order 20261128"),
    ],
)
def test_pii_is_replaced_and_numbers_that_are_not_pii_stay(text, expected):
    assert scrub_pii(text) == expected


def test_pii_is_scrubbed_inside_tool_call_arguments_too():
    messages = scrub_messages([tool_call_message("send_email", {"to": "boss@corp.cn", "body": "电话 13912345678"}, "c1")])
    args = json.loads(messages[0]["tool_calls"][0]["function"]["arguments"])
    assert args == {"to": "[EMAIL]", "body": "电话 [PHONE]"}


def test_split_is_stable_and_ignores_width_case_and_punctuation():
    split = assign_split("finance", "上季度华东区销售额是多少？", 0.5)
    assert all(assign_split("finance", q, 0.5) == split for q in ("上季度华东区销售额是多少?", " 上季度 华东区销售额是多少 "))
    splits = [assign_split("finance", f"question {i}", 0.1) for i in range(2000)]
    assert 0.07 < splits.count("eval") / 2000 < 0.13
    assert assign_split("finance", "x", 0.0) == "train"


def test_near_duplicates_are_found_in_chinese_and_english():
    existing = [Existing(1, "eval", "上季度华东区销售额是多少？"), Existing(2, "train", "How did South China do last month?")]
    assert find_near_duplicate("上季度华东区的销售额是多少", existing).id == 1
    assert find_near_duplicate("how did south china do last month", existing).id == 2
    assert find_near_duplicate("上季度华南区销售额是多少？", existing) is None  # another region is another question
    assert similarity("abc", "") == 0.0 and normalize_question("Ａ Ｂ！") == "ab"


def test_jsonl_errors_name_every_bad_line():
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    text = "\n".join([
        good,
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        "",
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}),
        json.dumps([1, 2]),
    ])
    parsed = parse_jsonl(text)
    assert len(parsed.samples) == 1
    assert [e.split(":")[0] for e in parsed.errors] == ["line 2", "line 3", "line 5", "line 6", "line 7"]
    assert "last message must be the assistant's" in parsed.errors[1]
    assert "'wizard'" in parsed.errors[2] and "not valid JSON" in parsed.errors[3]
