import json

import pytest

from finetune.samples import (
    Existing,
    assign_split,
    export_line,
    find_near_duplicate,
    normalize_question,
    parse_jsonl,
    scrub_messages,
    scrub_pii,
    similarity,
    to_openai,
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


def test_passages_travel_with_the_question_scrubbed_and_checked():
    """A question keeps the document passages it was served with (in exports and imports too):
    their text is scrubbed like any content, and a malformed "passages" names its line."""
    passages = [{"title": "通讯录", "text": "财务部 电话 13912345678"}]
    messages = to_openai(scrub_messages([{"role": "user", "content": "财务部电话？", "passages": passages},
                                         {"role": "assistant", "content": "见 [1]。"}]))
    assert messages[0]["passages"] == [{"title": "通讯录", "text": "财务部 电话 [PHONE]"}]
    good = {"messages": messages}
    bad_shape = {"messages": [{"role": "user", "content": "q", "passages": "a document"},
                              {"role": "assistant", "content": "a"}]}
    on_assistant = {"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a", "passages": passages}]}
    parsed = parse_jsonl("\n".join(json.dumps(s, ensure_ascii=False) for s in (good, bad_shape, on_assistant)))
    assert len(parsed.samples) == 1 and [e.split(":")[0] for e in parsed.errors] == ["line 2", "line 3"]
    assert all("passages must be a list" in e for e in parsed.errors)
    # exported for TRL or LLaMA-Factory, which would drop the key: written into the question
    exported = json.loads(export_line({"id": 1, "department_id": "finance", "split": "train", "origin": "correction",
                                       "reason": "wrong_fact", "tools": None, "messages": json.dumps(messages)}))
    question = exported["messages"][0]
    assert question["content"].startswith("Passages from")
    assert question["content"].endswith("[1] 通讯录\n财务部 电话 [PHONE]\n\n财务部电话？")
    # ... and imported back into hangjia, the question is the question again, its passages kept
    assert parse_jsonl(json.dumps(exported, ensure_ascii=False)).samples[0]["messages"] == messages


def test_samples_stored_with_passages_in_the_system_message_train_on_the_served_layout(test_tokenizer_dir):
    """Before the passages moved next to the question they sat in the system message; such a
    stored sample must render exactly as the same question is served now."""
    from transformers import AutoTokenizer

    from serving.chat_format import (
        knowledge_block,
        passages_moved_to_the_question,
        render_chat,
        system_message,
        with_passages,
    )

    passages = [{"title": "Handbook", "location": "5.3", "text": "10 days of sick leave."}]
    old_system = {"role": "system", "content": "sys\n\n" + knowledge_block(passages)}
    stored = [old_system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Sick days?"}, {"role": "assistant", "content": "10 [1]."}]
    served = [system_message("sys"), *with_passages(stored[1:], passages)]
    moved = passages_moved_to_the_question(stored)
    assert moved[0] == {"role": "system", "content": "sys"} and stored[0] == old_system  # a copy
    tokenizer = AutoTokenizer.from_pretrained(test_tokenizer_dir)
    assert render_chat(tokenizer, moved, add_generation_prompt=False) == \
        render_chat(tokenizer, served, add_generation_prompt=False)
    assert passages_moved_to_the_question(served) == served  # the new layout is left alone

