"""The evaluation gate: held-out cases, the metrics a domain assistant is judged by, and
the decision whether a candidate adapter may replace the active one.

Cases come from the department's eval split plus a functional set that ships with hangjia
(finetune/data/functional.jsonl). Generation happens in the training process; the
metrics and the gate are pure functions of the outputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

from finetune.samples import last_question
from serving.chat_format import passages_moved_to_the_question, system_message, with_passages

FUNCTIONAL_SET = Path(__file__).with_name("data") / "functional.jsonl"
DOMAIN_METRICS = ("tool_exact", "keyword_recall")
GUARD_METRICS = ("tool_format_valid", "no_false_tool_calls", "general_recall")
# Metrics scored case by case where one case flipping moves them past any tolerance on a
# small set (one rephrased answer, one stray call of fourteen): a fall must also stand out
# from the case-to-case noise (gate). Tool-call exact match is the gain, not a guard; call
# format is judged only where markup was written.
PER_CASE_METRICS = ("keyword_recall", "general_recall", "no_false_tool_calls")
NOISE_Z = 1.64  # one-sided 95%
# The noise of one case falling alone grows with how far it falls, so a single answer that
# lost all its facts would always pass as noise; no fall beyond this is ever noise.
NOISE_CAP = 0.1
_TOOL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@dataclass
class EvalCase:
    messages: list[dict[str, Any]]  # what the model sees, ending with the user's question
    tools: list[dict] | None = None
    kind: str = "text"  # "tool": a call is expected; "text": an answer; "general": must not drift
    expected_call: dict[str, Any] | None = None
    keywords: list[str] = field(default_factory=list)
    name: str = ""
    # offered tools a call of which nothing the user said asks for: serving decodes an answer
    # opening with one again (webapp.tools.grounding.asks_for), and so does the gate
    unasked_tools: list[str] = field(default_factory=list)
    # the offered tool whose every grounded parameter the question spells a value of: an
    # answer without a call is decoded again as its call (webapp.tools.grounding.spelled_call)
    spelled_tool: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self.__dict__


def _keywords(reference: str, limit: int = 8) -> list[str]:
    """Salient pieces of a reference answer: numbers, Latin words of 4+ letters, CJK runs."""
    found = re.findall(r"\d[\d,.]*%?|[A-Za-z]{4,}|[\u4e00-\u9fff]{2,}", reference)
    seen, out = set(), []
    for word in found:
        key = word.casefold()
        if key not in seen:
            seen.add(key)
            out.append(word)
    return out[:limit]


def case_from_sample(sample: dict[str, Any]) -> EvalCase | None:
    """The question of a sample and what the answer must contain: its first assistant
    turn after the last user message."""
    messages = sample["messages"]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None or last_user + 1 >= len(messages):
        return None
    target = messages[last_user + 1]
    name = last_question(messages)[:60]
    prompt = passages_moved_to_the_question(messages[: last_user + 1])
    if target.get("tool_calls"):
        function = target["tool_calls"][0]["function"]
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        return EvalCase(prompt, sample.get("tools"), "tool", {"name": function["name"], "arguments": arguments},
                        name=name)
    return EvalCase(prompt, sample.get("tools"), "text", keywords=_keywords(target.get("content") or ""), name=name)


def load_functional_set(tools: Sequence[dict] | None, system_prompt: str, path: Path = FUNCTIONAL_SET) -> list[EvalCase]:
    """The shipped checks that apply to this department: a tool case only where that tool
    is offered; every case gets the department's tools, as in serving. Policy questions
    answered from passages check that a number in a question does not call a tool."""
    names = {t["function"]["name"] for t in tools or []}
    cases = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        raw = json.loads(line)
        if raw["kind"] == "tool" and raw["expected_call"]["name"] not in names:
            continue
        # a case may carry document passages: served with them, as the engine serves retrieved ones
        messages = [system_message(system_prompt),
                    *with_passages([{"role": "user", "content": raw["question"]}], raw.get("passages", ()))]
        cases.append(EvalCase(messages, list(tools) if tools else None, raw["kind"], raw.get("expected_call"),
                              raw.get("keywords", []), raw["name"]))
    return cases


def calls_in(output: str) -> tuple[list[dict], int]:
    """(parsed calls, malformed blocks) in an output."""
    calls, bad = [], 0
    for body in _TOOL_RE.findall(output):
        try:
            call = json.loads(body.strip())
            if not isinstance(call, dict) or not isinstance(call.get("arguments", {}), dict):
                raise ValueError
            calls.append(call)
        except ValueError:
            bad += 1
    if "<tool_call>" in output and output.count("<tool_call>") > output.count("</tool_call>"):
        bad += 1
    return calls, bad


def calls_unasked(output: str, unasked: Collection[str]) -> bool:
    """Whether `output` is nothing but tool calls, one of them to a tool in `unasked`."""
    calls, _ = calls_in(output)
    return bool(unasked) and not _TOOL_RE.sub("", output).strip() and any(c.get("name") in unasked for c in calls)


def _defaults(tools: Sequence[dict] | None, name: str) -> dict[str, Any]:
    """The schema defaults of a tool's parameters: what the executor fills in for a left-out one."""
    for tool in tools or []:
        function = tool.get("function") or {}
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return {k: p["default"] for k, p in properties.items() if isinstance(p, dict) and "default" in p}
    return {}


