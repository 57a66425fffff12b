"""A user's conversations as stored: reading them (for the chat, the model and the reviewer),
rating their answers, and importing the earlier turns a stateless client kept itself."""

from __future__ import annotations

import json
from typing import Any

from storage import chats, tool_audit
from storage import knowledge as knowledge_store
from storage.accounts import User
from storage.db import Database
from webapp.tools.executor import summarize

TITLE_CHARS = 60
MAX_COMMENT_CHARS = 4000


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


def check_text(text: object, limit: int) -> str:
    """A user's message as stored, or UserInputError saying what to change."""
    if not isinstance(text, str):
        raise UserInputError("empty_message", "The message is empty: type a question first.")
    # Control characters other than newline/tab are noise from copy-paste or attacks;
    # what is left must still say something.
    text = "".join(ch for ch in text if ch in "\n\t" or ch.isprintable() or ch.isspace()).strip()
    if not text:
        raise UserInputError("empty_message", "The message is empty: type a question first.")
    if len(text) > limit:
        raise UserInputError(
            "message_too_long",
            f"The message has {len(text):,} characters; the limit is {limit:,}. "
            "Shorten it, or split it into several messages.",
            length=len(text), limit=limit,
        )
    return text


def title(text: str) -> str:
    return " ".join(text.split())[:TITLE_CHARS]


def source_item(passages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "sources", "sources": [
        {"n": n, "title": p["title"], "location": p.get("location"), "text": p["text"],
         "score": round(float(p["score"]), 4), "document_id": p["document_id"], "chunk_id": p["chunk_id"]}
        for n, p in enumerate(passages, 1)]}


def pending_item(row) -> dict[str, Any]:
    return {"type": "tool", "call_id": row.call_id, "tool": row.tool, "arguments": json.loads(row.arguments),
            "status": "pending", "summary": "Waiting for the user to approve this action.", "side_effect": True,
            "overruled": row.replaced}


def _row_item(row) -> dict[str, Any]:
    if row.status == "pending":
        return pending_item(row)
    content = row.result if row.status == "ok" else f"Error: {row.error}"
    return {"type": "tool", "call_id": row.call_id, "tool": row.tool, "arguments": json.loads(row.arguments),
            "status": row.status, "summary": summarize(content), "side_effect": row.side_effect,
            "overruled": row.replaced}


class Conversations:
    """Every read of a conversation checks that it is the user's own; `cache` (a
    webapp.cache.service.ResponseCache, or None) loses the entry of an answer rated down."""

    def __init__(self, db: Database, model_name: str, max_message_chars: int, cache=None):
        self.db = db
        self.model_name = model_name  # what imported answers are logged as
        self.max_message_chars = max_message_chars
        self.cache = cache

    # -- reading ------------------------------------------------------------------------

    def of(self, user: User, conversation_id: int) -> chats.Conversation:
        conversation = chats.get_conversation(self.db, int(conversation_id))
        if conversation is None or conversation.user_id != user.id:
            raise ConversationNotFound(f"Conversation {conversation_id} was not found among yours.")
        return conversation

    def messages_of(self, user: User, conversation_id: int) -> list[chats.Message]:
        self.of(user, conversation_id)
        return chats.list_messages(self.db, int(conversation_id))

    def items(self, user: User, conversation_id: int) -> tuple[list[dict], list[dict]]:
        """The conversation as the chat shows it: user and answer bubbles with their ids and
        tool action cards in order; plus the actions still waiting for approval."""
        self.of(user, conversation_id)
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
        pending = [pending_item(r) for r in tool_audit.pending_of_conversation(self.db, conversation_id)]
        return items, pending

    def history_messages(self, conversation_id: int, up_to_message_id: int | None = None) -> list[dict[str, Any]]:
        """The conversation in chat-template form: assistant tool calls and tool results
        included, so a follow-up sees the numbers fetched before. Unparseable calls and
        the errors fed back for them are kept only in the turn in progress, where the
        model can fix them; later they teach it nothing. Answers that were cut are left out."""
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
                # a cut answer (a loop, a copy of the tools) is not shown to the model again, where it
                # would be copied on; only a sample of that very answer keeps it
                if m.finish_reason == "degenerate" and m.id != up_to_message_id:
                    continue
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

    def passages_for(self, user_message_id: int | None) -> list[dict[str, Any]]:
        """The passages a question was answered with (a reviewer's sample trains on the prompt
        as it was served)."""
        rows = knowledge_store.retrievals_of(self.db, user_message_id, via="auto") if user_message_id else []
        return [{k: row[k] for k in ("title", "location", "text") if row.get(k)} for row in rows]  # what is rendered

    # -- writing ------------------------------------------------------------------------

    def rate(self, user: User, message_id: int, rating: int, comment: str | None = None) -> int:
        """Thumbs up (1) / down (-1) on one of the user's own answers; returns the feedback id."""
        owner = chats.get_message_owner(self.db, int(message_id))
        if owner is None or owner["user_id"] != user.id or owner["role"] != "assistant":
            raise LookupError(f"Message {message_id} is not an answer in one of your conversations.")
        if rating not in (1, -1):
            raise ValueError("rating must be 1 (thumbs up) or -1 (thumbs down)")
        comment = (comment or "").strip()[:MAX_COMMENT_CHARS] or None
        feedback_id = chats.record_feedback(self.db, int(message_id), user.id, rating, comment)
        if rating == -1 and self.cache is not None:
            self.cache.evict_for_feedback(int(message_id), owner.get("cache_entry_id"))
        return feedback_id

    def import_history(self, user: User, messages: list[dict[str, str]]) -> int:
        """A new conversation holding earlier turns a client kept itself (the OpenAI API is
        stateless): they are stored and logged like any turn, so the next turn, its review
        and its audit see what the model saw. Returns the conversation id."""
        checked = []
        for message in messages:
            if message.get("role") not in ("user", "assistant"):
                raise UserInputError("bad_history", "Earlier messages must have the role user or assistant.")
            checked.append((message["role"], check_text(message.get("content"), self.max_message_chars)))
        first_user = next((text for role, text in checked if role == "user"), checked[0][1])
        imported = {"model": self.model_name, "finish_reason": "imported"}
        conversation_id, _ = chats.start_conversation(
            self.db, user.id, user.department_id, title(first_user),
            [(role, text, imported if role == "assistant" else {}) for role, text in checked])
        return conversation_id
