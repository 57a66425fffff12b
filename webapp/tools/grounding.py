"""A tool call's closed arguments held to what the user's own words spell.

A small model that learned to call `query_sales` still slips on values: asked about 上一季度
(last quarter) it may write this_quarter, asked about 销量 it may write revenue. The tool file
names every spelling of every closed value (enums and their aliases, or `[tool.spellings]`:
the words questions use) and lists in `ground` the parameters a question names directly (a
region, a period, a metric). When the question spells exactly one value of such a parameter and
the model wrote another value from the same closed set, or nothing, the spelled value is used.

A parameter whose pattern takes calendar periods (2026-Q3, 2026-07, 2026) is held to the one
period the question names by the calendar (2025年3月, 去年四季度, Q1 2026, March of last year:
webapp/tools/calendar.py), which a small model writes wrong in ways no closed set can hold
("3", "Q1 2026", last_quarter for Sept 2026); where the question names none and spells one
closed value (上月), a calendar value the model made up (2026-Q3) gives way to it.

The model's reading stands wherever the question may mean something else than the value it
spells: a period spelling qualified by a number next to it that the calendar does not read
(上个月3号); a period no tool form holds (上半年, H1 2025); a comparison or a negation anywhere
in the question (比去年, versus last quarter, 不要去年的); two values spelled (2025年3月到6月,
上个月也就是11月); anything else beside a period that says when (2025年底, 去年同期, 以来, up to,
a fiscal year); a relative period no closed set holds (上上个月, two months ago). A one-word Latin spelling counts only as the tool file writes it ("Central",
not "central estimate"). Only a turn's single first call is held: several calls (each region's
share, this year and last) are the model's plan.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from typing import Any, Iterable

from webapp.tools import calendar
from webapp.tools.registry import ToolSpec

_CONTRAST = re.compile(r"比|较|相对|对比|不|没|非|除|别|vs\.?|versus|compared|than|against|relative|"
                       r"\bnot\b|n't\b|except|excluding|without|other than", re.I)
# 一 in 一共, 一下, 一起, 一直 counts nothing
_NUMBER = re.compile(r"[0-9０-９二三四五六七八九十两]|一(?![共下起直些般样点])|\b[QH][1-4]\b", re.I)
_NEAR = 4  # characters either side of a spelling read for a qualifying number


def _matches(question: str, spelling: str):
    """Where `question` spells `spelling`: CJK anywhere; Latin as whole words, a single word
    with the tool file's own case, several words in any case."""
    if all(ord(ch) < 0x2E80 for ch in spelling):
        flags = re.IGNORECASE if " " in spelling.strip() else 0
        return re.finditer(rf"(?<![A-Za-z0-9_]){re.escape(spelling)}(?![A-Za-z0-9_])", question, flags)
    return re.finditer(re.escape(spelling), question)


def spelled(question: str, table: dict[str, str]) -> tuple[set[str], bool]:
    """(the values `question` spells, whether any spelling is qualified by a number next to it);
    longest spellings first, never one inside another ("今年以来" is not also "今年")."""
    taken: list[tuple[int, int]] = []
    values, qualified = set(), False
    for spelling in sorted(table, key=len, reverse=True):
        for match in _matches(question, spelling):
            start, end = match.span()
            if any(start < e and s < end for s, e in taken):
                continue
            taken.append((start, end))
            values.add(table[spelling])
            qualified |= bool(_NUMBER.search(question[max(0, start - _NEAR):start] + question[end:end + _NEAR]))
    return values, qualified


def _says_more(question: str, table: dict[str, str]) -> bool:
    """Whether the question says when in more words than the table's spellings."""
    for spelling in sorted(table, key=len, reverse=True):
        question = calendar.blank(question, [match.span() for match in _matches(question, spelling)])
    return calendar.says_when(question)


def closed_spellings(spec: ToolSpec, parameter: str) -> dict[str, str]:
    """Every spelling of the parameter's closed values -> the value: the tool file's spellings
    for questions where it lists them, else the enum and its aliases."""
    if spec.spellings.get(parameter):  # the whole list: an enum value may be a common word ("units")
        return {word: value for word, value in spec.spellings[parameter].items() if isinstance(value, str)}
    return _enum_and_aliases(spec, parameter)


def _enum_and_aliases(spec: ToolSpec, parameter: str) -> dict[str, str]:
    """The parameter's enum values (each its own spelling) and the tool file's aliases of them."""
    prop = (spec.parameters.get("properties") or {}).get(parameter) or {}
    table = {value: value for value in prop.get("enum", ()) if isinstance(value, str)}
    table.update({alias: value for alias, value in (spec.aliases.get(parameter) or {}).items() if isinstance(value, str)})
    return table


def asks_for(spec: ToolSpec, texts: list[str], today: dt.date | None = None) -> bool:
    """Whether the user's words name anything a call of this tool is held to: a spelling,
    enum value or alias of a grounded parameter's closed values, or a calendar period. A tool
    without grounded parameters is asked for by any words. A call to a grounded tool that
    nothing in them names made every value up (早上好 answered with 华南's sales this month)."""
    if not spec.ground:
        return True
    today = today or dt.date.today()
    for text in texts:
        text = unicodedata.normalize("NFKC", text)
        if calendar.read(text, today):
            return True
        for parameter in spec.ground:
            if spelled(text, {**_enum_and_aliases(spec, parameter), **closed_spellings(spec, parameter)})[0]:
                return True
    return False


