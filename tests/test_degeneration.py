"""A generation that falls into a loop is stopped early and the user is told: the worst answer
of a small model is a short wrong one, not a page of junk."""

import json

import pytest

from serving.degeneration import DegenerationWatch, copies_tools, tool_copies
from storage import chats

# what the embedded model wrote for 上季度华东区的销售额是多少？: the tool schemas copied back
SCHEMA_COPY = '{"name": "query_sales", "arguments": ' + "".join(
    '{"data": {"type": "object", "properties": ' for _ in range(40)) + '{"type": "string"}'
LINES = "华东区销售额为1234万元。\n" * 30
PHRASE = "The sales were good and " * 40
# what the embedded model wrote for 上个月华南区的销售额是多少？ after a night: one short item, numbered
NUMBERED = "[2] 在约场的走动\n\n[3] 恵案\n\n[4] 富少的生命\n\n" + "".join(f"[{n}] 屋槁\n\n" for n in range(5, 60))
BULLETS = "".join(f"{n}. 华南\n" for n in range(1, 40))
# the same question after another night: two characters over and over
PAIR = "[2] 团宝" + "走害" * 100


def watched(text: str, step: int = 7) -> int | None:
    """Characters streamed when the watch stops the text, or None."""
    watch = DegenerationWatch()
    for end in range(step, len(text) + step, step):
        if watch.degenerate(text[:end]):
            return end
    return None


@pytest.mark.parametrize("junk", [SCHEMA_COPY, LINES, PHRASE, NUMBERED, BULLETS, PAIR],
                         ids=["nested JSON", "lines", "phrase", "numbered item", "numbered short item", "two characters"])
def test_a_loop_is_stopped_within_a_few_hundred_characters(junk):
    stopped = watched(junk)
    assert stopped is not None and stopped < 400


@pytest.mark.parametrize("answer", [
    "上季度华东区销售额为 12,345,678 元，同比增长 8.2%。\n\n主要来自消费电子（+12%）和软件服务（+5%）；"
    "工业设备下降 3%。\n\n| 产品线 | 销售额 | 同比 |\n|---|---|---|\n| 消费电子 | 6,100,000 | +12% |\n"
    "| 软件服务 | 3,200,000 | +5% |\n| 工业设备 | 3,045,678 | -3% |\n\n" + "=" * 40 + "\nSources: [1] [2]",
    '<tool_call>\n{"name": "create_ticket", "arguments": {"title": "VPN", "details": {"steps": [{"n": 1, '
    '"text": "reboot"}, {"n": 2, "text": "reinstall"}]}, "tags": ["it", "vpn"]}}\n</tool_call>',
    "def total(rows):\n    for row in rows:\n        if row:\n            yield {\n                'a': [1, 2],\n"
    "            }\n        }\n    }\n}\n" + "Step 1: open the form.\nStep 2: fill it in.\nStep 3: submit it.\n",
    "Yes. Yes. Yes, the policy allows it: claims up to 5,000 yuan need one approval, above that two.",
    "".join(f'<tool_call>\n{{"name": "query_sales", "arguments": {{"region": "华东", "period": "{p}"}}}}\n</tool_call>\n'
            for p in ("2025-Q1", "2025-Q2", "2025-Q3", "2025-Q4", "2025")),  # five calls in one turn
    "Bands: [0, 10), [10, 20), [20, 30), [30, 40), [40, 50), [50, 60), [60, 70) and [70, 80).",
    "Checklist:\n1. 发票\n2. 合同\n3. 发票\n4. 收据\n5. 发票\n6. 合同\n7. 发票\n- 是\n- 否\n- 是\n- 否",
    "}\n}\n}\n}\n}\n}\n",
    "Total\n" + "-=" * 40 + "\n" + "─ " * 40 + "\n" + "* " * 30 + "\nDone.",  # rules of two characters
    "".join(f"{n}. 符合\n" for n in range(1, 7)) + "以上六项均符合规定，可以报销。",  # a checklist, all compliant
    "- PASS\n" * 6 + "- [ ]\n" * 6 + "1. ________\n2. ________\n3. ________\n4. ________\n5. ________\n",
    "prices = [\n" + "  0.0,\n" * 8 + "]\n" + "".join(f"{n}.50\n" for n in range(1, 9)),
    "".join(f"{h:02d}:00 空闲\n" for h in range(8, 18)) + "2.0.1 修复\n2.0.2 修复\n2.0.3 修复\n2.0.4 修复\n2.0.5 修复\n",

    "def check(row):\n    if not row:\n        return None\n    if row.bad:\n        return None\n    if row.old:\n"
    "        return None\n    if row.gone:\n        return None\n    if row.void:\n        return None\n    return row\n",
])
def test_real_answers_are_left_alone(answer):
    assert watched(answer) is None


