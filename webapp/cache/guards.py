"""What makes two similar-looking questions different, checked explicitly.

A semantic match is served only when both questions are in one language and agree on every
slot below: numbers with their units, dates and periods, named entities (regions, products
and other closed values of the tools), codes (产品线A, X200, INV-2026-0117), names of people,
negation, the order of compared things, the alternatives a question picks from (gross or net,
apply or cancel, interns or full-time staff, higher or lower, average or median), and, when the
two are the same sentence with a piece swapped, that piece.
Embedding similarity alone cannot see these (GPTCache issue #694: a question and its reversal
at cosine 0.83-0.9997), so they are compared as data. Where a slot cannot be read with
confidence the guard errs towards a miss: a miss costs one generation, a wrong hit trust.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from webapp.knowledge.lexical import singular

_PUNCT = re.compile(r"[\s\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Exact-layer key: full/half width (NFKC), case, punctuation and whitespace folded."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).lower())


# -- numbers ------------------------------------------------------------------------------------

_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10_000, "亿": 100_000_000}
_SCALES = {"万": 10_000, "千": 1000, "亿": 100_000_000, "百": 100, "k": 1000, "m": 1_000_000, "w": 10_000,
           "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}
# What a number counts, folded to one spelling per unit in both languages.
_UNITS = [
    (r"个工作日|工作日|working days?|business days?", "workday"), (r"天|日|days?", "day"),
    (r"个?星期|周|weeks?", "week"), (r"个月|months?", "month"), (r"年|years?", "year"),
    (r"个?小时|hours?|hrs?", "hour"), (r"分钟|minutes?|mins?", "minute"),
    (r"元|块钱?|rmb|yuan|cny|¥", "yuan"), (r"美元|美金|usd|dollars?|\$", "usd"),
    # a change of 5 points is not a change of 5% (of the figure): each its own unit
    (r"个百分点|百分点|percentage points?|points?|pts?(?![a-z])|pp(?![a-z])", "point"), (r"%|percent", "percent"),
    (r"倍|times", "times"), (r"人|people|persons?|employees?", "person"),
    (r"次|times?", "times"), (r"台|units?|pcs|件|个", "unit"), (r"岁|years? old", "age"),
]
_UNIT_RE = re.compile(r"\s*(" + "|".join(p for p, _ in _UNITS) + r")", re.I)
_NUMBER = re.compile(r"(?<![a-z0-9])(\d+(?:,\d{3})*(?:\.\d+)?)\s*(万|千|亿|百|k\b|m\b|w\b|thousand|million|billion)?", re.I)
# A Chinese numeral counts as a number next to a unit or after 第 (一共, 一下, 统一 are words).
_CN_NUMBER = re.compile(r"(?<=第)[零〇一二两三四五六七八九十百千万亿]+|(?<![\d零〇一二两三四五六七八九十百千万亿])"
                        r"[零〇一二两三四五六七八九十百千万亿]+"
                        r"(?=[天年月日号个次人元块周岁倍%台件]|季度|小时|分钟|星期)")


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


def _unit_after(text: str, end: int) -> str:
    match = _UNIT_RE.match(text, end)
    if not match:
        return ""
    word = match.group(1).lower()
    return next(token for pattern, token in _UNITS if re.fullmatch(pattern, word, re.I))


def _unit_end(text: str, end: int) -> int:
    match = _UNIT_RE.match(text, end)
    return match.end() if match else end


def _numbers(text: str) -> tuple[list[str], str]:
    """Each number as value:unit (1万元 = 10000元 = 10k yuan; 3天 is not 3周), and the text
    with them blanked out. A four-digit 19xx/20xx is a year whatever follows it."""
    found, spans = [], []
    for match in _NUMBER.finditer(text):
        value = float(match.group(1).replace(",", "")) * _SCALES.get((match.group(2) or "").lower(), 1)
        unit = _unit_after(text, match.end())
        if match.group(2) is None and re.fullmatch(r"(19|20)\d\d", match.group(1)):
            unit = "year"
        found.append(f"{value:g}:{unit}")
        spans.append((match.start(), _unit_end(text, match.end())))
    for match in _CN_NUMBER.finditer(text):
        value = _cn_to_int(match.group())
        if value is not None:
            found.append(f"{value:g}:{_unit_after(text, match.end())}")
            spans.append((match.start(), _unit_end(text, match.end())))
    for start, end in spans:
        text = text[:start] + " " * (end - start) + text[end:]
    return sorted(found), text


# -- periods ------------------------------------------------------------------------------------

_END = r"(?![a-z0-9])"
# Periods, each mapped to one canonical token; the order matters (longest first).
_PERIODS = [
    (r"上上个?季度|the quarter before last", "quarter-2"), (r"上个?季度|last quarter|previous quarter", "quarter-1"),
    (r"本季度|这个?季度|this quarter|current quarter", "quarter0"), (r"下个?季度|next quarter", "quarter+1"),
    (r"上上个?月|the month before last", "month-2"), (r"上个?月|last month|previous month", "month-1"),
    (r"本月|这个月|this month|current month", "month0"), (r"下个?月|next month", "month+1"),
    (r"前年|the year before last", "year-2"), (r"去年|上一?年|last year|previous year", "year-1"),
    (r"今年|本年|this year|current year", "year0"), (r"明年|next year", "year+1"),
    (r"年初至今|今年以来|year[- ]to[- ]date|ytd", "ytd"),
    (r"昨天|yesterday", "day-1"), (r"今天|today", "day0"), (r"明天|tomorrow", "day+1"),
    (r"上周|上个?星期|last week", "week-1"), (r"本周|这周|this week", "week0"), (r"下周|next week", "week+1"),
    (r"同比|year[- ]on[- ]year|year[- ]over[- ]year|yoy", "yoy"),
    (r"环比|quarter[- ]on[- ]quarter|month[- ]on[- ]month|qoq|mom" + _END, "pop"),
    (r"第?一季度|q1" + _END + r"|first quarter|1st quarter", "Q1"),
    (r"第?二季度|q2" + _END + r"|second quarter|2nd quarter", "Q2"),
    (r"第?三季度|q3" + _END + r"|third quarter|3rd quarter", "Q3"),
    (r"第?四季度|q4" + _END + r"|fourth quarter|4th quarter", "Q4"),
    (r"上半年|first half|h1" + _END, "H1"), (r"下半年|second half|h2" + _END, "H2"),
]
_PERIOD_RES = [(re.compile(pattern, re.I), token) for pattern, token in _PERIODS]
_MONTHS = {m: i for i, m in enumerate(["january", "february", "march", "april", "may", "june", "july", "august",
                                        "september", "october", "november", "december"], 1)}
_MONTH_RE = re.compile(r"\b(" + "|".join(list(_MONTHS) + [m[:3] for m in _MONTHS if m != "may"]) + r")\b", re.I)
_CN_MONTH = re.compile(r"(\d{1,2}|[一二三四五六七八九十]{1,3})月份?")


# -- negation, comparison, people ---------------------------------------------------------------

_A_NOT_A_WORD = re.compile(r"(.)不\1")  # 需不需要 asks 需要
_A_NOT_A = re.compile(r"(.)不\1|是否|有没有|能否|可否")  # 需不需要, 是否: a yes/no question, not a negation
_NEGATION = re.compile(r"不|没|未|非|无|别|勿|否|禁止|\bnot\b|\bno\b|\bnever\b|\bwithout\b|n't\b|\bexcept\b|"
                       r"\bexcluding\b|\bnon-|除了|除外", re.I)
_COMPARISON = re.compile(
    r"比(?!例|率|重)|相比|对比|比较|高于|低于|多于|少于|超过|超出|胜过|赢过|不如|落后|领先|强于|弱于|\bvs\.?|\bversus\b|\bcompared?\b|"
    r"\bthan\b|\boutsell\w*|\boutperform\w*|\boutpac\w*|\bbeat\w*|\bexceed\w*|\bahead of\b|\bbehind\b|\btrail\w*", re.I)
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈姚卢钟姜崔谭陆范汪廖石金韦贾夏付方邹熊孟秦邱侯江尹薛闫段雷龙黎史陶贺毛郝顾龚邵万覃武钱戴严欧莫孔向常汤康易乔赖文"
_TITLED = re.compile(r"([" + _SURNAMES + r"][\u4e00-\u9fff]{0,2}?)(总|经理|先生|女士|小姐|老师|主任|部长|老板|主管)"
                     r"(?![监裁结额计共部司])")
# A Chinese personal name without a title: a common surname and one or two characters, read
# only where a name sits (before 的/说/提交 ...), which is enough to tell 张伟的报销 from 李娜的报销.
_NAMED = re.compile(r"(?<![\u4e00-\u9fff])([" + _SURNAMES + r"][\u4e00-\u9fff]{1,2}?)"
                    r"(?=的|说|和|跟|与|提交|申请|请假|报销|出差|负责|在|是|有没有|批|审批)")
# Latin words that name something (Alice, Acme, K7, X200, INV-2026-0117, a lone capital: product line A)
_LATIN = re.compile(r"(?<![A-Za-z0-9])([A-Za-z][A-Za-z0-9&._-]*[A-Za-z0-9]|[A-Za-z]|\d+[A-Za-z][A-Za-z0-9-]*)(?![A-Za-z0-9])")
_QUESTION_WORDS = frozenset("What Which Who Whom Whose When Where Why How Is Are Was Were Do Does Did Can Could Should "
                            "Would Will Please Tell Show Give List Compare I My Our We The A An In On Of For And Or "
                            "Vs Versus Than To By From Has Have Had Hi Hello Hey If Any Are Am".split())


# -- contrasts: words that name one of a few alternatives ----------------------------------------
# Each group names alternatives that give different answers (gross or net, apply or cancel,
# interns or full-time staff, higher or lower). Two questions that name different members of
# a group differ however they are worded; where a group qualifies what is asked (a kind of
# margin, a group of staff), naming a member against naming none differs too ("net margin"
# is not "margin"). A group's words are matched in the folded, lower-case question.
_W = r"(?<![a-z])"  # an English word starts here
_CONTRASTS: list[tuple[str, bool, dict[str, str]]] = [
    ("profit kind", True, {
        "gross": _W + r"gross|毛利", "net": _W + r"net" + _END + r"|净利|净收入|净额|净资产",
        "operating": _W + r"operating (?:profit|margin|income)|营业利润|经营利润"}),
    ("metric", False, {
        "revenue": _W + r"revenue|sales amount|income|营收|收入|销售额|营业额",
        "volume": _W + r"units? sold|sales volume|volume|销量|销售量|出货量",
        "profit": _W + r"profit|earnings|利润|盈利",
        "cost": _W + r"costs?" + _END + r"|expenses?|spend(?:ing)?" + _END + r"|成本|费用|开支|支出",
        "headcount": _W + r"headcount|head count|number of (?:staff|employees)|人数|员工数",
        "attrition": _W + r"attrition|turnover rate|leavers|离职率|流失率|离职人数",
        "receivable": _W + r"receivables?|应收",
        "collected": _W + r"collections?|collected|payments? received|回款",
        "orders": _W + r"(?:orders|order count)" + _END + r"|订单|下单|单量|下了[^，。？?,]{0,4}单",
        "payable": _W + r"payables?|应付",
        "inventory": _W + r"inventory|stock level|库存|存货",
    }),
    ("statistic", False, {
        "average": _W + r"average|平均|均值|人均",
        "median": _W + r"median|中位数",
        "total": _W + r"total|altogether|总额|总计|合计|总数|总共",
        "highest": _W + r"highest|maximum|max" + _END + r"|top" + _END + r"|最高|最多|最大",
        "lowest": _W + r"lowest|minimum|min" + _END + r"|bottom|最低|最少|最小",
    }),
    # 比…多 / 比…少, but not the 多少 of "比…多多少" nor 比例
    ("direction", False, {
        "up": _W + r"(?:higher|more than|greater|bigger|larger|longer|faster|better|above|exceed\w*|increase\w*|"
              r"rise|rose|grow\w*)" + _END + r"|高于|多于|超过|超出|大于|长于|增长|增加|上升|上涨|提高|上调|"
              r"比(?!例|率|重)[^，。？?,]{0,10}?(?:多(?!少)|高|长|大|快|好|贵)",
        "down": _W + r"(?:lower|less than|fewer|smaller|shorter|slower|worse|below|decrease\w*|decline\w*|"
                r"drop\w*|fell|fall\w*|reduce\w*)" + _END + r"|低于|少于|不到|不如|不及|小于|短于|下降|"
                r"减少|下跌|降低|下调|比(?!例|率|重)[^，。？?,]{0,10}?(?:(?<!多)少|低|短|小|慢|差|便宜)",
    }),
    # each pair its own group: "申请离职" and "离职" name one operation, not two
    ("operation", False, {"apply": _W + r"apply|applying|application|sign up|enrol\w*|register\w*|"
                                   r"申请(?!撤|取消)|报名|开通",
                          "cancel": _W + r"cancel\w*|withdraw\w*|revok\w*|retract\w*|undo|取消|撤销|撤回|作废|退订"}),
    ("operation", False, {"approve": _W + r"approv\w*|sign off|批准|审批通过|同意",
                          "reject": _W + r"reject\w*|declin\w*|deny|denied|驳回|拒绝|退回"}),
    ("operation", False, {"add": _W + r"(?:add|adds|added|adding)" + _END + r"|grant\w*|give access|添加|新增|授予",
                          "remove": _W + r"remov\w*|delet\w*|take away|删除|移除|收回"}),
    ("operation", False, {"buy": _W + r"buy\w*|bought|purchas\w*|procure\w*|采购|购买|买入",
                          "sell": _W + r"sell\w*|sold|出售|卖出"}),
    ("operation", False, {"import": _W + r"import(?:s|ed|ing)?" + _END + r"|进口",
                          "export": _W + r"export(?:s|ed|ing)?" + _END + r"|出口"}),
    ("operation", False, {"join": _W + r"onboard\w*|入职|报到",
                          "leave": _W + r"resign\w*|quit(?:s|ting)?" + _END + r"|offboard\w*|离职|辞职"}),
    ("staff", True, {
        "full-time": _W + r"full[- ]time|permanent staff|正式员工|全职|正编",
        "part-time": _W + r"part[- ]time|兼职",
        "intern": _W + r"interns?" + _END + r"|internship|实习",
        "contractor": _W + r"contractors?|outsourc\w*|vendor staff|temp(?:orary)? staff|外包|劳务派遣|临时工",
        "new hire": _W + r"new (?:hires?|joiners?|employees?|staff)|newcomers?|新员工|新入职|新同事",
        "executive": _W + r"executives?|vps?" + _END + r"|高管|总监级",
        "manager": _W + r"managers" + _END + r"|people leads|管理层|主管们|经理们",
    }),
]
_CONTRAST_RES = [(name, qualifies, {member: re.compile(pattern) for member, pattern in members.items()})
                 for name, qualifies, members in _CONTRASTS]


def _contrasts(lower: str) -> tuple:
    """The members each contrast group's question names, group by group (empty: none)."""
    return tuple(tuple(sorted(member for member, pattern in members.items() if pattern.search(lower)))
                 for _, _, members in _CONTRAST_RES)


