"""Explicit calendar periods in a question, as the forms tools take: 2025-03, 2025-Q4, 2025.

Employees name periods by the calendar as often as relatively: 2025年3月, 25年Q2, 去年四季度,
Q1 2026, Sept 2026, March of last year, "for 2025 as a whole". A small model writes these
wrong in ways no closed set can hold ("3", "Q1 2026", last_quarter for Sept 2026), and the tool
file cannot list them as aliases. This module reads them, with the year a relative word names
(今年, 去年, last year) resolved against today.

Each reading keeps its place in the question, so the caller can tell a question that names one
period from one that names two (2025年3月到6月, Q1 to Q3 2025), or a period plus a month or
quarter whose year it does not say. Periods no such form holds (上半年, H1 2025, weeks) are read
too, as a form no tool pattern accepts, so that they are never mistaken for the one period
asked about. Fiscal years (FY2025) are not read: their months depend on the company.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass

_CN_DIGIT = {"一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}
_MONTH_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9,
                "oct": 10, "nov": 11, "dec": 12}
_ORDINAL = {"first": 1, "1st": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3, "fourth": 4, "4th": 4, "last": 4}
_RELATIVE_YEAR = {"今年": 0, "本年": 0, "去年": -1, "上年": -1, "前年": -2, "明年": 1,
                  "this year": 0, "current year": 0, "last year": -1, "previous year": -1, "next year": 1}


@dataclass(frozen=True)
class Mention:
    start: int
    end: int
    form: str  # 2025-03, 2025-Q4, 2025; 2025-H1 or ? where no tool form holds it


def _cn_number(text: str) -> int | None:
    if text.isdigit():
        return int(text)
    if text == "十":
        return 10
    if len(text) == 2 and text[0] == "十":
        return 10 + _CN_DIGIT.get(text[1], 99)
    if len(text) == 1:
        return _CN_DIGIT.get(text)
    return None


def _year(text: str, today: dt.date) -> int | None:
    text = text.strip().lower().rstrip("'s").strip()
    if text in _RELATIVE_YEAR:
        return today.year + _RELATIVE_YEAR[text]
    digits = text.lstrip("'’")
    if re.fullmatch(r"\d{4}", digits):
        return int(digits)
    if re.fullmatch(r"\d{2}", digits):
        return 2000 + int(digits)
    return None


def _month(text: str) -> int | None:
    text = text.lower()
    if text[:3] in _MONTH_NAMES:
        return _MONTH_NAMES[text[:3]]
    value = _cn_number(text)
    return value if value and 1 <= value <= 12 else None


# A year: 2025年, 25年 (two digits only before a month or quarter), 今年, 去年, 2025年度.
_ZH_YEAR = r"(?:(?<![0-9])(?P<year>\d{4}|\d{2})|(?P<rel>今|本|去|上|前|明))\s*年度?(?:的)?\s*"
_ZH_QUARTER = r"(?:第?(?P<q>[一二三四1-4])\s*(?:季度|季)|[Qq](?P<qq>[1-4])(?![0-9]))"
_ZH_MONTH = r"(?P<m>1[0-2]|0?[1-9]|十[一二]?|[一二三四五六七八九])\s*月份?"
_ZH_HALF = r"(?P<h>上|下)半年"
_EN_MONTH = (r"(?P<mn>jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
             r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)(?![a-z])\.?")
_EN_YEAR = r"(?P<ey>(?:19|20)\d\d|['’]\d\d|this year|current year|last year|previous year|next year)(?:['’]s)?"
_EN_QUARTER = r"(?:q(?P<eq>[1-4])|(?:the\s+)?(?P<eo>first|second|third|fourth|1st|2nd|3rd|4th)\s+quarter)"
_EN_HALF = r"(?:h(?P<eh>[12])|(?:the\s+)?(?P<eho>first|second)\s+half)"

_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("zh-quarter", re.compile(_ZH_YEAR + _ZH_QUARTER)),
    ("zh-month", re.compile(_ZH_YEAR + _ZH_MONTH)),
    ("zh-half", re.compile(_ZH_YEAR + _ZH_HALF)),
    ("iso-quarter", re.compile(r"(?<![0-9])(?P<year>(?:19|20)\d\d)\s*[-/ ]?\s*[Qq](?P<qq>[1-4])(?![0-9])")),
    ("iso-month", re.compile(r"(?<![0-9])(?P<year>(?:19|20)\d\d)\s*[-/.]\s*(?P<m>1[0-2]|0?[1-9])(?![0-9])")),
    ("en-quarter", re.compile(r"(?<![a-z0-9])" + _EN_QUARTER + r"(?:\s*,?\s*(?:of\s+|in\s+)?)" + _EN_YEAR
                              + r"(?![0-9])", re.I)),
    ("en-year-quarter", re.compile(r"(?<![a-z0-9])" + _EN_YEAR + r"\s+" + _EN_QUARTER + r"(?![a-z0-9])", re.I)),
    ("en-half", re.compile(r"(?<![a-z0-9])" + _EN_HALF + r"(?:\s*,?\s*(?:of\s+|in\s+)?)" + _EN_YEAR
                           + r"(?![0-9])", re.I)),
    ("en-month", re.compile(r"(?<![a-z])" + _EN_MONTH + r"(?:\s*,?\s*(?:of\s+|in\s+)?)" + _EN_YEAR
                            + r"(?![0-9])", re.I)),
    ("en-year-month", re.compile(r"(?<![a-z0-9])" + _EN_YEAR + r"\s+" + _EN_MONTH + r"(?![a-z])", re.I)),
    # a year alone: 2025年 / 2025年度 / 2025全年 in Chinese; in English only where the words
    # around it make it a year (in 2025, for 2025, 2025 as a whole), not a quantity (2025 units)
    ("zh-year", re.compile(r"(?<![0-9])(?P<year>(?:19|20)\d\d)\s*(?:年度?|全年)(?!\s*(?:\d|[一二三四五六七八九十]|第|[Qq]\d))")),
    ("en-year", re.compile(r"(?:(?<![a-z])(?:in|for|during|throughout|over|of|year|calendar year)\s+"
                           r"(?P<ey>(?:19|20)\d\d)(?![0-9])(?!\s*(?:units?|pcs|people|yuan|rmb|usd|dollars?)\b)"
                           r"|(?<![0-9a-z])(?P<ey2>(?:19|20)\d\d)(?:['’]s|\s+(?:as a whole|full[- ]year|overall|in total))"
                           r"(?![a-z]))", re.I)),
]
# What names a month, quarter or half without its year: with a period read above, a second one.
_BARE = re.compile(r"第?[一二三四1-4]\s*季度|(?<![0-9a-z])[qh][1-4](?![0-9])|(?<![0-9])(?:1[0-2]|0?[1-9])\s*月(?!底|初)|"
                   r"[一二三四五六七八九十]{1,2}\s*月(?!底|初)|[上下]半年|(?<![a-z])(?:january|february|march|april|june|july|"
                   r"august|september|october|november|december|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec)\.?(?![a-z])|"
                   r"(?:first|second|third|fourth|1st|2nd|3rd|4th)\s+(?:quarter|half)", re.I)
# A period from one point on, or between two: not one period the tool can be asked for.
_SPAN = re.compile(r"以来|至今|截至|截止|起至|之后|以后|之前|以前|since|until|through|onwards?|so far|to date|"
                   r"between|before|after", re.I)


def read(question: str, today: dt.date) -> list[Mention]:
    """The calendar periods `question` names explicitly, in order, none inside another."""
    text = unicodedata.normalize("NFKC", question)
    found: list[Mention] = []
    for kind, pattern in _PATTERNS:
        for match in pattern.finditer(text):
            start, end = match.span()
            if any(start < m.end and m.start < end for m in found):
                continue
            form = _form(kind, match.groupdict(), today)
            if form is not None:
                found.append(Mention(start, end, form))
    return sorted(found, key=lambda m: m.start)


def _form(kind: str, groups: dict, today: dt.date) -> str | None:
    raw_year = groups.get("year") or (groups["rel"] + "年" if groups.get("rel") else None)
    year = _year(raw_year or groups.get("ey") or groups.get("ey2") or "", today)
    if year is None or not 1990 <= year <= 2099:
        return None
    quarter = groups.get("q") or groups.get("qq") or groups.get("eq")
    if quarter:
        return f"{year}-Q{_cn_number(quarter)}"
    if groups.get("eo"):
        return f"{year}-Q{_ORDINAL[groups['eo'].lower()]}"
    month = groups.get("m") or groups.get("mn")
    if month:
        number = _month(month)
        return f"{year}-{number:02d}" if number else None
    if groups.get("h") or groups.get("eh") or groups.get("eho"):
        half = 1 if (groups.get("h") == "上" or groups.get("eh") == "1" or (groups.get("eho") or "").lower() == "first") else 2
        return f"{year}-H{half}"
    return str(year)


def the_period(question: str, today: dt.date) -> tuple[Mention | None, bool]:
    """(the one explicit period the question names, whether it names any). None with True:
    it names several, or one with another month or quarter beside it, or one from a point
    on (2025年3月以来, since March 2025): which period is meant is not this module's to say."""
    mentions = read(question, today)
    if not mentions:
        return None, False
    if len({m.form for m in mentions}) > 1 or _SPAN.search(question):
        return None, True
    rest = unicodedata.normalize("NFKC", question)
    for m in mentions:
        rest = rest[:m.start] + " " * (m.end - m.start) + rest[m.end:]
    if _BARE.search(rest):
        return None, True
    return mentions[0], True
