"""Explicit calendar periods read from questions (webapp/tools/calendar.py)."""

import datetime as dt

import pytest

from webapp.tools.calendar import the_period

TODAY = dt.date(2026, 12, 7)


@pytest.mark.parametrize("question, form", [
    ("西南片区2025年第三季度销量是多少，谢谢", "2025-Q3"),
    ("华南25年Q2的销售收入有多少？", "2025-Q2"),
    ("西南2026年7月份销售额", "2026-07"),
    ("西南24年全年销量", "2024"),  # two digits and a whole year
    ("华东25年度营收", "2025"),
    ("2026年十一月华东卖了多少台", "2026-11"),
    ("今年3月华东的销售额是多少", "2026-03"),
    ("华东去年四季度卖了多少？", "2025-Q4"),
    ("华北前年第1季度营收", "2024-Q1"),
    ("华北2025年全年销量", "2025"),
    ("华东2025年度销售额", "2025"),
    ("华东2025Q3", "2025-Q3"),
    ("2026-07 华南 revenue", "2026-07"),
    ("Q1 2026 revenue for East China", "2026-Q1"),
    ("q3'25 units, North China", "2025-Q3"),
    ("East China sales in Sept 2026", "2026-09"),
    ("What did North China sell in March of last year?", "2025-03"),
    ("Q4 last year South China", "2025-Q4"),
    ("last year's Q4 revenue, South China", "2025-Q4"),
    ("the fourth quarter of 2025 in Central China", "2025-Q4"),
    ("South China revenue for 2025 as a whole", "2025"),
    ("How many units did East sell in 2025?", "2025"),
    ("May 2025 East China units", "2025-05"),
    ("H1 2025 East China revenue", "2025-H1"),  # named, but no tool form holds it
    # words around the period that say nothing of when: a count (一个数), a dash between clauses
    ("华北区 2024 年的总营收给我一个数", "2024"),
    ("Finance is reconciling — what's South China's revenue for March 2026?", "2026-03"),
    ("2025年3月华东的销量发我一下~谢谢", "2025-03"),
])
def test_one_explicit_period_is_read_as_a_tool_form(question, form):
    period, named = the_period(question, TODAY)
    assert named and period is not None and period.form == form


@pytest.mark.parametrize("question", [
    "2025年3月到6月华东销量",  # two months
    "华东2025年3月以来的销售额",  # from a point on
    "Q1 to Q3 2025 East China",
    "East China revenue since March 2025",
    "华东2025年和2026年的销售额",
    "2025年3月和4月华东销量",  # a month whose year it does not say, beside the period
    # a year with what narrows it: not the whole year
    "2025年底华东销售额", "华东2025年双十一销量", "first 3 months of 2025, East China", "2025年同期华东营收",
    "华东2025年每月销量", "end of 2025 revenue, East", "华东2025年这时候的销量",
    # two years, or a day or a range inside a month
    "2024和2025年华东销售额", "East China revenue in 2024 and 2025", "2025年3月1日到15日华东销量",
    # up to, or on from, a point
    "East China revenue by March 2025", "2025年3月起华东销量", "East China revenue up to March 2025",
    "revenue from March 2025, East China",
    # fiscal years: their months are the company's
    "FY2025Q3 East China", "财年2025年第三季度华东营收",
    # relative periods no closed set holds
    "华东上上个月销量", "华东上上季度的销售额", "East China revenue the month before last",
    "East China revenue two quarters ago", "华东三个月前的销量",
])
def test_several_periods_or_a_span_are_not_one_period(question):
    assert the_period(question, TODAY)[0] is None


@pytest.mark.parametrize("question", [
    "华东上个月销售额",  # relative periods are the tool file's closed values, not the calendar's
    "East China sold 2025 units last month?",  # a quantity, not a year
    "工作25年的员工有多少",
    "华东24年销售额",  # two digits alone may be a count of years
    "近24年度的销量",
    "连续24年度盈利的华东",  # counts of years, whole
    "营业24年全年无休的门店销量",
    "华东35年度目标",  # past next year: a plan's number, not a period with sales
    "FY2025 revenue",  # fiscal years: their months depend on the company
    "华东上半年销量",  # half of which year?
    "What's the market share in East China?",  # mar- is not March
    "Can you decrease the budget?",
    "华东销售额是2025.6万吗",  # an amount
    "contract HT-2025-07 for East China", "合同HT2025-08的金额",  # contract numbers
    "Did East China sell over 2000 machines?", "sales of 2000 orders in East China",
    "近10年3月份华东的销量", "请说明年度第一季度的安排",  # ten years; 说明 + 年度
    "Hi Jan, 2025 revenue for East China", "revenue in 2025 may have dipped",  # a name; a verb
])
def test_no_calendar_period(question):
    assert the_period(question, TODAY) == (None, False)