@dataclass(frozen=True)
class Slots:
    text: str  # folded (NFKC, lower case): where a slot of the other question is looked for
    numbers: tuple = ()
    periods: tuple = ()
    entities: tuple = ()  # in order of appearance
    negated: bool = False
    compares: bool = False
    people: tuple = ()
    names: tuple = ()  # Latin names and codes, lower case
    words: tuple = ()  # English content words, in order
    chars: str = ""  # Chinese content characters, in order
    chinese: bool = False  # asked in Chinese: the answer is in the asker's language
    values: tuple = ()  # codes, lone letters and numbers as written, in order (Q3, 2025, a)
    period_order: tuple = ()  # the periods in the order the question names them
    contrasts: tuple = ()  # the members named, per contrast group


def slots(text: str, vocabulary: Mapping[str, str]) -> Slots:
    """The slots of a question. `vocabulary` maps every spelling of a closed value (region,
    product line ... from the tools' enums and aliases) to its canonical form."""
    folded = unicodedata.normalize("NFKC", text)
    lower = folded.lower()
    periods: list[str] = []
    found: list[tuple[int, str]] = []  # (position, period): the order a comparison names them in
    rest = lower

    def blank(match: re.Match) -> str:  # same length: the periods found later keep their positions
        return " " * len(match.group())

    for pattern, token in _PERIOD_RES:
        if pattern.search(rest):
            periods.append(token)
            found += [(m.start(), token) for m in pattern.finditer(rest)]
            rest = pattern.sub(blank, rest)
    months = [(m.start(), f"M{_MONTHS.get(m.group(1).lower()) or next(v for k, v in _MONTHS.items() if k.startswith(m.group(1).lower()))}")
              for m in _MONTH_RE.finditer(rest)]
    rest = _MONTH_RE.sub(blank, rest)
    months += [(m.start(), f"M{int(m.group(1)) if m.group(1).isdigit() else _cn_to_int(m.group(1))}")
               for m in _CN_MONTH.finditer(rest)]
    rest = _CN_MONTH.sub(blank, rest)
    periods += [token for _, token in months]
    found += months
    entities = [canonical for _, canonical in sorted(_find_all(rest, vocabulary))]
    spellings = sorted(vocabulary, key=len, reverse=True)
    for spelling in spellings:  # entity words are neither numbers nor names
        rest = rest.replace(spelling.lower(), " ")
    numbers, rest = _numbers(rest)
    people = {"".join(m) for m in _TITLED.findall(rest)} | set(_NAMED.findall(rest))
    unstarted = re.sub(r"(^|[.?!。？！]\s*)([A-Z][a-z]+)", lambda m: m.group(1) + m.group(2).lower(), folded.strip())
    unstarted = re.sub(r"['’](?:s|t|re|ve|ll|d|m)\b", "", unstarted)  # What's, China's: no letter "s"
    for spelling in spellings:
        unstarted = re.sub(re.escape(spelling), " ", unstarted, flags=re.I)
    names = {w.lower() for w in _LATIN.findall(unstarted)
             if w not in _QUESTION_WORDS and w not in ("a", "i", "I")  # the article, the pronoun
             and (w[0].isupper() or any(c.isdigit() for c in w) or len(w) == 1)
             and not _is_period_or_unit(w)}
    words = tuple(w for w in (_english_word(w) for w in _ENGLISH.findall(rest)) if len(w) > 1 and w not in _FILLER)
    chars = "".join(ch for ch in _A_NOT_A_WORD.sub(r"\1", rest) if _CJK.match(ch) and ch not in _CJK_FUNCTION)
    return Slots(lower, tuple(numbers), tuple(sorted(periods)), tuple(entities),
                 bool(_NEGATION.search(_A_NOT_A.sub(" ", lower))), bool(_COMPARISON.search(lower)),
                 tuple(sorted(people)), tuple(sorted(names)), words, chars, bool(_CJK.search(folded)),
                 tuple(_VALUE.findall(lower)), tuple(token for _, token in sorted(found)), _contrasts(lower))