_CALENDAR_FORMS = ("2026-07", "2026-Q3", "2026")


def _takes_calendar(spec: ToolSpec, parameter: str) -> str | None:
    """The parameter's pattern where it takes calendar periods."""
    pattern = ((spec.parameters.get("properties") or {}).get(parameter) or {}).get("pattern")
    try:
        return pattern if pattern and any(re.fullmatch(pattern, form) for form in _CALENDAR_FORMS) else None
    except re.error:
        return None


def held_values(spec: ToolSpec, question: str, today: dt.date | None = None) -> dict[str, tuple[str, bool]]:
    """Each grounded parameter's value the question alone holds -> (the value, whether the
    calendar read it): the one period it names where the parameter takes calendar periods,
    else the one closed value it spells, unqualified. Nothing under a contrast or negation."""
    question = unicodedata.normalize("NFKC", question)  # ｅｘｃｅｐｔ is except
    if not spec.ground or _CONTRAST.search(question):
        return {}
    today = today or dt.date.today()
    mentions = calendar.read(question, today)
    period, named = calendar.one_period(question, mentions)
    # the calendar's words are its own: 今年 in 今年3月 spells no closed value
    rest = calendar.blank(question, ((m.start, m.end) for m in mentions))
    held: dict[str, tuple[str, bool]] = {}
    for parameter in sorted(spec.ground):
        table = closed_spellings(spec, parameter)
        values, qualified = spelled(rest, table)
        pattern = _takes_calendar(spec, parameter)
        if named and pattern:  # the question names the calendar: it holds the value, or nothing does
            if period is not None and not values and re.fullmatch(pattern, period.form):
                held[parameter] = (period.form, True)
            continue
        # a number beside a spelled period makes it a finer one (上个月3号); beside other values
        # it is what is asked about (一共卖了多少台, 前3名)
        if len(set(table.values())) < 2 or len(values) != 1 or (qualified and pattern):
            continue
        # a period spelling beside other words of time (去年同期, 上个季度之前那个季度, the last
        # quarter of 2025) is part of a longer reading: the model's may be the better one
        if pattern and _says_more(rest, table):
            continue
        held[parameter] = (values.pop(), False)
    return held


def ground_arguments(spec: ToolSpec, arguments: dict[str, Any], question: str,
                     today: dt.date | None = None) -> tuple[dict[str, Any], dict]:
    """(arguments, {parameter: the model's value}) for every argument the question overruled."""
    result, overruled = dict(arguments), {}
    for parameter, (value, by_calendar) in held_values(spec, question, today).items():
        current = result.get(parameter)
        if by_calendar:
            if current != value:
                overruled[parameter] = current
                result[parameter] = value
            continue
        default = ((spec.parameters.get("properties") or {}).get(parameter) or {}).get("default")
        # a calendar value the model wrote where the spelled value is all the question says of
        # when (上月 -> 2026-Q3) is its own guess; other values outside the set: validation's
        if (current if current is not None else default) != value and (
                current is None or current in closed_spellings(spec, parameter).values()
                or _takes_calendar(spec, parameter)):
            overruled[parameter] = current
            result[parameter] = value
    return result, overruled


# Messages that spell a whole call and still ask for no figure: work on text they hand over
# (translate, summarise, rewrite, draft), how a figure is defined or computed, a figure already
# seen. The values they spell are the text's or the topic's.
_NO_FIGURE_ASKED = re.compile(
    r"翻译|译成|概括|总结|摘要|改写|润色|校对|起草|拟[一个封份]|写[一个封份段条句篇]|"
    r"怎么算|如何算|怎么计算|如何计算|计算方法|口径|定义|什么意思|含义|指的是|看过|看到了|收到|知道了|"
    r"\b(?:translate|summari[sz]e|rewrite|rephrase|paraphrase|proofread|draft|write|compose|polish|"
    r"calculated|computed|defined|definition|define|meaning|got it|already)\b", re.I)


def spelled_call(spec: ToolSpec, question: str, today: dt.date | None = None) -> dict[str, str] | None:
    """The arguments of a call of this tool that the question spells whole: a value held for
    every grounded parameter (a region, a period and a metric), or None. An answer in prose
    to such a question cannot hold the figure it asks for. A message asking for none spells
    none (请把这句话翻译成英文：华南区本月销量创新高; 华东上个月的销售额是怎么算的？)."""
    if not spec.ground or _NO_FIGURE_ASKED.search(unicodedata.normalize("NFKC", question)):
        return None
    held = held_values(spec, question, today)
    return {parameter: value for parameter, (value, _) in held.items()} if set(held) == set(spec.ground) else None


def spelled_tool(specs: Iterable[ToolSpec], question: str, today: dt.date | None = None) -> ToolSpec | None:
    """The one tool of `specs` whose whole call the question spells (spelled_call), or None
    where none or several do: what serving and the gate decode an answer without a call as."""
    spelled = [spec for spec in specs if spelled_call(spec, question, today) is not None]
    return spelled[0] if len(spelled) == 1 else None
