"""A tool call's closed arguments held to what the user's own words spell.

A small model that learned to call `query_sales` still slips on values: asked about 上一季度
(last quarter) it may write this_quarter, asked about 去年 it may write this_year. The tool
file names every spelling of every closed value (enums and their aliases), and lists in
`ground` the required parameters a question names directly (a region, a period). When the
question spells exactly one value of such a parameter and the model wrote another value from
the same closed set, or nothing, the spelled value is used.

The model's reading stands wherever the question may mean something else than the value it
spells: a value outside the closed set (an explicit "2025-Q4"); a spelling qualified by a
number next to it (今年3月, 去年四季度, Q4 last year: a finer period than the closed set
holds); a comparison or a negation anywhere in the question (比去年, versus last quarter,
不要去年的); two values spelled. A one-word Latin spelling counts only as the tool file writes
it ("Central", not "central estimate"). Only a turn's single first call is held: several
calls (each region's share, this year and last) are the model's plan.
"""

from __future__ import annotations

import re
from typing import Any

from webapp.tools.registry import ToolSpec

_CONTRAST = re.compile(r"比|较|相对|对比|不|没|非|除|别|vs\.?|versus|compared|than|against|relative|"
                       r"\bnot\b|n't\b|except|excluding|without|other than", re.I)
_NUMBER = re.compile(r"[0-9０-９一二三四五六七八九十两]|\b[QH][1-4]\b", re.I)
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


def closed_spellings(spec: ToolSpec, parameter: str) -> dict[str, str]:
    """Every spelling of the parameter's closed values -> the value: its enum and the tool
    file's aliases."""
    prop = (spec.parameters.get("properties") or {}).get(parameter) or {}
    table = {value: value for value in prop.get("enum", ()) if isinstance(value, str)}
    table.update({alias: value for alias, value in (spec.aliases.get(parameter) or {}).items() if isinstance(value, str)})
    return table


def ground_arguments(spec: ToolSpec, arguments: dict[str, Any], question: str) -> tuple[dict[str, Any], dict]:
    """(arguments, {parameter: the model's value}) for every argument the question overruled."""
    if not spec.ground or _CONTRAST.search(question):
        return dict(arguments), {}
    result, overruled = dict(arguments), {}
    for parameter in sorted(spec.ground):
        table = closed_spellings(spec, parameter)
        if len(set(table.values())) < 2:
            continue
        values, qualified = spelled(question, table)
        if len(values) != 1 or qualified:
            continue
        (value,) = values
        current = result.get(parameter)
        if current != value and (current is None or current in table.values()):
            overruled[parameter] = current
            result[parameter] = value
    return result, overruled
