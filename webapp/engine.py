"""One chat turn: check the input, build the prompt within the context window, stream the
answer from the user's department adapter, and log the whole turn to DuckDB."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Iterator

from storage import chats
from storage.accounts import User
from storage.db import Database
from webapp.models import GenerationParams, GenerationResult, ModelService

log = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TITLE_CHARS = 60


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


@dataclass
class TurnUpdate:
    """What the UI shows while a turn streams; `done` once the answer is stored."""

    conversation_id: int
    user_message_id: int
    answer: str
    message_id: int | None = None
    done: bool = False
    adapter: str | None = None
    adapter_version: str | None = None


def split_thinking(raw: str) -> tuple[str, str]:
    """(thinking, answer) from raw output; an unclosed <think> is all thinking so far."""
    stripped = raw.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return "", raw.strip()
    body = stripped[len(THINK_OPEN):]
    if THINK_CLOSE not in body:
        return body.strip(), ""
    thinking, answer = body.split(THINK_CLOSE, 1)
    return thinking.strip(), answer.strip()


class ChatEngine:
    def __init__(self, db: Database, model: ModelService, settings: TurnSettings):
        self.db = db
        self.model = model
        self.settings = settings

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
        if not isinstance(text, str) or not text.strip():
            raise UserInputError("empty_message", "The message is empty: type a question first.")
        # Control characters other than newline/tab are noise from copy-paste or attacks.
        text = "".join(ch for ch in text if ch in "\n\t" or ch.isprintable() or ch.isspace())
        text = text.strip()
        limit = self.settings.max_message_chars
        if len(text) > limit:
            raise UserInputError(
                "message_too_long",
                f"The message has {len(text):,} characters; the limit is {limit:,}. "
                "Shorten it, or split it into several messages.",
                length=len(text), limit=limit,
            )
        return text

    def _build_prompt(self, history: list[chats.Message], text: str) -> str:
        """System + as much recent history as fits + the new message; oldest turns drop first."""
        system = {"role": "system", "content": self.settings.system_prompt}
        user_message = {"role": "user", "content": text}
        budget = self.model.max_context - self.settings.generation.max_new_tokens
        past = [{"role": m.role, "content": m.content} for m in history if m.role in ("user", "assistant")]
        while True:
            messages = [system, *past, user_message]
            prompt = self.model.render_prompt(messages, self.settings.thinking)
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
            past = past[2:] if len(past) >= 2 else []

    def stream_turn(self, user: User, text: object, conversation_id: int | None = None) -> Iterator[TurnUpdate]:
        """Stream one answer. Raises UserInputError / ConversationNotFound before anything
        is stored; once the user message is stored, the assistant message is stored too,
        even when the listener leaves early or generation fails."""
        text = self._check_text(text)
        history = self.messages_of(user, conversation_id) if conversation_id is not None else []
        prompt = self._build_prompt(history, text)

        if conversation_id is None:
            title = " ".join(text.split())[:TITLE_CHARS]
            conversation_id = chats.create_conversation(self.db, user.id, user.department_id, title).id
        user_message_id = chats.add_message(self.db, conversation_id, "user", text)

        adapter = self.model.adapter_for(user.department_id)
        adapter_name = adapter.name if adapter else None
        adapter_version = adapter.version if adapter else None
        update = TurnUpdate(conversation_id, user_message_id, "", adapter=adapter_name, adapter_version=adapter_version)
        yield dataclasses.replace(update)

        result = GenerationResult()
        raw, ttft_ms = "", None
        started = time.perf_counter()
        completed = False
        pieces = self.model.stream(prompt, self.settings.generation, adapter_name, result)
        try:
            for piece in pieces:
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1000
                raw += piece
                _, answer = split_thinking(raw)
                if answer != update.answer:
                    update.answer = answer
                    yield dataclasses.replace(update)
            completed = True
        finally:
            pieces.close()  # stops generation now if the listener left early
            thinking, answer = split_thinking(raw)
            finish = result.finish_reason if completed or result.error else "cancelled"
            update.message_id = chats.add_message(
                self.db, conversation_id, "assistant", answer,
                thinking=thinking or None,
                model=self.model.name,
                adapter=adapter_name,
                adapter_version=adapter_version,
                latency_ms=(time.perf_counter() - started) * 1000,
                ttft_ms=ttft_ms,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=finish,
                error=result.error,
            )
        if result.error:
            raise GenerationFailed(
                f"The model failed while answering ({result.error}). Try again; if it keeps failing, tell your admin."
            )
        update.answer = answer
        update.done = True
        yield update

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
        return chats.record_feedback(self.db, int(message_id), user.id, rating, comment)