def _is_period_or_unit(word: str) -> bool:
    lower = word.lower()
    return bool(re.fullmatch(r"q[1-4]|h[12]|ytd|yoy|qoq|mom|k|m|w|rmb|cny|usd|pp|pts?|\d+(k|m|w|st|nd|rd|th|s|pp|pts?)", lower))


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
# a code or number (q3, 2025, 3.5) or a lone letter (plan a, 产品线b), as written
_VALUE = re.compile(r"(?<![a-z0-9.])(?:[a-z]*\d[a-z0-9-]*(?:\.\d+)*|[a-z](?![a-z0-9]))")
_ENGLISH = re.compile(r"[a-z]+(?:'[a-z]+)?")
# Words that do not change what is asked.
_FILLER = frozenset("a an the is are was were be been do does did what what's whats which who how when where why "
                    "can could should would will may might must i me my we our us you your please kindly tell show "
                    "give explain describe let know about for of in on at to from by with and or there it its this "
                    "that these those get got have has had much many any some just exactly long often soon "
                    "hi hello hey thanks thank need want like".split())
# Characters of Chinese questions that carry no topic (question words, particles, politeness).
_CJK_FUNCTION = frozenset("的了是有几多少么怎什吗呢哪谁要在我你他她它们请帮和与及一个些这那吧啊呀哦嘛给把被对从到需可以能会该如何为"
                          "问下麻烦还都就也又再很太最更已经正着过想知道告诉查看一下找样啥咋应当共")

