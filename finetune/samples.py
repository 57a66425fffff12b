"""Training samples: OpenAI chat-format messages, their deterministic train/eval split,
near-duplicate detection, PII scrubbing and JSONL import/export checks. Pure functions."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from serving.chat_format import passages_in_text, passages_moved_to_the_question, passages_out_of_text

REASONS = {
    "wrong_fact": "Wrong fact 事实错误",
    "should_call_tool": "Should have called a tool 应调用工具",
    "wrong_tool_or_arguments": "Wrong tool or arguments 工具或参数错误",
    "hallucinated_source": "Hallucinated source 编造来源",
    "should_refuse": "Should have refused 应拒绝回答",
    "tone_format": "Tone / format 语气或格式",
    "other": "Other 其他",
    "good_example": "Good example 优质范例",
}
ROLES = ("system", "user", "assistant", "tool")
# Bigram Jaccard: 0.77 for "上季度华东区的销售额是多少" vs the same without 的, 0.69 for
# 华南 instead of 华东 (another question): the line sits between.
NEAR_DUPLICATE_SIMILARITY = 0.75


# --- identity of a question ---------------------------------------------------------------


def normalize_question(text: str) -> str:
    """Width, case, punctuation and whitespace do not make a different question."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return "".join(ch for ch in text if ch.isalnum())


def fingerprint(text: str) -> str:
    return hashlib.sha256(normalize_question(text).encode()).hexdigest()[:32]


