"""The Chat tab: conversations, streaming answers, thumbs up/down with a comment."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from webapp.engine import ConversationNotFound, GenerationFailed, UserInputError
from webapp.i18n import bilingual
from webapp.ui.common import caller

GENERATION_QUEUE = "model"  # one queue in front of the one model, shared by UI and API
# Send the browser at most one update per interval: every update costs the server a
# serialization and the client a re-render; the eye does not see a faster stream.
# Measured in bench/chat_path.py: 0.1 s lifts the HTTP path from 0.93 to ~0.96 of plain generate.
STREAM_INTERVAL_S = 0.1


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


def history_of(services, user, conversation_id: int) -> tuple[list[dict], list[int]]:
    """Chatbot messages and the parallel list of their database ids."""
    try:
        messages = services.engine.messages_of(user, conversation_id)
    except ConversationNotFound:
        raise gr.Error(bilingual("not_found"))
    shown = [m for m in messages if m.role in ("user", "assistant")]
    return [{"role": m.role, "content": m.content} for m in shown], [m.id for m in shown]


def conversation_choices(services, user) -> list[tuple[str, int]]:
    from storage import chats

    return [
        (f"{c.title}  ·  {c.updated_at:%m-%d %H:%M}", c.id)
        for c in chats.list_conversations(services.db, user.id)
    ]


def stream_answer(services, user, text: str, conversation_id: int | None):
    """The engine's stream with its refusals turned into messages for the user.

    The first update is taken here, so a refused message raises before the caller
    clears the input box: the user's text is never lost.
    """
    try:
        stream = services.engine.stream_turn(user, text, conversation_id)
        first = next(stream)
    except UserInputError as exc:
        raise gr.Error(bilingual(exc.code, **exc.params))
    except ConversationNotFound:
        raise gr.Error(bilingual("not_found"))

    def rest():
        try:
            yield from throttled(stream, STREAM_INTERVAL_S)
        except GenerationFailed:
            raise gr.Error(bilingual("generation_failed"))

    return first, rest()


def build_chat_tab(services, i18n) -> dict[str, Any]:
    conversation_state = gr.State(None)  # id of the open conversation; None = new
    message_ids = gr.State([])  # database id of each chatbot message, same order
    pending_comment = gr.State(None)  # message id awaiting an optional comment

    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            new_button = gr.Button(i18n("new_conversation"), variant="secondary", elem_id="new-conversation")
            conversations = gr.Radio(label=i18n("your_conversations"), choices=[], elem_id="conversations")
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(
                label="hangjia 行家", height=520, elem_id="chatbot", buttons=["copy"],
                feedback_options=("Like", "Dislike"),
            )
            textbox = gr.Textbox(
                placeholder=i18n("placeholder"), show_label=False, lines=1, max_lines=12,
                submit_btn=True, elem_id="message",
            )
            with gr.Row(visible=False, elem_id="comment-row") as comment_row:
                comment = gr.Textbox(label=i18n("comment_label"), scale=5, elem_id="comment")
                comment_button = gr.Button(i18n("send_comment"), scale=1, elem_id="send-comment")
            status = gr.Markdown(elem_id="chat-status")

    def send(text, history, conversation_id, ids, request: gr.Request):
        user = caller(services, request)
        first, rest = stream_answer(services, user, text, conversation_id)
        history = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": "…"}]
        ids = [*ids, first.user_message_id, None]
        yield "", history, first.conversation_id, ids, gr.Row(visible=False), ""
        for update in rest:
            history = [*history[:-1], {"role": "assistant", "content": update.answer or "…"}]
            if update.done:
                ids = [*ids[:-1], update.message_id]
            yield gr.skip(), history, update.conversation_id, ids, gr.skip(), gr.skip()

    def refresh_conversations(conversation_id, request: gr.Request):
        user = caller(services, request)
        return gr.Radio(choices=conversation_choices(services, user), value=conversation_id)

    def open_conversation(conversation_id, request: gr.Request):
        user = caller(services, request)
        if conversation_id is None:
            return [], None, [], gr.Row(visible=False), ""
        history, ids = history_of(services, user, int(conversation_id))
        return history, int(conversation_id), ids, gr.Row(visible=False), ""

    def new_conversation(request: gr.Request):
        caller(services, request)
        return [], None, [], gr.Radio(value=None), gr.Row(visible=False), ""

    def on_like(ids, data: gr.LikeData, request: gr.Request):
        user = caller(services, request)
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        if not isinstance(index, int) or not 0 <= index < len(ids):
            raise gr.Error(bilingual("nothing_to_rate"))
        message_id = ids[index]
        if message_id is None:  # the answer is still streaming; it has no id yet
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

    send_event = textbox.submit(
        send,
        [textbox, chatbot, conversation_state, message_ids],
        [textbox, chatbot, conversation_state, message_ids, comment_row, status],
        concurrency_id=GENERATION_QUEUE,
        concurrency_limit=services.settings.generation_concurrency,
        api_visibility="private",
    )
    send_event.then(refresh_conversations, [conversation_state], [conversations], api_visibility="private")
    conversations.input(
        open_conversation, [conversations],
        [chatbot, conversation_state, message_ids, comment_row, status], api_visibility="private",
    )
    new_button.click(
        new_conversation, None,
        [chatbot, conversation_state, message_ids, conversations, comment_row, status], api_visibility="private",
    )
    chatbot.like(on_like, [message_ids], [comment_row, pending_comment, comment, status], api_visibility="private")
    comment_button.click(
        send_comment, [pending_comment, comment], [comment_row, pending_comment, comment, status],
        api_visibility="private",
    )
    comment.submit(
        send_comment, [pending_comment, comment], [comment_row, pending_comment, comment, status],
        api_visibility="private",
    )
    return {"conversations": conversations, "refresh_conversations": refresh_conversations}


def rate(services, user, message_id: int, rating: int, comment: str | None) -> int:
    try:
        return services.engine.rate(user, int(message_id), rating, comment)
    except (LookupError, ValueError):
        raise gr.Error(bilingual("nothing_to_rate"))
