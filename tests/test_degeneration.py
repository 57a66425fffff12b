"""A generation that falls into a loop is stopped early and the user is told: the worst answer
of a small model is a short wrong one, not a page of junk."""

import json

import pytest

from serving.degeneration import DegenerationWatch

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

