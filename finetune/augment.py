"""Slot-swap variants of reviewed tool calls, from the tools' own closed values.

A reviewer's correction "上季度华东区销售额是多少？ -> query_sales(region=华东, period=last_quarter)"
teaches one region and one period. What a small model gets wrong after a night of such
corrections is the values ("North China" -> 华南): it has seen each spelling once or not at all.
Each tool parameter with an enum (and the aliases the tool file gives its values) names every
spelling the executor accepts, so a correction whose question spells a value can be rewritten
with another value, spelled the same way, in both the question and the call. The variants are
made at training time and never stored: the reviewed samples stay what the reviewers approved.

Pure functions over plain data: {tool: {parameter: {spelling: canonical value}}}.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from finetune.samples import normalize_question

Vocabulary = Mapping[str, Mapping[str, Mapping[str, str]]]  # tool -> parameter -> spelling -> value


def slot_vocabulary(tools: Iterable[tuple[str, Mapping[str, Any], Mapping[str, Mapping[str, str]]]]) -> dict:
    """(name, JSON schema of the parameters, aliases) per tool -> the spellings of every closed
    value of every required parameter: the enum values themselves and their aliases.
    Required parameters name what a question is about (a region, a period); optional ones
    are modifiers spelled with common words ("sales", "units"), and swapping those wrote
    questions like "How many revenue did ..." that taught the wrong metric."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for name, parameters, aliases in tools:
        required = set(parameters.get("required") or ())
        for parameter, prop in (parameters.get("properties") or {}).items():
            if parameter not in required:
                continue
            values = {v: v for v in prop.get("enum", ()) if isinstance(v, str)}
            values.update({alias: canonical for alias, canonical in (aliases.get(parameter) or {}).items()
                           if isinstance(canonical, str)})
            if len(set(values.values())) > 1:  # one value alone cannot be swapped
                out.setdefault(name, {})[parameter] = values
    return out


def _is_latin(text: str) -> bool:
    return all(ord(ch) < 0x2E80 for ch in text)


def _find(question: str, spelling: str) -> re.Match | None:
    """Case-insensitive; a Latin spelling only as whole words ("South" is not in "Southwest")."""
    pattern = re.escape(spelling)
    if _is_latin(spelling):
        pattern = rf"(?<![A-Za-z0-9_]){pattern}(?![A-Za-z0-9_])"
    return re.search(pattern, question, flags=re.IGNORECASE)


@dataclass(frozen=True)
class Slot:
    parameter: str
    value: str
    start: int
    end: int
    spelling: str


def find_slots(question: str, arguments: Mapping[str, Any], spellings: Mapping[str, Mapping[str, str]]) -> list[Slot]:
    """The arguments whose value the question spells, each at its longest spelling; slots
    never overlap."""
    slots: list[Slot] = []
    for parameter, value in arguments.items():
        table = spellings.get(parameter)
        if not table or not isinstance(value, str):
            continue
        for spelling in sorted((s for s, v in table.items() if v == value), key=len, reverse=True):
            match = _find(question, spelling)
            if match and not any(match.start() < s.end and s.start < match.end() for s in slots):
                slots.append(Slot(parameter, value, match.start(), match.end(), match.group(0)))
                break
    return sorted(slots, key=lambda s: s.start)


def analogous_spelling(slot: Slot, target: str, table: Mapping[str, str]) -> str | None:
    """How the question would spell `target` the way it spelled `slot.value`: the same affix
    around the canonical value (华东区 -> 华北区), else a spelling of the same script and word
    count, closest in length (East China -> North China, 上季度 -> 上个月). None if it has none."""
    spelled = slot.spelling
    candidates = [s for s, v in table.items() if v == target]
    at = spelled.casefold().find(slot.value.casefold())
    if at >= 0:
        guess = spelled[:at] + target + spelled[at + len(slot.value):]
        if guess == target or guess in candidates:
            return guess
    same_kind = [s for s in candidates if s != target and _is_latin(s) == _is_latin(spelled)
                 and len(s.split()) == len(spelled.split())]
    if not same_kind:
        return None
    best = min(same_kind, key=lambda s: (abs(len(s) - len(spelled)), s))
    return best[0].upper() + best[1:] if spelled[:1].isupper() and best[:1].islower() else best