def _same_arguments(a: dict, b: dict, defaults: dict[str, Any] | None = None) -> bool:
    """Equal as the executor would run them: a parameter left out equals its schema default
    (metric="revenue" written out is the same call as metric left out)."""
    norm = lambda d: {k: str(v).strip().casefold() for k, v in {**(defaults or {}), **d}.items()  # noqa: E731
                      if v not in (None, "")}
    return norm(a) == norm(b)


def mentions(output: str, keyword: str) -> bool:
    """Whether `output` says `keyword`, ignoring case. A keyword starting with a Latin letter or
    digit must start a word there ("Li" is not in "client"); a number must stand whole ("5"
    is not in "2025", "1.5" or "52"). Words may go on ("week" is in "weeks"); Chinese matches as is."""
    before = "(?<![0-9a-z])" if re.match(r"[0-9a-z]", keyword, re.I) else ""
    after = r"(?![0-9]|\.[0-9])" if keyword[-1:].isdigit() else ""
    if keyword[:1].isdigit():
        before = r"(?<![0-9])(?<![0-9]\.)"
    return re.search(before + re.escape(keyword.casefold()) + after, output.casefold()) is not None


def score(cases: Sequence[EvalCase], outputs: Sequence[str]) -> dict[str, float]:
    """Metrics in [0, 1], higher is better for every one of them."""
    tool_hits, tool_total = 0, 0
    with_markup, valid_markup = 0, 0
    no_tool_total, false_calls = 0, 0
    recall: dict[str, list[float]] = {"text": [], "general": []}
    for case, output in zip(cases, outputs):
        calls, bad = calls_in(output)
        if calls or bad:
            with_markup += 1
            valid_markup += bad == 0
        if case.kind == "tool":
            tool_total += 1
            expected = case.expected_call
            tool_hits += bool(calls) and calls[0].get("name") == expected["name"] and _same_arguments(
                calls[0].get("arguments", {}), expected["arguments"], _defaults(case.tools, expected["name"]))
        else:
            no_tool_total += 1
            false_calls += bool(calls or bad)
            if case.keywords:
                found = sum(mentions(output, k) for k in case.keywords)
                recall[case.kind].append(found / len(case.keywords))
    mean = lambda xs, empty: sum(xs) / len(xs) if xs else empty  # noqa: E731
    return {
        "tool_exact": tool_hits / tool_total if tool_total else 1.0,
        "tool_format_valid": valid_markup / with_markup if with_markup else 1.0,
        "no_false_tool_calls": 1 - false_calls / no_tool_total if no_tool_total else 1.0,
        "keyword_recall": mean(recall["text"], 1.0),
        "general_recall": mean(recall["general"], 1.0),
        "cases": float(len(cases)),
    }


def per_case_scores(cases: Sequence[EvalCase], outputs: Sequence[str]) -> dict[str, list[float]]:
    """Per PER_CASE_METRICS metric, each case's own score (the terms `score` averages): the
    share of its keywords said, and for a case needing no tool, 1 where it made no call."""
    scores: dict[str, list[float]] = {metric: [] for metric in PER_CASE_METRICS}
    for case, output in zip(cases, outputs):
        if case.kind == "tool":
            continue
        calls, bad = calls_in(output)
        scores["no_false_tool_calls"].append(float(not (calls or bad)))
        if case.keywords:
            metric = "keyword_recall" if case.kind == "text" else "general_recall"
            scores[metric].append(sum(mentions(output, k) for k in case.keywords) / len(case.keywords))
    return scores