_SYNONYMS = {"above": "over", "more": "over", "exceeding": "over", "beyond": "over", "require": "need",
             "required": "need", "necessary": "need", "needed": "need", "price": "cost", "pay": "paid",
             "payment": "paid"}


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


# -- comparing ----------------------------------------------------------------------------------

# Two questions this alike are one sentence with a piece changed: the piece must not carry content.
TEMPLATE_RATIO = 0.5


def disagreement(a: Slots, b: Slots) -> str | None:
    """Why two questions must not share an answer, or None when their slots agree."""
    if a.chinese != b.chinese:
        return "language"
    if a.numbers != b.numbers:
        return "numbers"
    if a.periods != b.periods:
        return "period"
    if sorted(a.entities) != sorted(b.entities):
        return "entity"
    if a.negated != b.negated:
        return "negation"
    if _missing(a.people, b.text) or _missing(b.people, a.text):
        return "person"
    contrast = _contrast(a, b)
    if contrast:
        return contrast
    if _missing(a.names, b.text) or _missing(b.names, a.text):
        return "name"
    if a.compares or b.compares:
        if a.entities != b.entities or _reordered(a, b):
            return "comparison order"
    if _swapped(a.words, b.words) or _swapped(tuple(a.chars), tuple(b.chars)):
        return "content"
    return None


