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
asked about. A question with a fiscal year (FY2025, 财年) names no calendar period this module
hands over: its months depend on the company.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass

_CN_DIGIT = {"一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}
_MONTH_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9,
                "oct": 10, "nov": 11, "dec": 12}
_ORDINAL = {"first": 1, "1st": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3, "fourth": 4, "4th": 4}
_RELATIVE_YEAR = {"今年": 0, "本年": 0, "去年": -1, "上年": -1, "前年": -2, "明年": 1,
                  "this year": 0, "current year": 0, "last year": -1, "previous year": -1, "next year": 1}


@dataclass(frozen=True)
class Mention:
    start: int
    end: int
    form: str  # 2025-03, 2025-Q4, 2025; 2025-H1, or ? (上上个月, two months ago), where no tool form holds it


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
    text = re.sub(r"['’]s$", "", text.strip().lower()).strip()
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


# A year: 2025年, 25年 (two digits from 20 to 39, only before a month or quarter: 近10年3月 is ten
# years), 今年, 去年, 2025年度. A relative year word only where it is one (说明年度 is not 明年).
_NOT_BEFORE_RELATIVE = "说目提当之以眼如至从空先此事向跟面生现古迄而过失进出回下离死除聪透"
_ZH_YEAR = (r"(?:(?<![0-9A-Za-z\-_/.])(?P<year>(?:19|20)\d\d)|(?<![0-9A-Za-z\-_/.近去这了营干做作用第过多几来共每后前])"
            r"(?P<yy>[23]\d)|(?<![" + _NOT_BEFORE_RELATIVE + r"])(?P<rel>今|本|去|上|前|明))\s*年度?(?:的)?\s*")
_ZH_QUARTER = r"(?:第?(?P<q>[一二三四1-4])\s*(?:季度|季)|[Qq](?P<qq>[1-4])(?![0-9]))"
_ZH_MONTH = r"(?P<m>1[0-2]|0?[1-9]|十[一二]?|[一二三四五六七八九])\s*月份?"
_ZH_HALF = r"(?P<h>上|下)半年"
_EN_MONTH = (r"(?P<mn>jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
             r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)(?![a-z])\.?")
_EN_YEAR = r"(?P<ey>(?:19|20)\d\d|['’][23]\d|this year|current year|last year|previous year|next year)(?:['’]s)?"
_EN_QUARTER = r"(?:q(?P<eq>[1-4])|(?:the\s+)?(?P<eo>first|second|third|fourth|1st|2nd|3rd|4th)\s+quarter)"
_EN_HALF = r"(?:h(?P<eh>[12])|(?:the\s+)?(?P<eho>first|second)\s+half)"
_EN_JOIN = r"(?:\s+of\s+|\s+in\s+|\s*,\s*|\s+|(?=['’]))"  # Q1 2026, Q1, 2026, Q1 of 2026, Q1'26
_NOT_CODE = r"(?<![0-9A-Za-z\-_/.])"  # HT-2025-07 and HT2025-08 are contract numbers

