"""How a conversation becomes model text, and model text its thinking and answer: shared by
serving and training, so the adapter learns exactly the prompt layout it is served with and
the gate reads an answer as the app does."""

from __future__ import annotations

import json
from typing import Any, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_thinking(raw: str) -> tuple[str, str]:
    """(thinking, rest) of model output; an unclosed <think> is all thinking so far. The app
    shows the rest and parses it for calls; the gate reads calls from the same rest."""
    stripped = raw.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return "", raw.strip()
    body = stripped[len(THINK_OPEN):]
    if THINK_CLOSE not in body:
        return body.strip(), ""
    thinking, rest = body.split(THINK_CLOSE, 1)
    return thinking.strip(), rest.strip()


def template_knows_tools(tokenizer) -> bool:
    """Qwen3's template renders `tools=` and tool messages itself; SmolLM2's does not."""
    template = tokenizer.chat_template or ""
    return "tools" in template and "tool_call" in template


KNOWLEDGE_HEADER = (
    "Passages from the company's documents that may answer the user's question. Answer from them and cite "
    "them by number, like [1]. If they do not answer it, say so instead of guessing.")


def system_message(system_prompt: str) -> dict[str, str]:
    """The system message of every turn: the prompt alone. The passages retrieved for a
    question go with the question (with_passages), so that everything before it (prompt, tool
    schemas, earlier turns) reads the same whatever was retrieved, and the decoder reuses it."""
    return {"role": "system", "content": system_prompt}


def knowledge_block(passages: Sequence[dict[str, Any]]) -> str:
    """The passages (title, optional location, text) numbered as the answer cites them."""
    parts = [KNOWLEDGE_HEADER]
    for number, passage in enumerate(passages, 1):
        where = f" ({passage['location']})" if passage.get("location") else ""
        parts.append(f"[{number}] {passage['title']}{where}\n{passage['text']}")
    return "\n\n".join(parts)


def with_passages(messages: Sequence[dict[str, Any]], passages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with `passages` on the last user message; render_chat writes them before
    its text."""
    out = list(messages)
    last_user = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=None)
    if passages and last_user is not None:
        out[last_user] = {**out[last_user], "passages": list(passages)}
    return out


def passages_in_text(messages: Sequence[dict[str, Any]], keep: bool = False) -> list[dict[str, Any]]:
    """The messages with each one's passages written into its text, as the model reads them;
    `keep` leaves the "passages" key too (an export: passages_out_of_text undoes it)."""
    out = []
    for message in messages:
        passages = message.get("passages")
        message = {k: v for k, v in message.items() if keep or k != "passages"}
        if passages:
            message["content"] = knowledge_block(passages) + "\n\n" + (message.get("content") or "")
        out.append(message)
    return out


def passages_out_of_text(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """passages_in_text(keep=True) undone: a message whose text starts with its own passages
    keeps only the text after them."""
    out = []
    for message in messages:
        if message.get("passages") and isinstance(message.get("content"), str):
            written = knowledge_block(message["passages"]) + "\n\n"
            if message["content"].startswith(written):
                message = {**message, "content": message["content"][len(written):]}
        out.append(message)
    return out


def passages_moved_to_the_question(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A sample stored before the passages moved (they were in the system message, after the
    prompt) with them where they are served now: before its last question."""
    out = [dict(m) for m in messages]
    marker = "\n\n" + KNOWLEDGE_HEADER
    last_user = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=None)
    if not out or out[0].get("role") != "system" or marker not in (out[0].get("content") or "") or last_user is None:
        return out
    prompt, block = out[0]["content"].split(marker, 1)
    out[0]["content"] = prompt
    out[last_user]["content"] = KNOWLEDGE_HEADER + block + "\n\n" + (out[last_user].get("content") or "")
    return out


def render_chat(tokenizer, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None,
                add_generation_prompt: bool = True, thinking: bool = False) -> str:
    messages = passages_in_text(messages)
    if not template_knows_tools(tokenizer):
        messages, tools = hermes_messages(messages, tools or []), None
    kwargs: dict[str, Any] = {"tools": list(tools)} if tools else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=thinking, **kwargs
    )


HERMES_TOOLS_PREAMBLE = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


def hermes_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict]) -> list[dict[str, str]]:
    """Tools, assistant tool calls and tool results as plain ChatML text, the way Qwen3's
    own template writes them, for chat templates that know only role + content."""
    out: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "system" and tools:
            content += HERMES_TOOLS_PREAMBLE.format(
                tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = call.get("function", call)
                arguments = function.get("arguments", {})
                if isinstance(arguments, str):  # OpenAI format keeps arguments as a JSON string
                    arguments = json.loads(arguments)
                calls.append("<tool_call>\n" + json.dumps(
                    {"name": function["name"], "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>")
            content = "\n".join(([content] if content else []) + calls)
        if role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + response
                continue
            out.append({"role": "user", "content": response, "_tool_responses": True})
            continue
        out.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]