def assign_split(department_id: str, question: str, eval_fraction: float = 0.1) -> str:
    """'eval' or 'train', the same on every run and machine for the same question (a hash,
    never Python's salted hash()), so the evaluation set is never trained on."""
    digest = hashlib.sha256(f"{department_id}\x00{normalize_question(question)}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def _bigrams(text: str) -> set[str]:
    norm = normalize_question(text)
    return {norm[i:i + 2] for i in range(max(1, len(norm) - 1))} if norm else set()


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of character bigrams of the normalised texts (works for Chinese,
    where words are not separated by spaces)."""
    ta, tb = _bigrams(a), _bigrams(b)
    return len(ta & tb) / len(ta | tb) if ta and tb else 0.0


@dataclass(frozen=True)
class Existing:
    id: int
    split: str
    question: str


def find_near_duplicate(question: str, existing: Iterable[Existing],
                        threshold: float = NEAR_DUPLICATE_SIMILARITY) -> Existing | None:
    best, best_score = None, threshold
    for sample in existing:
        score = 1.0 if normalize_question(sample.question) == normalize_question(question) else similarity(
            question, sample.question)
        if score >= best_score:
            best, best_score = sample, score
    return best


# --- PII ---------------------------------------------------------------------------------

_PII = [
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[EMAIL]"),
    # 18-digit resident ID (last may be X), before phone numbers so they are not split
    (re.compile(r"(?<![\dA-Za-z])\d{6}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dA-Za-z])"),
     "[ID_NUMBER]"),
    (re.compile(r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d[- ]?\d{4}[- ]?\d{4}(?!\d)"), "[PHONE]"),  # CN mobile
    (re.compile(r"(?<!\d)0\d{2,3}-\d{7,8}(?!\d)"), "[PHONE]"),  # CN landline 010-12345678
    (re.compile(r"(?<![\w])\+\d{1,3}[ -]?\(?\d{1,4}\)?(?:[ -]?\d{2,4}){2,4}(?!\d)"), "[PHONE]"),  # international
]


def scrub_pii(text: str) -> str:
    for pattern, placeholder in _PII:
        text = pattern.sub(placeholder, text)
    return text


def scrub_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """PII replaced in every content, passage and tool-call argument string."""
    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return scrub_pii(value)
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        return value

    out = []
    for message in messages:
        message = dict(message)
        if isinstance(message.get("content"), str):
            message["content"] = scrub_pii(message["content"])
        if message.get("passages"):  # documents' text is rendered into the prompt as content is
            message["passages"] = scrub(message["passages"])
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call["function"])
                args = function.get("arguments")
                function["arguments"] = (json.dumps(scrub(json.loads(args)), ensure_ascii=False)
                                         if isinstance(args, str) else scrub(args))
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        out.append(message)
    return out


# --- format ------------------------------------------------------------------------------


def tool_call_message(name: str, arguments: dict[str, Any], call_id: str, content: str = "") -> dict[str, Any]:
    """An assistant message that calls a tool, OpenAI style (arguments as a JSON string)."""
    return {"role": "assistant", "content": content, "tool_calls": [{
        "id": call_id, "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]}


def to_openai(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as OpenAI chat format: tool-call arguments as JSON strings. A question keeps the
    document passages it was served with ("passages": hangjia's one addition to the format)."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items()
                   if k in ("role", "content", "tool_calls", "tool_call_id", "name", "passages")}
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {"id": call.get("id", f"call_{i}"), "type": "function", "function": {
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"] if isinstance(call["function"]["arguments"], str)
                    else json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
                for i, call in enumerate(message["tool_calls"])]
        if message.get("content") is None:
            message["content"] = ""
        out.append(message)
    return out


def last_question(messages: Sequence[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message.get("content") or ""
    return ""


def sample_problems(sample: Any) -> list[str]:
    """What is wrong with one sample object, as short phrases; empty when it is valid."""
    if not isinstance(sample, dict):
        return ["a line must be a JSON object with \"messages\""]
    messages = sample.get("messages")
    if not isinstance(messages, list) or not messages:
        return ["\"messages\" must be a non-empty list"]
    problems = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(f"{where} is not an object")
            continue
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            problems.append(f"{where}.content must be a string")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                problems.append(f"{where}.tool_calls must be a list on an assistant message")
            else:
                for j, call in enumerate(calls):
                    function = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                        problems.append(f"{where}.tool_calls[{j}] needs function.name")
                        continue
                    args = function.get("arguments", {})
                    if isinstance(args, str):
                        try:
                            args = json.loads(args)
                        except json.JSONDecodeError:
                            problems.append(f"{where}.tool_calls[{j}].function.arguments is not valid JSON")
                            continue
                    if not isinstance(args, dict):
                        problems.append(f"{where}.tool_calls[{j}].function.arguments must be an object")
        elif role in ("user", "assistant") and not content:
            problems.append(f"{where} ({role}) has no content")
        passages = message.get("passages")
        if passages is not None and not (role == "user" and isinstance(passages, list) and all(
                isinstance(p, dict) and isinstance(p.get("title"), str) and isinstance(p.get("text"), str)
                for p in passages)):
            problems.append(f"{where}.passages must be a list of {{\"title\", \"text\"}} objects on a user message")
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in messages):
        problems.append("no user message")
    if isinstance(messages[-1], dict) and messages[-1].get("role") != "assistant":
        problems.append("the last message must be the assistant's (what the model learns to say)")
    tools = sample.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        problems.append("\"tools\" must be a list of function schemas")
    return problems


@dataclass
class ParsedFile:
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "line N: problem"


def parse_jsonl(text: str, max_errors: int = 50) -> ParsedFile:
    """Every line checked; errors name the line. Blank lines are allowed."""
    parsed = ParsedFile()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            parsed.errors.append(f"line {number}: not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})")
            continue
        problems = sample_problems(obj)
        if problems:
            parsed.errors.append(f"line {number}: " + "; ".join(problems))
        else:  # an exported question carries its passages twice: as text (for other trainers) and as a key
            parsed.samples.append({**obj, "messages": passages_out_of_text(obj["messages"])})
    if len(parsed.errors) > max_errors:
        extra = len(parsed.errors) - max_errors
        parsed.errors = parsed.errors[:max_errors] + [f"... and {extra} more bad lines"]
    return parsed


def export_line(row: dict[str, Any]) -> str:
    """One JSONL line that TRL's SFTTrainer and LLaMA-Factory (openai format) read as is: a
    question's passages written into its text, where the app serves them (those trainers
    drop the "passages" key, which stays for hangjia's own import: parse_jsonl)."""
    messages = passages_in_text(passages_moved_to_the_question(json.loads(row["messages"])), keep=True)
    record: dict[str, Any] = {"messages": messages}
    if row.get("tools"):
        record["tools"] = json.loads(row["tools"])
    record["metadata"] = {"id": row["id"], "department": row["department_id"], "split": row["split"],
                          "origin": row["origin"], "reason": row["reason"]}
    return json.dumps(record, ensure_ascii=False)
