"""The Chat tab: conversations, streaming answers, tool action cards, approvals of
side-effect actions, thumbs up/down with a comment."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gradio as gr

from storage import StorageError, chats
from webapp.conversations import ConversationNotFound, UserInputError
from webapp.i18n import bilingual
from webapp.knowledge.parsing import SUPPORTED
from webapp.turn import GenerationFailed
from webapp.ui.common import caller

GENERATION_QUEUE = "model"  # one queue in front of the one model, shared by UI and API
# Send the browser at most one update per interval: every update costs the server a
# serialization and the client a re-render; the eye does not see a faster stream.
# Measured in bench/chat_path.py: 0.1 s lifts the HTTP path from 0.93 to ~0.96 of plain generate.
STREAM_INTERVAL_S = 0.1
STATUS_ICON = {"ok": "✅", "error": "❌", "denied": "⛔", "invalid": "⚠️", "timeout": "⏱️",
               "declined": "🚫", "pending": "⏳"}


def throttled(updates, interval: float):
    """The latest update at most once per `interval` seconds; the first and last always."""
    last_sent = 0.0
    pending = None
    for update in updates:
        now = time.monotonic()
        if update.done or now - last_sent >= interval:
            yield update
            last_sent, pending = now, None
        else:
            pending = update
    if pending is not None:
        yield pending


def tool_card(item: dict[str, Any]) -> dict[str, Any]:
    """A collapsible chatbot message for one tool action."""
    arguments = json.dumps(item["arguments"], ensure_ascii=False, indent=1)
    status = item["status"]
    waiting = status == "pending"
    overruled = "".join(f"\n↪ {name}: {json.dumps(was, ensure_ascii=False)} → "
                        f"{json.dumps(item['arguments'].get(name), ensure_ascii=False)} (按您的原话 as your message says)"
                        for name, was in (item.get("overruled") or {}).items())
    body = f"**{item['tool']}**\n```json\n{arguments}\n```{overruled}\n" + (
        "⏳ 等待您批准 / waiting for your approval" if waiting else f"{STATUS_ICON.get(status, '')} {status}: {item['summary']}"
    )
    return {"role": "assistant", "content": body, "metadata": {
        "title": f"🔧 {item['tool']} · {STATUS_ICON.get(status, '')} {status}",
        "id": item["call_id"], "status": "pending" if waiting else "done"}}


def sources_card(item: dict[str, Any]) -> dict[str, Any]:
    """A collapsed chatbot message listing the passages the answer was given, with scores."""
    lines = []
    for source in item["sources"]:
        where = f" · {source['location']}" if source.get("location") else ""
        passage = source["text"] if len(source["text"]) <= 400 else source["text"][:400] + "…"
        lines.append(f"**[{source['n']}] {source['title']}**{where} · score {source['score']:.3f}\n> {passage}")
    return {"role": "assistant", "content": "\n\n".join(lines), "metadata": {
        "title": f"📚 来源 Sources ({len(item['sources'])})", "status": "done"}}


def user_bubble(item: dict[str, Any]) -> dict[str, Any]:
    attached = "".join(f"\n\n📎 {a['filename']}" + (" (excerpts 节选)" if a["mode"] == "passages" else "")
                       for a in item.get("attachments") or ())
    return {"role": "user", "content": item["content"] + attached}


def render_items(items: list[dict[str, Any]]) -> tuple[list[dict], list[int | None]]:
    """Chatbot messages for turn items, and the database id of each (None: not rateable)."""
    messages, ids = [], []
    for item in items:
        if item["type"] == "tool":
            messages.append(tool_card(item))
            ids.append(None)
        elif item["type"] == "sources":
            messages.append(sources_card(item))
            ids.append(None)
        elif item["type"] == "notice":
            messages.append({"role": "assistant", "content": item["content"]})
            ids.append(None)
        elif item["type"] == "user":
            messages.append(user_bubble(item))
            ids.append(None)
        else:  # an answer
            content = item["content"] or "…"
            if item.get("cached"):
                cached = item["cached"]
                how = "同一问题 same question" if cached["layer"] == "exact" else \
                    f"相似问题 similar question «{cached['question']}», {cached['similarity']:.2f}"
                content += f"\n\n⚡ *缓存回答 Answered from the cache ({how})*"
            messages.append({"role": "assistant", "content": content})
            ids.append(item.get("message_id"))
    return messages, ids


def approval_text(pending: list[dict[str, Any]]) -> str:
    item = pending[0]
    arguments = json.dumps(item["arguments"], ensure_ascii=False, indent=1)
    more = f"\n\n(+{len(pending) - 1} more)" if len(pending) > 1 else ""
    return (f"### ⏳ 需要您批准 · Needs your approval: `{item['tool']}`\n"
            f"```json\n{arguments}\n```\n未经批准不会执行。Nothing is done until you approve.{more}")


def conversation_choices(services, user) -> list[tuple[str, int]]:
    return [
        (f"{c.title}  ·  {c.updated_at:%m-%d %H:%M}", c.id)
        for c in chats.list_conversations(services.db, user.id)
    ]


def conversation_view(services, user, conversation_id: int):
    try:
        items, pending = services.engine.conversations.items(user, int(conversation_id))
    except ConversationNotFound:
        raise gr.Error(bilingual("not_found"))
    return items, pending


def _guarded(stream):
    """The engine's stream with its refusals turned into messages for the user. The first
    update is taken at once, so a refused message raises before the caller clears the
    input box: the user's text is never lost."""
    try:
        first = next(stream)
    except UserInputError as exc:
        raise gr.Error(bilingual(exc.code, **exc.params))
    except ConversationNotFound:
        raise gr.Error(bilingual("not_found"))
    except LookupError as exc:  # an action that is not (or no longer) waiting
        raise gr.Error(str(exc))
    except StorageError as exc:
        raise gr.Error(bilingual("storage_failed", reason=str(exc)))

    def rest():
        try:
            yield from throttled(stream, STREAM_INTERVAL_S)
        except GenerationFailed:
            raise gr.Error(bilingual("generation_failed"))
        except StorageError as exc:
            raise gr.Error(bilingual("storage_failed", reason=str(exc)))

    return first, rest()


