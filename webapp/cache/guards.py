"""What makes two similar-looking questions different, checked explicitly.

A semantic match is served only when both questions agree on every slot below: numbers,
dates and periods, named entities (regions, products and other closed values of the tools,
people, Latin names and codes), negation, and the order of compared things. Embedding
similarity alone cannot see these (GPTCache issue #694: a question and its reversal at
cosine 0.83-0.9997), so they are compared as data.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Mapping

from webapp.knowledge.lexical import singular

_PUNCT = re.compile(r"[\s\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Exact-layer key: full/half width (NFKC), case, punctuation and whitespace folded."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).lower())


_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10_000, "亿": 100_000_000}
# A Chinese numeral counts as a number next to a unit or after 第 (一共, 一下, 统一 are words).
_CN_NUMBER = re.compile(r"(?<=第)[零〇一二两三四五六七八九十百千万亿]+|[零〇一二两三四五六七八九十百千万亿]+"
                        r"(?=[天年月日号个次人元块周岁倍%]|季度|小时|分钟|万|亿|千)")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _cn_to_int(text: str) -> int | None:
    if not any(ch in _CN_UNITS for ch in text):  # 二〇二六 is read digit by digit
        return int("".join(str(_CN_DIGITS[ch]) for ch in text)) if all(ch in _CN_DIGITS for ch in text) else None
    total, section, digit = 0, 0, None
    for ch in text:
        if ch in _CN_DIGITS:
            digit = _CN_DIGITS[ch]
        elif ch in _CN_UNITS:
            unit = _CN_UNITS[ch]
            value = (digit if digit is not None else 1) * unit
            if unit >= 10_000:
                total, section = (total + section + (digit or 0)) * unit, 0
            else:
                section += value
            digit = None
        else:
            return None
    return total + section + (digit or 0)


# Periods, each mapped to one canonical token; the order matters (longest first).
_PERIODS = [
    (r"上上个?季度|the quarter before last", "quarter-2"), (r"上个?季度|last quarter|previous quarter", "quarter-1"),
    (r"本季度|这个?季度|this quarter|current quarter", "quarter0"), (r"下个?季度|next quarter", "quarter+1"),
    (r"上上个?月|the month before last", "month-2"), (r"上个?月|last month|previous month", "month-1"),
    (r"本月|这个月|this month|current month", "month0"), (r"下个?月|next month", "month+1"),
    (r"前年|the year before last", "year-2"), (r"去年|上一?年|last year|previous year", "year-1"),
    (r"今年|本年|this year|current year", "year0"), (r"明年|next year", "year+1"),
    (r"昨天|yesterday", "day-1"), (r"今天|today", "day0"), (r"明天|tomorrow", "day+1"),
    (r"上周|上个?星期|last week", "week-1"), (r"本周|这周|this week", "week0"), (r"下周|next week", "week+1"),
    (r"同比|year[- ]on[- ]year|yoy", "yoy"), (r"环比|quarter[- ]on[- ]quarter|month[- ]on[- ]month|qoq|mom", "pop"),
    (r"第?一季度|q1\b|first quarter", "Q1"), (r"第?二季度|q2\b|second quarter", "Q2"),
    (r"第?三季度|q3\b|third quarter", "Q3"), (r"第?四季度|q4\b|fourth quarter", "Q4"),
    (r"上半年|first half|h1\b", "H1"), (r"下半年|second half|h2\b", "H2"),
]
_PERIOD_RES = [(re.compile(pattern, re.I), token) for pattern, token in _PERIODS]
_MONTHS = {m: i for i, m in enumerate(["january", "february", "march", "april", "may", "june", "july", "august",
                                        "september", "october", "november", "december"], 1)}
_MONTH_RE = re.compile(r"\b(" + "|".join(_MONTHS) + r")\b", re.I)

_A_NOT_A = re.compile(r"(.)不\1|是否|有没有")  # 需不需要, 是否: a yes/no question, not a negation
_NEGATION = re.compile(r"不|没|未|非|无|别|勿|否|\bnot\b|\bno\b|\bnever\b|\bwithout\b|n't\b|\bexcept\b|\bexcluding\b|除了", re.I)
_COMPARISON = re.compile(r"比|相比|对比|比较|高于|低于|超过|\bvs\.?|\bversus\b|\bcompared?\b|\bthan\b|\bover\b", re.I)
_PERSON = re.compile(r"([\u4e00-\u9fff]{1,3}?)(总|经理|先生|女士|老师|主任|部长|老板)")
_LATIN_NAME = re.compile(r"(?<![A-Za-z])([A-Z][A-Za-z0-9&.-]+|[A-Za-z]*\d[A-Za-z0-9-]*)")
_QUESTION_WORDS = frozenset("What Which Who Whom Whose When Where Why How Is Are Was Were Do Does Did Can Could Should "
                            "Would Will Please Tell Show Give List Compare I My Our We The A An In On Of For And Or "
                            "Vs Versus Than To By From".split())


@dataclass(frozen=True)
class Slots:
    numbers: tuple = ()
    periods: tuple = ()
    entities: tuple = ()  # in order of appearance
    negated: bool = False
    compares: bool = False
    people: tuple = ()
    names: tuple = ()
    words: tuple = ()  # English content words, in order


def slots(text: str, vocabulary: Mapping[str, str]) -> Slots:
    """The slots of a question. `vocabulary` maps every spelling of a closed value (region,
    product line ... from the tools' enums and aliases) to its canonical form."""
    folded = unicodedata.normalize("NFKC", text)
    lower = folded.lower()
    periods: list[str] = []
    rest = lower
    for pattern, token in _PERIOD_RES:
        if pattern.search(rest):
            periods.append(token)
            rest = pattern.sub(" ", rest)
    periods += [f"M{_MONTHS[m.lower()]}" for m in _MONTH_RE.findall(rest)]
    rest = _MONTH_RE.sub(" ", rest)
    entities = []
    for position, canonical in sorted(_find_all(rest, vocabulary)):
        entities.append(canonical)
    for spelling in sorted(vocabulary, key=len, reverse=True):  # entity words are not numbers
        rest = rest.replace(spelling.lower(), " ")
    numbers = [n.replace(",", "") for n in _NUMBER.findall(rest)]
    numbers += [str(v) for v in (_cn_to_int(m) for m in _CN_NUMBER.findall(rest)) if v is not None]
    people = sorted({"".join(m) for m in _PERSON.findall(folded)})
    # a capital at the start of a sentence is not a name
    unstarted = re.sub(r"(^|[.?!。？！]\s*)([A-Z])", lambda m: m.group(1) + m.group(2).lower(), folded.strip())
    names = sorted({w.lower() for w in _LATIN_NAME.findall(unstarted) if w not in _QUESTION_WORDS
                    and w.lower() not in vocabulary and not _NUMBER.fullmatch(w)})
    words = tuple(w for w in (_english_word(w) for w in _ENGLISH.findall(rest)) if len(w) > 1 and w not in _FILLER)
    return Slots(tuple(sorted(numbers)), tuple(sorted(periods)), tuple(entities),
                 bool(_NEGATION.search(_A_NOT_A.sub(" ", lower))), bool(_COMPARISON.search(lower)), tuple(people),
                 tuple(names), words)


_ENGLISH = re.compile(r"[a-z]+(?:'[a-z]+)?")
# Words that do not change what is asked.
_FILLER = frozenset("a an the is are was were be been do does did what what's whats which who how when where why "
                    "can could should would will may might must i me my we our us you your please kindly tell show "
                    "give explain describe let know about for of in on at to from by with and or there it its this "
                    "that these those get got have has had much many any some just exactly".split())


_SYNONYMS = {"above": "over", "more": "over", "exceeding": "over", "require": "need", "required": "need",
             "necessary": "need", "needed": "need", "price": "cost", "pay": "paid", "payment": "paid"}


def _english_word(word: str) -> str:
    word = word.removesuffix("'s")
    if len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
        if len(word) > 2 and word[-1] == word[-2] and word[-1] not in "aeiouls":  # submitting -> submit
            word = word[:-1]
    return singular(_SYNONYMS.get(word, word))


def _find_all(text: str, vocabulary: Mapping[str, str]) -> list[tuple[int, str]]:
    """(position, canonical) of each vocabulary mention, longest spellings first, no overlaps."""
    taken = [False] * len(text)
    found = []
    for spelling in sorted(vocabulary, key=len, reverse=True):
        needle = spelling.lower()
        start = text.find(needle)
        while start >= 0:
            end = start + len(needle)
            if not any(taken[start:end]):
                found.append((start, vocabulary[spelling]))
                for i in range(start, end):
                    taken[i] = True
            start = text.find(needle, end)
    return found


def disagreement(a: Slots, b: Slots) -> str | None:
    """Why two questions must not share an answer, or None when their slots agree."""
    if a.numbers != b.numbers:
        return "numbers"
    if a.periods != b.periods:
        return "period"
    if sorted(a.entities) != sorted(b.entities):
        return "entity"
    if (a.compares or b.compares) and (a.entities != b.entities or _shared_order(a.words, b.words)):
        return "comparison order"
    if set(a.words) != set(b.words):
        return "content words"
    if a.negated != b.negated:
        return "negation"
    if a.people != b.people:
        return "person"
    if a.names != b.names:
        return "name"
    return None


def _shared_order(a: tuple, b: tuple) -> bool:
    """Whether the words both questions share come in a different order (A than B / B than A)."""
    shared = set(a) & set(b)
    first = [w for w in dict.fromkeys(a) if w in shared]
    second = [w for w in dict.fromkeys(b) if w in shared]
    return first != second
