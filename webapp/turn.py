"""One chat turn: check the input, answer from the response cache or build the prompt within
the context window, stream the answer from the user's department adapter, run its tool calls
round by round, log the whole turn to DuckDB and cache the answer when it may be reused."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from serving.chat_format import split_thinking, system_message, with_passages
from serving.degeneration import (
    COPIED_TOOLS,
    COPY_RETRIES,
    DegenerationWatch,
    copies_tools,
    decode_again,
    tool_copies,
)
from serving.guided import CALL_OPENING, ToolCallGuide
from storage import chats, tool_audit
from storage import knowledge as knowledge_store
from storage.accounts import User
from storage.db import Database
from webapp.conversations import (
    Conversations,
    UserInputError,
    check_text,
    pending_item,
    source_item,
    title,
)
from webapp.i18n import bilingual
from webapp.models import GenerationParams, GenerationResult, ModelService
from webapp.prompt import ContextWindow
from webapp.tools.executor import ToolExecutor, ToolOutcome
from webapp.tools.grounding import asks_for, spelled_tool
from webapp.tools.parser import parse_output, visible_text

log = logging.getLogger(__name__)


class GenerationFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class TurnSettings:
    system_prompt: str
    max_message_chars: int
    thinking: bool
    generation: GenerationParams
    max_tool_rounds: int = 3
    guided_tool_calls: bool = True  # tool calls held to the offered tools' schemas while decoded (serving/guided.py)


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
    completion_tokens: int = 0  # generated this turn, every round (0 for a cached answer)

    def snapshot(self) -> "TurnUpdate":
        return dataclasses.replace(self, items=[dict(i) for i in self.items], pending=list(self.pending))


def tool_item(outcome: ToolOutcome) -> dict[str, Any]:
    return {"type": "tool", "call_id": outcome.call_id, "tool": outcome.tool, "arguments": outcome.arguments,
            "status": outcome.status, "summary": outcome.summary, "side_effect": outcome.side_effect,
            "overruled": outcome.overruled}


class TurnRunner:
    """Runs turns for the conversations in `conversations`. `executor`, `knowledge`
    (webapp.knowledge.base.KnowledgeBase), `cache` (webapp.cache.service.ResponseCache) and
    `metrics` (webapp.metrics.Metrics) are each None when turned off."""

    def __init__(self, db: Database, model: ModelService, settings: TurnSettings, conversations: Conversations,
                 executor: ToolExecutor | None = None, knowledge=None, cache=None, metrics=None):
        self.db = db
        self.model = model
        self.settings = settings
        self.conversations = conversations
        self.executor = executor
        self.knowledge = knowledge
        self.cache = cache
        self.metrics = metrics

    def system(self) -> dict[str, str]:
        """The system message of every turn (the passages go with the question)."""
        return system_message(self.settings.system_prompt)

    def window(self) -> ContextWindow:
        return ContextWindow(self.model, self.settings)

    def tools_for(self, user: User) -> list[dict]:
        return [spec.function_schema() for spec in self.executor.tools_for(user)] if self.executor else []

    def guide(self, tools: list[dict]) -> ToolCallGuide | None:
        """What keeps tool calls valid while they are decoded: the tools offered in the prompt,
        with the spellings their tool file maps onto enum values."""
        if not (self.settings.guided_tool_calls and self.executor and tools):
            return None
        specs = [self.executor.registry.get(tool["function"]["name"]) for tool in tools]
        return ToolCallGuide.from_tools(tools, {spec.name: spec.aliases for spec in specs if spec is not None})

    # -- the turn -----------------------------------------------------------------------

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
        text = check_text(text, self.settings.max_message_chars)
        if conversation_id is not None:
            self.conversations.of(user, conversation_id)
            if tool_audit.pending_of_conversation(self.db, int(conversation_id)):
                raise UserInputError("pending_action", "An action waits for your approval: approve or decline it first.")
        history = self.conversations.history_messages(int(conversation_id)) if conversation_id is not None else []
        tools = self.tools_for(user)
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
        system, window = self.system(), self.window()
        passages = window.passages_that_fit(system, text, tools, [h.as_dict() for h in hits])
        prepared = window.attachments(attachments or [], text, tools, system, passages,
                                      self.knowledge.embedder if self.knowledge is not None else None)
        content = "\n\n".join([text, *(a["prompt_text"] for a in prepared)])
        window.fit(system, history, content, tools, passages)

        if conversation_id is None:
            conversation_id, (user_message_id,) = chats.start_conversation(
                self.db, user.id, user.department_id, title(text), [("user", text, {})])
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
        before = next((m["content"] for m in reversed(history) if m["role"] == "user"), None)
        for last in self._rounds(user, update, tools, question=text, before=before, attached=bool(prepared)):
            yield last
        if scope is not None:
            self._remember(user, scope, text, passages, last, (time.perf_counter() - started) * 1000)

    def resolve_action(self, user: User, call_id: str, approve: bool) -> Iterator[TurnUpdate]:
        """The user approves or declines a pending side-effect action; then the turn goes on."""
        outcome = self.executor.resolve_pending(user, call_id, approve)  # checks the owner
        conversation_id = tool_audit.attempts_of(self.db, call_id)[-1].conversation_id
        chats.add_message(self.db, conversation_id, "tool", outcome.content, tool_call_id=call_id)
        update = self._new_update(user, conversation_id, None)
        update.items.append(tool_item(outcome))
        still_pending = tool_audit.pending_of_conversation(self.db, conversation_id)
        if still_pending:
            update.pending = [pending_item(row) for row in still_pending]
            update.done = True
            yield update.snapshot()
            return
        yield update.snapshot()
        yield from self._rounds(user, update, self.tools_for(user))

    def _new_update(self, user: User, conversation_id: int, user_message_id: int | None) -> TurnUpdate:
        adapter = self.model.adapter_for(user.department_id, conversation_id)
        return TurnUpdate(conversation_id, user_message_id,
                          adapter=adapter.name if adapter else None, adapter_version=adapter.version if adapter else None,
                          adapter_slot=adapter.loaded_as if adapter else None)

    def _rounds(self, user: User, update: TurnUpdate, tools: list[dict],
                question: str | None = None, before: str | None = None, attached: bool = False) -> Iterator[TurnUpdate]:
        """Generate; run the tool calls; feed results back; until an answer without calls,
        a pending approval, or the round limit. question: what the user typed this turn (not
        its attachments; None in the rounds that go on after an approval): its closed values
        hold the first call (webapp.tools.grounding), and with the user's message before it
        (a follow-up's context) it must name something a first call opening the answer is
        held to, or the answer is decoded again without it; where it spells a whole call of one
        offered tool, an answer without a call is decoded again as that call (not when files came
        with it, which may hold the figure, nor when no round is left to run the call)."""
        known = {t["function"]["name"] for t in tools} | (set(self.executor.registry.names()) if self.executor else set())
        system, window = self.system(), self.window()
        passages = self.conversations.passages_for(chats.last_user_message_id(self.db, update.conversation_id))
        guide = self.guide(tools)
        for round_index in range(self.settings.max_tool_rounds + 1):
            history = with_passages(self.conversations.history_messages(update.conversation_id), passages)
            prompt = window.render([system, *window.trim(system, history, tools)], tools)
            update.items.append({"type": "text", "content": ""})
            first = round_index == 0 and question is not None
            unasked = self._unasked_call([t for t in (before, question) if t], tools) if first else None
            spelled = self._spelled_tool(question, tools) \
                if first and not attached and round_index < self.settings.max_tool_rounds else None
            raw, message_id, cut = yield from self._generate(user, update, prompt, guide, tools, unasked, spelled)
            parsed = parse_output(raw, known)
            # a copy of the tools is kept for reviewers, not shown
            shown = "" if cut == COPIED_TOOLS else parsed.text
            update.items[-1].update(content=shown, message_id=message_id)
            if not shown:
                update.items.pop()
            if cut:  # what a loop wrote is neither an answer to go on from nor calls to run
                update.items.append({"type": "notice", "content": bilingual(
                    "answer_copied_tools" if cut == COPIED_TOOLS else "answer_cut")})
                update.answer = shown
                update.message_id, update.done = message_id, True
                yield update.snapshot()
                return
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
            # the user's words hold a turn's single first call; several calls are the model's plan
            held = question if round_index == 0 and len(parsed.calls) == 1 else None
            outcomes += [self.executor.execute(user, call, message_id=message_id, question=held,
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

    def _unasked_call(self, said: list[str], tools: list[dict]):
        """raw output -> whether it opens with a call of an offered tool whose grounded
        parameters nothing in `said` names (webapp.tools.grounding.asks_for): a greeting or a
        question about leave answered with a sales figure the model made every value of. (A
        tool the user is not offered is the executor's to deny, and the audit's to show.)"""
        offered = {t["function"]["name"] for t in tools}
        registry = self.executor.registry if self.executor else None

        def unasked(raw: str) -> bool:
            parsed = parse_output(raw, offered)
            if registry is None or parsed.text.strip() or not parsed.calls:
                return False
            return any(not asks_for(spec, said) for call in parsed.calls
                       if call.name in offered and (spec := registry.get(call.name)))
        return unasked

    def _spelled_tool(self, question: str, tools: list[dict]) -> dict | None:
        """The one offered tool whose every grounded parameter the question spells a value of
        (webapp.tools.grounding.spelled_call: 华东上个月的销售额), or None. Nothing but its call
        can answer the question: the model does not know the figure."""
        if self.executor is None:
            return None
        registry = self.executor.registry
        spec = spelled_tool([spec for tool in tools if (spec := registry.get(tool["function"]["name"]))], question,
                            self.executor.today())
        return next(tool for tool in tools if tool["function"]["name"] == spec.name) if spec else None

    def _generate(self, user: User, update: TurnUpdate, prompt: str, guide: ToolCallGuide | None = None,
                  tools: list[dict] | None = None, unasked=None, spelled: dict | None = None):
        """One generation, streamed into the last text item; stores the assistant message.
        Returns (raw output, message id, why it was cut (serving.degeneration) or None).

        An answer that copies the offered tools' definitions back as code is no answer: it is
        held back until that is ruled out, stopped once it is certain, and decoded again without
        its first token (the model's next choice: a call, or prose) while
        serving.degeneration.decode_again allows (the backend must tell the token). So is an
        answer that opens with a call nothing the user said asks for (`unasked(raw)`); where
        it stays, it runs as the model wrote it. An answer with no call to a question that
        spells a whole call of the tool `spelled` is held back and decoded again with the call
        opened (its prompt ends with the call's tag, guided to that tool): chatty questions
        (在吗？老板要华东上个月的销售额，急) drew prose from a model taught on short ones."""
        copies = tool_copies(tools or ())
        raw, ttft_ms, why = "", None, None
        started = time.perf_counter()
        completed = False
        result = GenerationResult()
        banned: frozenset[int] = frozenset()
        prompt_tokens = completion_tokens = 0
        try:
            for attempt in range(COPY_RETRIES + 1):
                result, raw, completed, why = GenerationResult(), "", False, None
                watch, copying = DegenerationWatch(), None
                pieces = self.model.stream(prompt, self.settings.generation, update.adapter_slot, result,
                                           guide=guide, **({"not_first": banned} if banned else {}))
                try:
                    for piece in pieces:
                        if ttft_ms is None:
                            ttft_ms = (time.perf_counter() - started) * 1000
                        raw += piece
                        if watch.degenerate(raw):  # a loop: stop now, not at the token limit
                            why = watch.why
                            break
                        shown = visible_text(raw)
                        if copying is None:
                            copying = copies_tools(shown, copies)
                        if copying:
                            why = COPIED_TOOLS
                            break
                        if copying is False and spelled is None and shown != update.items[-1]["content"]:
                            update.items[-1]["content"] = update.answer = shown
                            yield update.snapshot()
                        elif spelled is not None:  # held back: the listener may still leave
                            yield update.snapshot()
                    completed = True
                finally:
                    pieces.close()  # stops generation now if the listener left early
                    update.completion_tokens += result.completion_tokens
                    prompt_tokens += result.prompt_tokens
                    completion_tokens += result.completion_tokens
                made_up = why is None and completed and unasked is not None and unasked(raw)
                if not (why == COPIED_TOOLS or made_up) or not decode_again(raw, result.first_token, banned, attempt):
                    break
                log.info("the answer %s; decoding it again without its first token",
                         "called a tool nothing in the question asks for" if made_up else
                         "copied the tool definitions back")
                banned |= {result.first_token}
            if spelled is not None and why is None and completed and not result.error and not (
                    (parsed := parse_output(raw)).calls or parsed.errors):
                log.info("the answer to a question spelling a whole %s call had none; decoding it as that call",
                         spelled["function"]["name"])
                prose, prose_result, completed = raw, result, False
                result, raw = GenerationResult(), CALL_OPENING
                opened = self.guide([spelled])
                pieces = self.model.stream(prompt + CALL_OPENING, self.settings.generation, update.adapter_slot,
                                           result, guide=opened.opened() if opened else None)
                try:
                    for piece in pieces:
                        raw += piece
                        yield update.snapshot()  # held back: the listener may still leave
                    completed = True
                finally:
                    pieces.close()
                    update.completion_tokens += result.completion_tokens
                    prompt_tokens += result.prompt_tokens
                    completion_tokens += result.completion_tokens
                forced = parse_output(raw)
                if result.error or not forced.calls or forced.errors:  # unguided (a remote engine), no valid call
                    log.info("the decoding as a call gave none; the answer stands as written")
                    raw, result = prose, prose_result
            if why is None and (shown := visible_text(raw)) != update.items[-1]["content"]:  # what was held back
                update.items[-1]["content"] = update.answer = shown
                yield update.snapshot()
        finally:
            thinking, _ = split_thinking(raw)
            parsed_text = parse_output(raw).text
            finish = "degenerate" if why else result.finish_reason if completed or result.error else "cancelled"
            message_id = chats.add_message(
                self.db, update.conversation_id, "assistant", parsed_text,
                thinking=thinking or None,
                model=self.model.name,
                adapter=update.adapter,
                adapter_version=update.adapter_version,
                latency_ms=(time.perf_counter() - started) * 1000,
                ttft_ms=ttft_ms,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                finish_reason=finish,
                error=result.error,
            )
            if self.metrics is not None:
                self.metrics.observe_generation(
                    user.department_id, time.perf_counter() - started, ttft_ms / 1000 if ttft_ms else None,
                    prompt_tokens, completion_tokens, bool(result.error))
        if result.error:
            raise GenerationFailed(
                f"The model failed while answering ({result.error}). Try again; if it keeps failing, tell your admin."
            )
        return raw, message_id, why

    # -- the response cache -------------------------------------------------------------

    def _cache_scope(self, user: User, tools: list[dict]) -> str:
        adapter = self.model.adapter_for(user.department_id)
        return self.cache.scope(
            user.department_id, self.model.name, self.settings.system_prompt,
            f"{adapter.name}@{adapter.version}" if adapter else None,
            self.knowledge.version if self.knowledge is not None else None,
            [t["function"]["name"] for t in tools])

    def _serve_cached(self, user: User, text: str, hit) -> TurnUpdate:
        """The turn answered from the cache: logged like any turn, marked with its entry."""
        started = time.perf_counter()
        conversation_id, (user_message_id,) = chats.start_conversation(
            self.db, user.id, user.department_id, title(text), [("user", text, {})])
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