_PATTERNS: list[tuple[str, re.Pattern]] = [
    # relative periods no closed set holds: read so that 上个月 in 上上个月 is not taken for one
    ("other", re.compile(r"上上个?(?:月|季度?|年|周|星期)|大前年|(?:[两二三四五六七八九十几]|\d+)\s*个?(?:月|季度|年|周|星期)"
                         r"(?:以前|之前|前)|(?<![a-z])(?:the\s+)?(?:month|quarter|year|week)\s+before\s+(?:last|that)"
                         r"|(?<![a-z])(?:two|three|four|five|six|\d+)\s+(?:months?|quarters?|years?|weeks?)\s+ago(?![a-z])",
                         re.I)),
    ("zh-quarter", re.compile(_ZH_YEAR + _ZH_QUARTER)),
    ("zh-month", re.compile(_ZH_YEAR + _ZH_MONTH)),
    ("zh-half", re.compile(_ZH_YEAR + _ZH_HALF)),
    ("iso-quarter", re.compile(_NOT_CODE + r"(?P<year>(?:19|20)\d\d)\s*-?\s*[Qq](?P<qq>[1-4])(?![0-9A-Za-z])")),
    ("iso-month", re.compile(_NOT_CODE + r"(?P<year>(?:19|20)\d\d)[-/](?P<m>1[0-2]|0?[1-9])(?![0-9A-Za-z.])")),
    ("en-quarter", re.compile(r"(?<![a-z0-9])" + _EN_QUARTER + _EN_JOIN + _EN_YEAR + r"(?![0-9])", re.I)),
    ("en-year-quarter", re.compile(r"(?<![a-z0-9])" + _EN_YEAR + r"\s+" + _EN_QUARTER + r"(?![a-z0-9])", re.I)),
    ("en-half", re.compile(r"(?<![a-z0-9])" + _EN_HALF + _EN_JOIN + _EN_YEAR + r"(?![0-9])", re.I)),
    # a month name and a year with nothing between (Jan 2025, March of last year): "Hi Jan, 2025
    # revenue" names a person
    ("en-month", re.compile(r"(?<![a-z])" + _EN_MONTH + r"(?:\s+|\s+of\s+)" + _EN_YEAR + r"(?![0-9])", re.I)),
    # a year alone: 2025年 / 2025年度 / 2025全年 in Chinese; in English where a preposition makes it
    # a year and nothing follows that makes it a quantity (in 2025; not "of 2000 orders")
    ("zh-year", re.compile(_NOT_CODE + r"(?P<year>(?:19|20)\d\d)\s*(?:年\s*(?:全年|整年|度)?|全年)")),
    # two digits are a year alone only as one whole (24年全年, 25年度), where a question starts
    # or after a region or a pause, and not past next year: 连续24年度盈利 and 营业24年全年 are counts
    ("zh-yy-year", re.compile(r"(?:^|(?<=[\s,，。、；;:：(（「“\"'东南西北中区部]))(?P<yy>[23]\d)\s*年\s*"
                              r"(?:全年|整年|一整年|度)")),
    ("en-year", re.compile(r"(?:(?<![a-z])(?:in|for|during|throughout)\s+|" + _NOT_CODE + r")"
                           r"(?P<ey>(?:19|20)\d\d)(?:['’]s|\s+as a whole|\s+full[- ]year)"
                           r"|(?<![a-z])(?:(?:in|for|during|throughout)\s+|(?:the\s+)?(?:whole|entire)\s+(?:of\s+)?"
                           r"|all\s+of\s+|full[- ]year\s+)(?P<ey2>(?:19|20)\d\d)(?![0-9])"
                           r"(?=\s*$|\s*[?!,;:)\]，。？！；、]|\.(?!\d)|\s+(?:for|in|at|from)\b|\s*[\u4e00-\u9fff])",
                           re.I)),
]
# Anything else that says when, beside the periods read: a second period, a narrower or wider
# one (2025年底, first 3 months of 2025, 2025年同期, 每月), a span (以来, since), a number whose
# meaning is not read (a day, another year), a fiscal year. With one of these the question
# does not name one period this module can hand over.
_OTHER_TIME = re.compile(
    r"[0-9]|年|月|季|周|星期|礼拜|日|号|天|底|末|初|旬|头|最后|近|过去|"
    r"期|节|国庆|元旦|双十一|每|同|时|以来|至今|截|起|开始|往后|之后|以后|之前|以前|后|前|到|至|财年|财政年度|"
    # a dash or tilde joins a range only before a number (3月—6月, Q1~Q3); between clauses (Finance
    # is reconciling — what's ...) or as a chat's tone (谢谢~) it says nothing
    r"[~～—–](?=\s*(?:[0-9一二三四五六七八九十两]|[QqHh][1-4]))|"
    r"(?<![a-z])(?:fy|fiscal|since|until|till|through|thru|up to|onwards?|to date|so far|ytd|qtd|mtd|cumulative|"
    r"before|after|between|starting|beginning|end|start|first|last|past|next|early|mid|late|week|weekly|month|"
    r"monthly|daily|quarter|quarterly|half|season|holiday|same|q[1-4]|h[12]|year|years|annual|jan|feb|mar|apr|"
    r"jun|jul|aug|sept?|oct|nov|dec|january|february|march|april|june|july|august|september|october|november|"
    r"december)(?![a-z])", re.I)
# "from March 2025", "by March 2025": on from it, or up to it
_FROM = re.compile(r"(?<![a-z])(?:from|starting|by|to|till|until|through|thru|up to)\s*$|(?:从|自|到|至|截至|截止)\s*$", re.I)


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
    if kind == "other":
        return "?"
    raw_year = groups.get("year") or groups.get("yy") or (groups["rel"] + "年" if groups.get("rel") else None)
    year = _year(raw_year or groups.get("ey") or groups.get("ey2") or "", today)
    if year is None or not 1990 <= year <= 2099 or (kind == "zh-yy-year" and year > today.year + 1):
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


def says_when(text: str) -> bool:
    """Whether `text` has a word or number that says when (a month, 同期, 2025, up to ...)."""
    return bool(_OTHER_TIME.search(unicodedata.normalize("NFKC", text)))


def blank(text: str, spans) -> str:
    """`text` with each (start, end) span turned into spaces: the other positions stay put."""
    for start, end in spans:
        text = text[:start] + " " * (end - start) + text[end:]
    return text


def the_period(question: str, today: dt.date) -> tuple[Mention | None, bool]:
    """(the one explicit period the question names, whether it names any). None with True:
    it names several, or one with anything else that says when beside it (another month or
    year, 年底, a span such as 以来 or since, a fiscal year): which period is meant is then not
    this module's to say."""
    text = unicodedata.normalize("NFKC", question)
    return one_period(text, read(text, today))


def one_period(text: str, mentions: list[Mention]) -> tuple[Mention | None, bool]:
    """the_period of a folded (NFKC) text whose mentions are read already."""
    if not mentions:
        return None, False
    if len({m.form for m in mentions}) > 1 or mentions[0].form == "?" or any(_FROM.search(text[:m.start])
                                                                             for m in mentions):
        return None, True
    if says_when(blank(text, ((m.start, m.end) for m in mentions))):
        return None, True
    return mentions[0], True