def noise(active: Sequence[float], candidate: Sequence[float]) -> float:
    """How far a per-case metric's mean may fall by chance: NOISE_Z standard errors of the
    per-case changes, at most NOISE_CAP. 0 below two cases, or when every case moved alike."""
    changes = [c - a for a, c in zip(active, candidate)]
    if len(changes) < 2:
        return 0.0
    mean = sum(changes) / len(changes)
    spread = (sum((x - mean) ** 2 for x in changes) / (len(changes) - 1)) ** 0.5
    return min(NOISE_CAP, NOISE_Z * spread / len(changes) ** 0.5)


def worse_cases(cases: Sequence[EvalCase], active: Sequence[str], candidate: Sequence[str]) -> dict[str, list[str]]:
    """Per metric, the cases the candidate answers worse than the active adapter, and how: the
    call it got wrong, the keywords it no longer says, the call it makes where none belongs.
    On a small set one case moves a metric past any tolerance; the admin who decides whether to
    promote a refused candidate anyway needs to see which case and what it lost."""
    worse: dict[str, list[str]] = {}
    for case, before, after in zip(cases, active, candidate):
        name = case.name or last_question(case.messages)[:60]
        (calls_before, bad_before), (calls_after, bad_after) = calls_in(before), calls_in(after)
        if bad_after and not bad_before:
            worse.setdefault("tool_format_valid", []).append(f"{name}: a malformed call")
        if case.kind == "tool":
            if score([case], [before])["tool_exact"] > score([case], [after])["tool_exact"]:
                got = json.dumps(calls_after[0], ensure_ascii=False) if calls_after else "no call"
                worse.setdefault("tool_exact", []).append(f"{name}: {got[:80]}")
            continue
        if (calls_after or bad_after) and not (calls_before or bad_before):
            called = calls_after[0].get("name") if calls_after else "a malformed call"
            worse.setdefault("no_false_tool_calls", []).append(f"{name}: called {called}")
        lost = [k for k in case.keywords if mentions(before, k) and not mentions(after, k)]
        if lost:
            metric = "keyword_recall" if case.kind == "text" else "general_recall"
            worse.setdefault(metric, []).append(f"{name}: no longer says {', '.join(repr(k) for k in lost)}")
    return worse


def gate(candidate: dict[str, float], active: dict[str, float], margin: float = 0.02,
         tolerance: float = 0.02, worse: dict[str, list[str]] | None = None,
         per_case: tuple[dict[str, list[float]], dict[str, list[float]]] | None = None) -> dict[str, Any]:
    """Promote only when the candidate is better on the domain metrics by `margin` (their
    mean) and no metric, domain or guard, fell by more than `tolerance`: a gain in tool calls
    must not pay for facts the department's answers lost. A per-case metric's fall must also
    exceed its noise (per_case_scores of active and candidate as `per_case`): on a handful of
    cases one keyword of one rephrased answer, or one stray call, is not a regression; many
    cases falling is, and so is any fall of a mean past NOISE_CAP (one answer of six losing
    every fact). With ten cases or more, one case alone moves a mean by NOISE_CAP at most:
    there, one case never decides.
    `worse` (worse_cases) names, in each such reason, the cases that fell."""
    domain_gain = (sum(candidate[m] for m in DOMAIN_METRICS) - sum(active[m] for m in DOMAIN_METRICS)) / len(
        DOMAIN_METRICS)
    reasons = []
    if domain_gain < margin:
        reasons.append(f"domain metrics improved by {domain_gain:+.3f}, less than the margin {margin:.3f}")
    for metric in (*DOMAIN_METRICS, *GUARD_METRICS):
        drop = active[metric] - candidate[metric]
        allowed = tolerance
        if per_case and metric in PER_CASE_METRICS:
            allowed = max(tolerance, noise(per_case[0][metric], per_case[1][metric]))
        if drop > allowed:
            cases = (worse or {}).get(metric, [])
            shown = cases[:3] + ([f"{len(cases) - 3} more"] if len(cases) > 3 else [])
            which = f" ({'; '.join(shown)})" if shown else ""
            limit = f"the tolerance {tolerance:.3f}" if allowed == tolerance else f"its noise {allowed:.3f}"
            reasons.append(f"{metric} fell by {drop:.3f}, more than {limit}{which}")
    table = [{"metric": m, "active": round(active[m], 4), "candidate": round(candidate[m], 4),
              "change": round(candidate[m] - active[m], 4)} for m in (*DOMAIN_METRICS, *GUARD_METRICS)]
    return {"passed": not reasons, "domain_gain": round(domain_gain, 4), "reasons": reasons, "table": table}