def stream_answer(services, user, text: str, conversation_id: int | None,
                  attachments: list[tuple[str, bytes]] | None = None, fresh: bool = False):
    return _guarded(services.engine.turns.stream_turn(user, text, conversation_id, attachments, fresh))


def rated_answer(history: list[dict], ids: list[int | None], index: int) -> int | None:
    """The answer a thumb rates. The chatbot shows consecutive assistant messages (sources,
    action cards, the answer) as one bubble with one pair of thumbs, reporting the index
    of its first message: the rated answer is the last one of that group."""
    found = None
    for position in range(index, len(ids)):
        if position > index and (history[position] or {}).get("role") == "user":
            break
        if ids[position] is not None:
            found = ids[position]
    return found


def read_attachments(paths) -> list[tuple[str, bytes]]:
    """Files the browser uploaded (Gradio saved them): (name, bytes) for the engine."""
    out = []
    for path in paths or ():
        path = Path(path if isinstance(path, str) else path.get("path"))
        out.append((path.name, path.read_bytes()))
    return out


def stream_resolution(services, user, call_id: str, approve: bool):
    return _guarded(services.engine.turns.resolve_action(user, call_id, approve))


def build_chat_tab(services, i18n) -> dict[str, Any]:
    conversation_state = gr.State(None)  # id of the open conversation; None = new
    message_ids = gr.State([])  # database id of each chatbot message (None: not rateable)
    pending_comment = gr.State(None)  # message id awaiting an optional comment
    pending_action = gr.State(None)  # call id of the action shown for approval

    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            new_button = gr.Button(i18n("new_conversation"), variant="secondary", elem_id="new-conversation")
            conversations = gr.Radio(label=i18n("your_conversations"), choices=[], elem_id="conversations")
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(
                label="hangjia 行家", height=520, elem_id="chatbot", buttons=["copy"],
                feedback_options=("Like", "Dislike"),
            )
            with gr.Group(visible=False, elem_id="approval") as approval_box:
                approval = gr.Markdown(elem_id="approval-text")
                with gr.Row():
                    approve_button = gr.Button(i18n("approve"), variant="primary", elem_id="approve")
                    decline_button = gr.Button(i18n("decline"), variant="stop", elem_id="decline")
            textbox = gr.MultimodalTextbox(
                placeholder=i18n("placeholder"), show_label=False, lines=1, max_lines=12,
                submit_btn=True, elem_id="message", file_count="multiple", file_types=list(SUPPORTED),
                sources=["upload"],
            )
            with gr.Row(visible=False, elem_id="comment-row") as comment_row:
                comment = gr.Textbox(label=i18n("comment_label"), scale=5, elem_id="comment")
                comment_button = gr.Button(i18n("send_comment"), scale=1, elem_id="send-comment")
            status = gr.Markdown(elem_id="chat-status")
            fresh_button = gr.Button(i18n("ask_fresh"), visible=False, size="sm", elem_id="ask-fresh")
    cached_question = gr.State(None)  # the question of a cached answer, for "ask the model afresh"

    def approval_updates(pending):
        if pending:
            return gr.Group(visible=True), approval_text(pending), pending[0]["call_id"]
        return gr.Group(visible=False), "", None

    def send(value, history, conversation_id, ids, request: gr.Request):
        caller(services, request)  # before reading anything the caller sent
        value = value or {}
        text = value.get("text", "") if isinstance(value, dict) else str(value)
        attachments = read_attachments(value.get("files") if isinstance(value, dict) else None)
        yield from answer(text, attachments, history, conversation_id, ids, request, fresh=False)

    def ask_fresh(question, request: gr.Request):
        """The cached answer's question again, to the model, in a new conversation."""
        if not question:
            raise gr.Error(bilingual("nothing_to_rate"))
        yield from answer(question, [], [], None, [], request, fresh=True)

    def answer(text, attachments, history, conversation_id, ids, request, fresh):
        user = caller(services, request)
        first, rest = stream_answer(services, user, text, conversation_id, attachments, fresh)
        base, base_ids = [*history], [*ids]
        update = first
        shown, shown_ids = render_items(
            [{"type": "user", "content": text,
              "attachments": [{"filename": name, "mode": ""} for name, _ in attachments]}, *first.items])
        yield ({"text": "", "files": []}, base + shown, first.conversation_id, base_ids + shown_ids,
               gr.Row(visible=False), "", *approval_updates([]), gr.Button(visible=False), None)
        base = base + shown[:1]
        base_ids = base_ids + [None]
        for update in rest:
            shown, shown_ids = render_items(update.items)
            yield (gr.skip(), base + shown, update.conversation_id, base_ids + shown_ids,
                   gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        yield (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), *approval_updates(update.pending),
               gr.Button(visible=update.cached), text if update.cached else None)

    def resolve(call_id, approve, history, ids, request: gr.Request):
        user = caller(services, request)
        if call_id is None:
            raise gr.Error(bilingual("nothing_to_approve"))
        first, rest = stream_resolution(services, user, call_id, approve)
        # the pending card is replaced by its outcome; new items follow it
        keep = [i for i, m in enumerate(history) if (m.get("metadata") or {}).get("id") != call_id]
        base, base_ids = [history[i] for i in keep], [ids[i] for i in keep]
        update = first
        for update in [first, *rest]:
            shown, shown_ids = render_items(update.items)
            yield base + shown, base_ids + shown_ids, gr.Group(visible=False), "", None
        box, text, next_call = approval_updates(update.pending)
        yield gr.skip(), gr.skip(), box, text, next_call

    def refresh_conversations(conversation_id, request: gr.Request):
        user = caller(services, request)
        return gr.Radio(choices=conversation_choices(services, user), value=conversation_id)

    def open_conversation(conversation_id, request: gr.Request):
        user = caller(services, request)
        if conversation_id is None:
            return [], None, [], gr.Row(visible=False), "", *approval_updates([])
        items, pending = conversation_view(services, user, conversation_id)
        shown, ids = render_items(items)
        return shown, int(conversation_id), ids, gr.Row(visible=False), "", *approval_updates(pending)

    def new_conversation(request: gr.Request):
        caller(services, request)
        return [], None, [], gr.Radio(value=None), gr.Row(visible=False), "", *approval_updates([])

    def on_like(history, ids, data: gr.LikeData, request: gr.Request):
        user = caller(services, request)
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        if not isinstance(index, int) or not 0 <= index < len(ids):
            raise gr.Error(bilingual("nothing_to_rate"))
        message_id = rated_answer(history, ids, index)
        if message_id is None:  # an action card, or an answer still streaming
            raise gr.Error(bilingual("answer_in_progress"))
        rating = 1 if data.liked is True or data.liked == "Like" else -1
        rate(services, user, message_id, rating, None)
        if rating == -1:
            return gr.Row(visible=True), message_id, "", bilingual("feedback_saved_down")
        return gr.Row(visible=False), None, "", bilingual("feedback_saved_up")

    def send_comment(message_id, text, request: gr.Request):
        user = caller(services, request)
        if message_id is None:
            raise gr.Error(bilingual("nothing_to_rate"))
        rate(services, user, message_id, -1, text)
        return gr.Row(visible=False), None, "", bilingual("comment_saved")

    approval_outputs = [approval_box, approval, pending_action]
    answer_outputs = [textbox, chatbot, conversation_state, message_ids, comment_row, status, *approval_outputs,
                      fresh_button, cached_question]
    send_event = textbox.submit(
        send,
        [textbox, chatbot, conversation_state, message_ids],
        answer_outputs,
        concurrency_id=GENERATION_QUEUE,
        concurrency_limit=services.settings.generation_concurrency,
        api_visibility="private",
    )
    send_event.then(refresh_conversations, [conversation_state], [conversations], api_visibility="private")
    fresh_event = fresh_button.click(ask_fresh, [cached_question], answer_outputs, concurrency_id=GENERATION_QUEUE,
                                     concurrency_limit=services.settings.generation_concurrency,
                                     api_visibility="private")
    fresh_event.then(refresh_conversations, [conversation_state], [conversations], api_visibility="private")
    def approve_action(call_id, history, ids, request: gr.Request):
        yield from resolve(call_id, True, history, ids, request)

    def decline_action(call_id, history, ids, request: gr.Request):
        yield from resolve(call_id, False, history, ids, request)

    for button, handler in ((approve_button, approve_action), (decline_button, decline_action)):
        button.click(
            handler, [pending_action, chatbot, message_ids], [chatbot, message_ids, *approval_outputs],
            concurrency_id=GENERATION_QUEUE, concurrency_limit=services.settings.generation_concurrency,
            api_visibility="private",
        )
    conversations.input(
        open_conversation, [conversations],
        [chatbot, conversation_state, message_ids, comment_row, status, *approval_outputs],
        api_visibility="private",
    )
    new_button.click(
        new_conversation, None,
        [chatbot, conversation_state, message_ids, conversations, comment_row, status, *approval_outputs],
        api_visibility="private",
    )
    chatbot.like(on_like, [chatbot, message_ids], [comment_row, pending_comment, comment, status], api_visibility="private")
    for trigger in (comment_button.click, comment.submit):
        trigger(send_comment, [pending_comment, comment], [comment_row, pending_comment, comment, status],
                api_visibility="private")
    return {"conversations": conversations}


def rate(services, user, message_id: int, rating: int, comment: str | None) -> int:
    try:
        value = int(rating)
    except (TypeError, ValueError):
        value = None
    if value not in (1, -1):
        raise gr.Error(bilingual("rating_invalid", value=str(rating)[:20]))
    try:
        return services.engine.conversations.rate(user, int(message_id), value, comment)
    except (LookupError, ValueError):
        raise gr.Error(bilingual("nothing_to_rate"))
    except StorageError as exc:
        raise gr.Error(bilingual("storage_failed", reason=str(exc)))