def _contrast(a: Slots, b: Slots) -> str | None:
    for (name, qualifies, _), first, second in zip(_CONTRAST_RES, a.contrasts, b.contrasts):
        if first != second and ((first and second) or qualifies):
            return name
    return None


def _missing(values: tuple, other_text: str) -> bool:
    """A name of one question that the other does not mention in any spelling (a short code
    or letter as a whole token: team "a" is not in "what")."""
    return any(
        re.search(r"(?<![a-z0-9])" + re.escape(value.lower()) + r"(?![a-z0-9])", other_text) is None
        if len(value) <= 3 else value.lower() not in other_text for value in values)


def _reordered(a: Slots, b: Slots) -> bool:
    """Whether the things both questions name come in a different order (A than B / B than A,
    Q3 vs Q2 / Q2 vs Q3)."""
    for first, second in ((a.words, b.words), (tuple(a.chars), tuple(b.chars)), (a.values, b.values),
                          (a.period_order, b.period_order)):
        shared = set(first) & set(second)
        if [w for w in dict.fromkeys(first) if w in shared] != [w for w in dict.fromkeys(second) if w in shared]:
            return True
    return False


def _swapped(first: tuple, second: tuple) -> bool:
    """The same sentence with one content piece replaced, added, dropped or repeated (产假/陪产假,
    maternity/paternity, manager/manager's manager): the rest matches in order and the two
    differ in one place. A rewording differs in several places (请问 … 现在 … 还剩, "quick q …
    turning in") and is left to the similarity."""
    if not first and not second or Counter(first) == Counter(second):
        return False
    matcher = difflib.SequenceMatcher(None, first, second, autojunk=False)
    edits = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    return len(edits) == 1 and matcher.ratio() >= TEMPLATE_RATIO