def test_a_looping_turn_ends_early_says_so_and_runs_nothing(services, script):
    model = script(SCHEMA_COPY * 3)
    user = services.auth.current_user("finance-employee")
    final = list(services.engine.turns.stream_turn(user, "上季度华东区的销售额是多少？"))[-1]
    assert final.done and not [i for i in final.items if i["type"] == "tool"]
    notice = [i for i in final.items if i["type"] == "notice"]
    assert notice and "✂️" in notice[0]["content"] and "cut" in notice[0]["content"]
    assert len(model.prompts) == 1  # no second round on what the loop wrote
    stored = services.db.query_one("SELECT role, finish_reason FROM messages WHERE id = ?", [final.message_id])
    assert stored == {"role": "assistant", "finish_reason": "degenerate"}
    assert len(json.dumps(final.answer)) < 400




TOOLS = [{"type": "function", "function": {
    "name": "query_sales", "description": "Query the company sales system for one region and period.",
    "parameters": {"type": "object", "properties": {
        "region": {"type": "string", "description": "Sales region: 华东 East China, 华南 South China, 华北 North China."},
        "period": {"type": "string", "description": "2026-Q3, 2026-07, or last_quarter."},
        "metric": {"type": "string", "description": "销售额（元）或销量（台、件）"}}}}}]
# what the embedded model wrote after a night for 帮我拉一下华东地区去年全年的销量
SCHEMA_ECHO = ('```\n{\n  "type": "function",\n  "function": {\n    "name": "query_sales",\n    "description": '
               '"Query the company sales system for one region and period. Returns the value')


def copy_read(text: str, tools=TOOLS, step: int = 5) -> tuple[bool | None, int]:
    """(what copies_tools said once it could tell, or at the end; characters streamed by then)."""
    copies = tool_copies(tools)
    for end in range(step, len(text) + step, step):
        said = copies_tools(text[:end], copies)
        if said is not None:
            return said, end
    return None, len(text)


@pytest.mark.parametrize("echo", [
    SCHEMA_ECHO,
    '{"type": "function", "function": {"name": "query_sales"}}',
    "```python\ndef query_sales(region):\n    description = 'Query the company sales system for one region and period.'",
    "```\nmetric: 销售额（元）或销量（台、件）\n```",  # a short Chinese description, whole
    "<think>销量问题</think>\n```\n" + SCHEMA_ECHO[4:],
], ids=["the schema", "compact JSON", "a description in code", "a short description", "after thinking"])
def test_an_answer_copying_the_offered_tools_back_as_code_is_told_within_its_first_characters(echo):
    said, streamed = copy_read(echo)
    assert said is True and streamed <= 200
    assert copy_read(echo, tools=())[0] is False  # a turn without tools has nothing to copy


@pytest.mark.parametrize("answer", [
    "- query_sales: Query the company sales system for one region and period.",  # what can you do?
    "Sales region: 华东 East China, 华南 South China, 华北 North China.",  # 有哪些区域？
    "period 可以写 2026-Q3, 2026-07, or last_quarter 等。",
    '<tool_call>\n{"type": "function", "function": {"name": "query_sales", "arguments": {"region": "华东"}}}\n</tool_call>',
    "<think>The tool: Query the company sales system for one region and period. I call it.</think>\n上季度华东区"
    "销售额为 1,200 万元。",
    "```sql\nSELECT region, SUM(amount) FROM sales WHERE quarter = '2026-Q3' GROUP BY region;\n```" + " " * 200,
    "```",  # an answer that ends while it still may be anything: not a copy
])
def test_answers_that_explain_a_tool_call_it_or_write_other_code_are_not_copies(answer):
    assert copy_read(answer)[0] in (False, None)