def _single_call(messages: list[dict]) -> tuple[int, int, dict] | None:
    """(index of the last user message, index of the assistant message that answers it with
    exactly one tool call, that call) or None."""
    user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if user is None:
        return None
    for i in range(user + 1, len(messages)):
        message = messages[i]
        if message.get("role") == "assistant":
            calls = message.get("tool_calls") or []
            return (user, i, calls[0]) if len(calls) == 1 else None
    return None


def slot_variants(sample: Mapping[str, Any], vocabulary: Vocabulary, count: int, rng: random.Random,
                  avoid: set[str] = frozenset()) -> list[dict[str, Any]]:
    """Up to `count` copies of a tool-call sample with other closed values, question and call
    rewritten together. A variant ends at the call: the tool's result and the final answer
    were about the original values. Questions in `avoid` (normalised; the evaluation split)
    are never produced, so the gate does not score what was trained."""
    if count <= 0:
        return []
    messages = sample.get("messages") or []
    found = _single_call(messages)
    if not found:
        return []
    user, answer, call = found
    function = call.get("function") or {}
    spellings = vocabulary.get(function.get("name"), {})
    try:
        arguments = json.loads(function.get("arguments") or "{}") if isinstance(
            function.get("arguments"), str) else dict(function.get("arguments") or {})
    except json.JSONDecodeError:
        return []
    question = messages[user].get("content")
    if not spellings or not isinstance(question, str) or not isinstance(arguments, dict):
        return []
    slots = find_slots(question, arguments, spellings)
    options = []  # per slot: (new value, its spelling) for every other value
    for slot in slots:
        table = spellings[slot.parameter]
        choices = [(v, analogous_spelling(slot, v, table)) for v in sorted(set(table.values())) if v != slot.value]
        options.append([(slot.value, slot.spelling)] + [c for c in choices if c[1]])
    combos = [c for c in itertools.product(*options) if any(new != slot.value for slot, (new, _) in zip(slots, c))]
    rng.shuffle(combos)
    seen = {normalize_question(question)} | set(avoid)
    variants = []
    for combo in combos:
        text, shift, new_arguments = question, 0, dict(arguments)
        for slot, (value, spelling) in zip(slots, combo):
            text = text[:slot.start + shift] + spelling + text[slot.end + shift:]
            shift += len(spelling) - (slot.end - slot.start)
            new_arguments[slot.parameter] = value
        if normalize_question(text) in seen:
            continue
        seen.add(normalize_question(text))
        head = copy.deepcopy(messages[:answer + 1])
        head[user]["content"] = text
        head[answer]["tool_calls"][0]["function"]["arguments"] = json.dumps(new_arguments, ensure_ascii=False)
        variants.append({**{k: v for k, v in sample.items() if k != "messages"}, "messages": head})
        if len(variants) == count:
            break
    return variants


def wrapped(question: str, wrappers: Mapping[str, Mapping[str, list[str]]], rng: random.Random) -> str:
    """The question inside an employee's chat context: an opening, a closing, or both, in its
    language (Chinese where it has a CJK character). Reviewed questions are short and clean;
    employees write "在吗？麻烦帮我查下…，要放进周报里" or "Hi, quick question: … thx", and a
    model that learned only the clean form answered those in prose. The wrappers name nothing
    a call holds (no place, period, metric or number), so the call stays the same."""
    language = "zh" if re.search(r"[\u4e00-\u9fff]", question) else "en"
    table = wrappers.get(language) or {}
    before, after = list(table.get("before") or ()), list(table.get("after") or ())
    shapes = [shape for shape, possible in (("before", before), ("after", after), ("both", before and after))
              if possible]
    if not shapes:
        return question
    shape = rng.choice(shapes)
    parts = [rng.choice(before) if shape in ("before", "both") else "", question,
             rng.choice(after) if shape in ("after", "both") else ""]
    joiner = "" if language == "zh" else " "
    return joiner.join(part for part in parts if part)
