"""One chat turn: check the input, build the prompt within the context window, stream the
answer from the user's department adapter, and log the whole turn to DuckDB."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from serving.chat_format import system_message, with_passages
from serving.guided import ToolCallGuide
from storage import chats, tool_audit
from storage import knowledge as knowledge_store
from storage.accounts import User
from storage.db import Database
from webapp.i18n import bilingual
from webapp.knowledge.attachments import select_passages, whole_block
from webapp.knowledge.parsing import DocumentError, parse_bytes
from webapp.models import GenerationParams, GenerationResult, ModelService
from webapp.tools.executor import ToolExecutor, ToolOutcome, summarize
from webapp.tools.parser import parse_output, split_thinking, visible_text

log = logging.getLogger(__name__)

TITLE_CHARS = 60
def source_item(passages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "sources", "sources": [
        {"n": n, "title": p["title"], "location": p.get("location"), "text": p["text"],
         "score": round(float(p["score"]), 4), "document_id": p["document_id"], "chunk_id": p["chunk_id"]}
        for n, p in enumerate(passages, 1)]}


class UserInputError(ValueError):
    """Input we refuse, with a message for the user saying what to change.

    `code` selects the translated message in webapp/i18n.py; `params` fill it in.
    """

    def __init__(self, code: str, message: str, **params: object):
        super().__init__(message)
        self.code = code
        self.params = params


class ConversationNotFound(LookupError):
    """No such conversation for this user (another user's looks the same: not found)."""


class GenerationFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class TurnSettings:
    system_prompt: str
    max_message_chars: int
    thinking: bool
    generation: GenerationParams
    max_tool_rounds: int = 3
    guided_tool_calls: bool = True  # tool names, argument names and enum values kept valid while decoded


@dataclass
class TurnUpdate:
    """What the UI shows while a turn streams; `done` once the answer is stored.

    `items` is the turn in order: {"type": "text", "content"} bubbles and
    {"type": "tool", "call_id", "tool", "arguments", "status", "summary"} action cards.
    `answer` is the text of the last bubble; `message_id` the stored final answer.
    `pending` lists side-effect actions waiting for the user's approval.
    """

    conversation_id: int
    user_message_id: int | None
    answer: str = ""
    message_id: int | None = None
    done: bool = False
    adapter: str | None = None
    adapter_version: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    adapter_slot: str | None = None  # the loaded peft adapter that generates (canary or active)
    cached: bool = False  # answered from the response cache

    def snapshot(self) -> "TurnUpdate":
        return dataclasses.replace(self, items=[dict(i) for i in self.items], pending=list(self.pending))


def tool_item(outcome: ToolOutcome) -> dict[str, Any]:
    return {"type": "tool", "call_id": outcome.call_id, "tool": outcome.tool, "arguments": outcome.arguments,
            "status": outcome.status, "summary": outcome.summary, "side_effect": outcome.side_effect}


class ChatEngine:
    def __init__(self, db: Database, model: ModelService, settings: TurnSettings,
                 executor: ToolExecutor | None = None, knowledge=None, cache=None, metrics=None):
        self.db = db
        self.model = model
        self.settings = settings
        self.executor = executor
        self.knowledge = knowledge  # webapp.knowledge.base.KnowledgeBase, or None when turned off
        self.cache = cache  # webapp.cache.service.ResponseCache, or None when turned off
        self.metrics = metrics  # webapp.metrics.Metrics, or None

    # -- reading ------------------------------------------------------------------------

    def conversation_of(self, user: User, conversation_id: int) -> chats.Conversation:
        conversation = chats.get_conversation(self.db, int(conversation_id))
        if conversation is None or conversation.user_id != user.id:
            raise ConversationNotFound(f"Conversation {conversation_id} was not found among yours.")
        return conversation

    def messages_of(self, user: User, conversation_id: int) -> list[chats.Message]:
        self.conversation_of(user, conversation_id)
        return chats.list_messages(self.db, int(conversation_id))

    # -- the turn -----------------------------------------------------------------------

    def _check_text(self, text: object) -> str:
        if not isinstance(text, str):
            raise UserInputError("empty_message", "The message is empty: type a question first.")
        # Control characters other than newline/tab are noise from copy-paste or attacks;
        # what is left must still say something.
        text = "".join(ch for ch in text if ch in "\n\t" or ch.isprintable() or ch.isspace()).strip()
        if not text:
            raise UserInputError("empty_message", "The message is empty: type a question first.")
        limit = self.settings.max_message_chars
        if len(text) > limit:
            raise UserInputError(
                "message_too_long",
                f"The message has {len(text):,} characters; the limit is {limit:,}. "
                "Shorten it, or split it into several messages.",
                length=len(text), limit=limit,
            )
        return text

    def system(self) -> dict[str, str]:
        """The system message of every turn (the passages go with the question)."""
        return system_message(self.settings.system_prompt)

    def passages_for(self, user_message_id: int | None) -> list[dict[str, Any]]:
        """The passages a question was answered with (a reviewer's sample trains on the prompt
        as it was served)."""
        rows = knowledge_store.retrievals_of(self.db, user_message_id, via="auto") if user_message_id else []
        return [{k: row[k] for k in ("title", "location", "text") if row.get(k)} for row in rows]  # what is rendered

    def _fit_prompt(self, history: list[dict], text: str, tools: list[dict], system: dict[str, str],
                    passages: list[dict[str, Any]]) -> str:
        """System + as much recent history as fits + the new message with its passages; oldest
        turns drop first."""
        user_message = with_passages([{"role": "user", "content": text}], passages)[0]
        budget = self.model.max_context - self.settings.generation.max_new_tokens
        past = list(history)
        while True:
            prompt = self.model.render_prompt([system, *past, user_message], tools, self.settings.thinking)
            tokens = self.model.count_tokens(prompt)
            if tokens <= budget:
                return prompt
            if not past:
                raise UserInputError(
                    "context_overflow",
                    f"The message is about {tokens:,} tokens; this model reads at most {budget:,} per turn "
                    f"(context {self.model.max_context:,} minus {self.settings.generation.max_new_tokens:,} "
                    "for the answer). Shorten it.",
                    tokens=tokens, budget=budget,
                )
            past = _drop_oldest_exchange(past)

    def history_messages(self, conversation_id: int, up_to_message_id: int | None = None) -> list[dict[str, Any]]:
        """The conversation in chat-template form: assistant tool calls and tool results
        included, so a follow-up sees the numbers fetched before. Unparseable calls and
        the errors fed back for them are kept only in the turn in progress, where the
        model can fix them; later they teach it nothing."""
        calls_by_message: dict[int, list] = {}
        skipped: set[str] = set()
        for row in tool_audit.latest_of_conversation(self.db, conversation_id):
            if row.tool == "(unparsed)":
                skipped.add(row.call_id)
            elif row.message_id is not None:
                calls_by_message.setdefault(row.message_id, []).append(row)
        messages = []
        attachments = knowledge_store.attachments_of_conversation(self.db, conversation_id)
        stored = chats.list_messages(self.db, conversation_id)
        if up_to_message_id is not None:
            stored = [m for m in stored if m.id <= up_to_message_id]
        last_user_id = max((m.id for m in stored if m.role == "user"), default=0)
        for m in stored:
            if m.role == "user":
                blocks = [a["prompt_text"] for a in attachments.get(m.id, ())]
                messages.append({"role": "user", "content": "\n\n".join([m.content, *blocks])})
            elif m.role == "assistant":
                entry: dict[str, Any] = {"role": "assistant", "content": m.content}
                calls = calls_by_message.get(m.id)
                if calls:
                    entry["tool_calls"] = [
                        {"type": "function", "id": c.call_id,
                         "function": {"name": c.tool, "arguments": json.loads(c.arguments)}}
                        for c in calls
                    ]
                messages.append(entry)
            elif m.role == "tool" and (m.tool_call_id not in skipped or m.id > last_user_id):
                messages.append({"role": "tool", "content": m.content, "tool_call_id": m.tool_call_id})
        return messages

    def conversation_items(self, user: User, conversation_id: int) -> tuple[list[dict], list[dict]]:
        """The conversation as the chat shows it: user and answer bubbles with their ids and
        tool action cards in order; plus the actions still waiting for approval."""
        self.conversation_of(user, conversation_id)
        calls_by_message: dict[int, list] = {}
        for row in tool_audit.latest_of_conversation(self.db, conversation_id):
            calls_by_message.setdefault(row.message_id, []).append(row)
        items: list[dict[str, Any]] = []
        attachments = knowledge_store.attachments_of_conversation(self.db, conversation_id)
        retrievals = knowledge_store.retrievals_of_conversation(self.db, conversation_id)
        for m in chats.list_messages(self.db, conversation_id):
            if m.role == "user":
                items.append({"type": "user", "content": m.content, "message_id": m.id,
                              "attachments": [{"filename": a["filename"], "mode": a["mode"]}
                                              for a in attachments.get(m.id, ())]})
                auto = [r for r in retrievals.get(m.id, ()) if r["via"] == "auto"]
                if auto:
                    items.append(source_item(auto))
            elif m.role == "assistant":
                if m.content:
                    items.append({"type": "text", "content": m.content, "message_id": m.id, "rating": m.rating})
                items.extend(_row_item(row) for row in calls_by_message.get(m.id, []))
        pending = [_pending_item(r) for r in tool_audit.pending_of_conversation(self.db, conversation_id)]
        return items, pending

    def _tools_for(self, user: User) -> list[dict]:
        return [spec.function_schema() for spec in self.executor.tools_for(user)] if self.executor else []

    def _guide(self, tools: list[dict]) -> ToolCallGuide | None:
        """What keeps tool calls valid while they are decoded: the tools offered in the prompt,
        with the spellings their tool file maps onto enum values."""
        if not (self.settings.guided_tool_calls and self.executor and tools):
            return None
        specs = [self.executor.registry.get(tool["function"]["name"]) for tool in tools]
        return ToolCallGuide.from_tools(tools, {spec.name: spec.aliases for spec in specs if spec is not None})

    def stream_turn(self, user: User, text: object, conversation_id: int | None = None,
                    attachments: list[tuple[str, bytes]] | None = None, fresh: bool = False) -> Iterator[TurnUpdate]:
        """Stream one answer. Raises UserInputError / ConversationNotFound before anything
        is stored; once the user message is stored, every assistant message is stored too,
        even when the listener leaves early or generation fails.

        Passages the user's department may read are retrieved for the question and put
        before it, after the system prompt and tool schemas that every turn shares;
        attachments (name, bytes) go in whole when they fit the context, as their most
        relevant passages when they do not (the user is told).

        The first message of a conversation (no attachments) may be answered from the
        response cache; `fresh` asks the model even so."""
        text = self._check_text(text)
        if conversation_id is not None:
            self.conversation_of(user, conversation_id)
            if tool_audit.pending_of_conversation(self.db, int(conversation_id)):
                raise UserInputError("pending_action", "An action waits for your approval: approve or decline it first.")
        history = self.history_messages(int(conversation_id)) if conversation_id is not None else []
        tools = self._tools_for(user)
        # Only context-free turns meet the cache: a follow-up ("and last year?") never does.
        scope = self._cache_scope(user, tools) if self.cache is not None and conversation_id is None \
            and not attachments else None
        if scope is not None and not fresh:
            hit = self.cache.lookup(user.department_id, scope, text)
            if hit is not None:
                yield self._serve_cached(user, text, hit)
                return
        started = time.perf_counter()
        hits = self.knowledge.relevant(user.department_id, text) if self.knowledge is not None else []
        passages = [h.as_dict() for h in hits]
        system = self.system()
        prepared = self._prepare_attachments(attachments or [], text, tools, system, passages)
        content = "\n\n".join([text, *(a["prompt_text"] for a in prepared)])
        self._fit_prompt(history, content, tools, system, passages)

        if conversation_id is None:
            conversation_id, (user_message_id,) = chats.start_conversation(
                self.db, user.id, user.department_id, _title(text), [("user", text, {})])
        else:
            user_message_id = chats.add_message(self.db, conversation_id, "user", text)
        knowledge_store.log_retrievals(self.db, user_message_id, "auto", passages)
        for a in prepared:
            knowledge_store.add_attachment(self.db, user_message_id, a["filename"], a["chars"], a["tokens"],
                                           a["mode"], a["prompt_text"])
        update = self._new_update(user, conversation_id, user_message_id)
        update.items.extend({"type": "notice", "content": a["notice"]} for a in prepared)
        if passages:
            update.items.append(source_item(passages))
        yield update.snapshot()
        last = update
        for last in self._rounds(user, update, tools):
            yield last
        if scope is not None:
            self._remember(user, scope, text, passages, last, (time.perf_counter() - started) * 1000)

    def import_history(self, user: User, messages: list[dict[str, str]]) -> int:
        """A new conversation holding earlier turns a client kept itself (the OpenAI API is
        stateless): they are stored and logged like any turn, so the next turn, its review
        and its audit see what the model saw. Returns the conversation id."""
        checked = []
        for message in messages:
            if message.get("role") not in ("user", "assistant"):
                raise UserInputError("bad_history", "Earlier messages must have the role user or assistant.")
            checked.append((message["role"], self._check_text(message.get("content"))))
        first_user = next((text for role, text in checked if role == "user"), checked[0][1])
        imported = {"model": self.model.name, "finish_reason": "imported"}
        conversation_id, _ = chats.start_conversation(
            self.db, user.id, user.department_id, _title(first_user),
            [(role, text, imported if role == "assistant" else {}) for role, text in checked])
        return conversation_id

    def _cache_scope(self, user: User, tools: list[dict]) -> str:
        adapter = self.model.adapter_for(user.department_id)
        return self.cache.scope(
            user.department_id, self.model.name, self.settings.system_prompt,
            f"{adapter.name}@{adapter.version}" if adapter else None,
            self.knowledge.version if self.knowledge is not None else None,
            [t["function"]["name"] for t in tools])

    def _remember(self, user: User, scope: str, text: str, passages: list[dict], final: TurnUpdate,
                  elapsed_ms: float) -> None:
        """Cache a finished answer. Not: actions with side effects, failed tools, answers
        from a canary adapter (the scope names the active one), cut-off answers."""
        if not final.done or final.pending or not final.answer or final.message_id is None:
            return
        actions = [i for i in final.items if i["type"] == "tool"]
        if any(i.get("side_effect") or i["status"] != "ok" for i in actions):
            return
        active = self.model.adapter_for(user.department_id)
        if (active.version if active else None) != final.adapter_version:
            return
        stored = chats.message_outcome(self.db, final.message_id)
        if stored is None or stored["finish_reason"] != "stop":
            return
        self.cache.store(
            department_id=user.department_id, scope=scope, question=text, answer=final.answer,
            sources=passages, source_message_id=final.message_id, tools_used=[i["tool"] for i in actions],
            generation_ms=elapsed_ms, completion_tokens=stored["completion_tokens"])

    def _serve_cached(self, user: User, text: str, hit) -> TurnUpdate:
        """The turn answered from the cache: logged like any turn, marked with its entry."""
        started = time.perf_counter()
        conversation_id, (user_message_id,) = chats.start_conversation(
            self.db, user.id, user.department_id, _title(text), [("user", text, {})])
        knowledge_store.log_retrievals(self.db, user_message_id, "auto", hit.sources)
        update = self._new_update(user, conversation_id, user_message_id)
        elapsed = (time.perf_counter() - started) * 1000
        message_id = chats.add_message(
            self.db, conversation_id, "assistant", hit.answer, model=self.model.name, adapter=update.adapter,
            adapter_version=update.adapter_version, latency_ms=elapsed, ttft_ms=elapsed, finish_reason="cached",
            cache_entry_id=hit.entry_id)
        if hit.sources:
            update.items.append(source_item(hit.sources))
        update.items.append({"type": "text", "content": hit.answer, "message_id": message_id,
                             "cached": {"entry_id": hit.entry_id, "layer": hit.layer,
                                        "similarity": hit.similarity, "question": hit.question}})
        update.answer, update.message_id, update.done = hit.answer, message_id, True
        update.cached = True
        return update.snapshot()

    def _prepare_attachments(self, attachments: list[tuple[str, bytes]], text: str, tools: list[dict],
                             system: dict[str, str], passages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each attachment as the model will get it: whole, or passages within what is left
        of the context window after the question (history is dropped before an attachment is cut)."""
        if not attachments:
            return []
        budget = self.model.max_context - self.settings.generation.max_new_tokens
        question = self.model.render_prompt([system, *with_passages([{"role": "user", "content": text}], passages)],
                                            tools, self.settings.thinking)
        left = budget - self.model.count_tokens(question) - 8  # the blank lines joining the blocks
        prepared = []
        for name, data in attachments:
            try:
                parsed = parse_bytes(data, name)
            except DocumentError as exc:
                raise UserInputError("attachment_unreadable", str(exc), reason=str(exc)) from exc
            block = whole_block(parsed.source_name, parsed.text)
            tokens = self.model.count_tokens(block)
            if tokens <= left:
                mode, prompt_text = "whole", block
                notice = bilingual("attachment_whole", name=parsed.source_name, tokens=tokens)
            else:
                embedder = self.knowledge.embedder if self.knowledge is not None else None
                selection = select_passages(parsed.source_name, parsed.text, text, embedder,
                                            self.model.count_tokens, max(left, 0))
                mode, prompt_text = "passages", selection.prompt_text
                notice = bilingual("attachment_" + selection.mode, name=parsed.source_name, tokens=tokens,
                                   budget=max(left, 0), passages=selection.passages, total=selection.total_passages)
                tokens = self.model.count_tokens(prompt_text)
            left -= tokens
            prepared.append({"filename": parsed.source_name, "chars": parsed.chars, "tokens": tokens,
                             "mode": mode, "prompt_text": prompt_text, "notice": notice})
        return prepared

    def resolve_action(self, user: User, call_id: str, approve: bool) -> Iterator[TurnUpdate]:
        """The user approves or declines a pending side-effect action; then the turn goes on."""
        outcome = self.executor.resolve_pending(user, call_id, approve)  # checks the owner
        conversation_id = tool_audit.attempts_of(self.db, call_id)[-1].conversation_id
        chats.add_message(self.db, conversation_id, "tool", outcome.content, tool_call_id=call_id)
        update = self._new_update(user, conversation_id, None)
        update.items.append(tool_item(outcome))
        still_pending = tool_audit.pending_of_conversation(self.db, conversation_id)
        if still_pending:
            update.pending = [_pending_item(row) for row in still_pending]
            update.done = True
            yield update.snapshot()
            return
        yield update.snapshot()
        yield from self._rounds(user, update, self._tools_for(user))

    def _new_update(self, user: User, conversation_id: int, user_message_id: int | None) -> TurnUpdate:
        adapter = self.model.adapter_for(user.department_id, conversation_id)
        return TurnUpdate(conversation_id, user_message_id,
                          adapter=adapter.name if adapter else None, adapter_version=adapter.version if adapter else None,
                          adapter_slot=adapter.loaded_as if adapter else None)

    def _rounds(self, user: User, update: TurnUpdate, tools: list[dict]) -> Iterator[TurnUpdate]:
        """Generate; run the tool calls; feed results back; until an answer without calls,
        a pending approval, or the round limit."""
        known = {t["function"]["name"] for t in tools} | (set(self.executor.registry.names()) if self.executor else set())
        system = self.system()
        passages = self.passages_for(chats.last_user_message_id(self.db, update.conversation_id))
        guide = self._guide(tools)
        for round_index in range(self.settings.max_tool_rounds + 1):
            history = with_passages(self.history_messages(update.conversation_id), passages)
            prompt = self.model.render_prompt([system, *self._trim(history, tools, system)], tools,
                                              self.settings.thinking)
            update.items.append({"type": "text", "content": ""})
            raw, message_id = yield from self._generate(user, update, prompt, guide)
            parsed = parse_output(raw, known)
            update.items[-1].update(content=parsed.text, message_id=message_id)
            if not parsed.text:
                update.items.pop()
            last_round = round_index == self.settings.max_tool_rounds
            if not (parsed.calls or parsed.errors) or last_round:
                if (parsed.calls or parsed.errors) and last_round:
                    note = f"(Stopped after {self.settings.max_tool_rounds} rounds of tool calls.)"
                    update.items.append({"type": "text", "content": note})
                update.answer = update.items[-1]["content"] if update.items and update.items[-1]["type"] == "text" else ""
                update.message_id, update.done = message_id, True
                yield update.snapshot()
                return
            outcomes = [self.executor.record_malformed(user, e, message_id, update.conversation_id)
                        for e in parsed.errors]
            outcomes += [self.executor.execute(user, call, message_id=message_id,
                                               conversation_id=update.conversation_id) for call in parsed.calls]
            for outcome in outcomes:
                update.items.append(tool_item(outcome))
                if outcome.status != "pending":
                    chats.add_message(self.db, update.conversation_id, "tool", outcome.content,
                                      tool_call_id=outcome.call_id)
            pending = [tool_item(o) for o in outcomes if o.status == "pending"]
            if pending:
                update.pending, update.message_id, update.done = pending, message_id, True
                update.answer = ""
                yield update.snapshot()
                return
            yield update.snapshot()

    def _trim(self, history: list[dict], tools: list[dict], system: dict[str, str]) -> list[dict]:
        """Drop the oldest exchanges until the prompt fits (tool rounds make it grow)."""
        budget = self.model.max_context - self.settings.generation.max_new_tokens
        past = list(history)
        # never drop the exchange in progress (its user message and tool results)
        while sum(m["role"] == "user" for m in past) > 1:
            prompt = self.model.render_prompt([system, *past], tools, self.settings.thinking)
            if self.model.count_tokens(prompt) <= budget:
                break
            past = _drop_oldest_exchange(past)
        return past

    def _generate(self, user: User, update: TurnUpdate, prompt: str, guide: ToolCallGuide | None = None):
        """One generation, streamed into the last text item; stores the assistant message.
        Returns (raw output, message id)."""
        result = GenerationResult()
        raw, ttft_ms = "", None
        started = time.perf_counter()
        completed = False
        pieces = self.model.stream(prompt, self.settings.generation, update.adapter_slot, result, guide=guide)
        try:
            for piece in pieces:
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1000
                raw += piece
                shown = visible_text(raw)
                if shown != update.items[-1]["content"]:
                    update.items[-1]["content"] = shown
                    update.answer = shown
                    yield update.snapshot()
            completed = True
        finally:
            pieces.close()  # stops generation now if the listener left early
            thinking, _ = split_thinking(raw)
            parsed_text = parse_output(raw).text
            finish = result.finish_reason if completed or result.error else "cancelled"
            message_id = chats.add_message(
                self.db, update.conversation_id, "assistant", parsed_text,
                thinking=thinking or None,
                model=self.model.name,
                adapter=update.adapter,
                adapter_version=update.adapter_version,
                latency_ms=(time.perf_counter() - started) * 1000,
                ttft_ms=ttft_ms,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=finish,
                error=result.error,
            )
            if self.metrics is not None:
                self.metrics.observe_generation(
                    user.department_id, time.perf_counter() - started, ttft_ms / 1000 if ttft_ms else None,
                    result.prompt_tokens, result.completion_tokens, bool(result.error))
        if result.error:
            raise GenerationFailed(
                f"The model failed while answering ({result.error}). Try again; if it keeps failing, tell your admin."
            )
        return raw, message_id

    # -- feedback -----------------------------------------------------------------------

    MAX_COMMENT_CHARS = 4000

    def rate(self, user: User, message_id: int, rating: int, comment: str | None = None) -> int:
        """Thumbs up (1) / down (-1) on one of the user's own answers; returns the feedback id."""
        owner = chats.get_message_owner(self.db, int(message_id))
        if owner is None or owner["user_id"] != user.id or owner["role"] != "assistant":
            raise LookupError(f"Message {message_id} is not an answer in one of your conversations.")
        if rating not in (1, -1):
            raise ValueError("rating must be 1 (thumbs up) or -1 (thumbs down)")
        comment = (comment or "").strip()[: self.MAX_COMMENT_CHARS] or None
        feedback_id = chats.record_feedback(self.db, int(message_id), user.id, rating, comment)
        if rating == -1 and self.cache is not None:
            self.cache.evict_for_feedback(int(message_id), owner.get("cache_entry_id"))
        return feedback_id


def _title(text: str) -> str:
    return " ".join(text.split())[:TITLE_CHARS]


def _drop_oldest_exchange(messages: list[dict]) -> list[dict]:
    """Messages without the oldest user message and everything up to the next one."""
    for index in range(1, len(messages)):
        if messages[index]["role"] == "user":
            return messages[index:]
    return messages[1:] if len(messages) > 1 else []


def _row_item(row) -> dict[str, Any]:
    if row.status == "pending":
        return _pending_item(row)
    content = row.result if row.status == "ok" else f"Error: {row.error}"
    return {"type": "tool", "call_id": row.call_id, "tool": row.tool, "arguments": json.loads(row.arguments),
            "status": row.status, "summary": summarize(content), "side_effect": row.side_effect}


def _pending_item(row) -> dict[str, Any]:
    return {"type": "tool", "call_id": row.call_id, "tool": row.tool, "arguments": json.loads(row.arguments),
            "status": "pending", "summary": "Waiting for the user to approve this action.", "side_effect": True}