def test_an_answer_copying_the_tools_is_decoded_again_without_its_first_token_and_its_call_runs(services, script):
    model = script(SCHEMA_ECHO * 2,
                   '<tool_call>\n{"name": "query_sales", "arguments": {"region": "华东", "period": "last_year", '
                   '"metric": "units"}}\n</tool_call>',
                   "华东地区去年全年销量见上面的数据。")
    user = services.auth.current_user("finance-employee")
    updates = list(services.engine.turns.stream_turn(user, "帮我拉一下华东地区去年全年的销量"))
    final = updates[-1]
    assert model.not_first[:2] == [frozenset(), frozenset({ord("`")})]  # the copy's first "token", kept out
    assert not any('"type"' in i.get("content", "") for u in updates for i in u.items)  # the copy was never shown
    tools = [i for i in final.items if i["type"] == "tool"]
    assert [(t["tool"], t["status"], t["arguments"]["metric"]) for t in tools] == [("query_sales", "ok", "units")]
    assert final.answer == "华东地区去年全年销量见上面的数据。"
    assert not [i for i in final.items if i["type"] == "notice"]
    messages = chats.list_messages(services.db, final.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant"]  # the copy is not kept
    assert not any('"type"' in m.content for m in messages)


def test_an_answer_that_keeps_copying_the_tools_is_cut_and_the_user_told_why(services, script):
    model = script(SCHEMA_ECHO, SCHEMA_ECHO[3:], " " + SCHEMA_ECHO)
    user = services.auth.current_user("finance-employee")
    updates = list(services.engine.turns.stream_turn(user, "帮我拉一下华东地区去年全年的销量"))
    final = updates[-1]
    assert model.not_first == [frozenset(), frozenset({ord("`")}), frozenset({ord("`"), ord("\n")})]
    assert not any('"type"' in i.get("content", "") for u in updates for i in u.items)  # never shown
    assert final.done and not [i for i in final.items if i["type"] == "tool"]
    notice = [i["content"] for i in final.items if i["type"] == "notice"]
    assert notice and "copied the tools' definitions back" in notice[0] and "工具的定义" in notice[0]
    stored = services.db.query_one("SELECT finish_reason FROM messages WHERE id = ?", [final.message_id])
    assert stored == {"finish_reason": "degenerate"}


def test_a_copy_after_thinking_is_cut_without_decoding_again(services, script):
    """Its first token is <think>: keeping that out would keep the model from thinking, not from copying."""
    model = script("<think>销量</think>\n" + SCHEMA_ECHO)
    user = services.auth.current_user("finance-employee")
    final = list(services.engine.turns.stream_turn(user, "帮我拉一下华东地区去年全年的销量"))[-1]
    assert model.not_first == [frozenset()]
    assert [i["type"] for i in final.items if i["type"] != "sources"] == ["notice"]


def test_a_cut_copy_is_not_shown_to_the_model_in_the_next_turn(services, script):
    model = script(SCHEMA_ECHO, SCHEMA_ECHO[3:], " " + SCHEMA_ECHO, "好的，我来查。")
    user = services.auth.current_user("finance-employee")
    first = list(services.engine.turns.stream_turn(user, "帮我拉一下华东地区去年全年的销量"))[-1]
    list(services.engine.turns.stream_turn(user, "再试一次", first.conversation_id))
    assert "帮我拉一下华东地区去年全年的销量" in model.prompts[-1]
    assert '```\n{\n  "type": "function"' not in model.prompts[-1]  # the tools block itself is compact JSON
    stored = chats.list_messages(services.db, first.conversation_id)
    assert SCHEMA_ECHO[:20] in stored[1].content and stored[1].finish_reason == "degenerate"  # kept for reviewers
