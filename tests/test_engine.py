import pytest

from storage import chats
from tests.conftest import make_lora_adapter
from webapp.conversations import ConversationNotFound, Conversations, UserInputError
from webapp.models import GenerationParams
from webapp.turn import TurnRunner, TurnSettings


def run_turn(turns, user, text, conversation_id=None):
    updates = list(turns.stream_turn(user, text, conversation_id))
    assert updates[-1].done
    return updates


def user(services, name="finance-employee"):
    return services.auth.current_user(name)


def runner(services, settings):
    """Turns with `settings` on the services' model and database, without tools, retrieval or cache."""
    conversations = Conversations(services.db, services.model.name, settings.max_message_chars)
    return TurnRunner(services.db, services.model, settings, conversations)


def test_a_turn_streams_and_is_logged_with_who_what_and_how_fast(services):
    alice = user(services)
    updates = run_turn(services.engine.turns, alice, "How much did we sell last quarter?")
    assert len(updates) > 2  # streamed in pieces, not one block
    final = updates[-1]
    assert final.answer and final.message_id
    conv = chats.get_conversation(services.db, final.conversation_id)
    assert (conv.user_id, conv.department_id) == (alice.id, "finance")
    assert conv.title == "How much did we sell last quarter?"
    row = services.db.query_one("SELECT * FROM messages WHERE id = ?", [final.message_id])
    assert row["role"] == "assistant" and row["content"] == final.answer
    assert row["model"] == "tiny-qwen3" and row["adapter"] is None
    assert row["prompt_tokens"] > 10 and row["completion_tokens"] == 12 and row["finish_reason"] == "length"
    assert row["latency_ms"] >= row["ttft_ms"] > 0 and row["error"] is None


def test_follow_up_sees_history_and_answers_use_the_department_adapter(services, tiny_model_dir, tmp_path):
    make_lora_adapter(tiny_model_dir, tmp_path / "a" / "finance" / "v7", seed=3)
    services.model.load_adapter("finance", tmp_path / "a" / "finance" / "v7", "v7")
    alice, hr = user(services), user(services, "hr-employee")
    first = run_turn(services.engine.turns, alice, "first question")[-1]
    second = run_turn(services.engine.turns, alice, "and a follow-up", first.conversation_id)[-1]
    assert second.conversation_id == first.conversation_id
    assert [m.role for m in chats.list_messages(services.db, first.conversation_id)] == [
        "user", "assistant", "user", "assistant"]
    assert (second.adapter, second.adapter_version) == ("finance", "v7")
    row = services.db.query_one("SELECT adapter, adapter_version FROM messages WHERE id = ?", [second.message_id])
    assert row == {"adapter": "finance", "adapter_version": "v7"}
    hr_turn = run_turn(services.engine.turns, hr, "first question")[-1]
    assert hr_turn.adapter is None  # hr has no adapter: base model, never finance's


@pytest.mark.parametrize(
    "text, code",
    [("", "empty_message"), ("   \n\t ", "empty_message"), (None, "empty_message"),
     ("x" * 200_000, "message_too_long")],
)
def test_refused_messages_store_nothing(services, text, code):
    with pytest.raises(UserInputError) as info:
        next(services.engine.turns.stream_turn(user(services), text))
    assert info.value.code == code
    assert services.db.scalar("SELECT count(*) FROM messages") == 0
    assert services.db.scalar("SELECT count(*) FROM conversations") == 0


def test_context_window_drops_old_turns_then_refuses(services):
    turns = runner(services, TurnSettings(
        system_prompt="s", max_message_chars=100_000, thinking=False,
        generation=GenerationParams(max_new_tokens=8, temperature=0.0)))
    services.model.context_tokens = 200
    alice = user(services)
    conv = run_turn(turns, alice, "word " * 60)[-1].conversation_id
    # the first turn no longer fits beside this one: it is dropped, the turn goes ahead
    final = run_turn(turns, alice, "other " * 100, conv)[-1]
    prompt_tokens = services.db.scalar("SELECT prompt_tokens FROM messages WHERE id = ?", [final.message_id])
    assert prompt_tokens <= 200 - 8
    with pytest.raises(UserInputError) as info:
        next(turns.stream_turn(alice, "long " * 400, conv))
    assert info.value.code == "context_overflow" and info.value.params["budget"] == 192


def test_other_users_conversations_are_not_found(services):
    alice, bob = user(services), user(services, "finance-reviewer")
    conv = run_turn(services.engine.turns, alice, "mine")[-1].conversation_id
    with pytest.raises(ConversationNotFound):
        services.engine.conversations.messages_of(bob, conv)
    with pytest.raises(ConversationNotFound):
        next(services.engine.turns.stream_turn(bob, "let me in", conv))


def test_feedback_only_on_your_own_answers(services):
    alice, bob = user(services), user(services, "hr-admin")
    final = run_turn(services.engine.turns, alice, "q")[-1]
    services.engine.conversations.rate(alice, final.message_id, -1, "  wrong figure  ")
    assert chats.get_feedback(services.db, final.message_id, alice.id)["comment"] == "wrong figure"
    with pytest.raises(LookupError):
        services.engine.conversations.rate(bob, final.message_id, 1)  # even an admin of another department
    with pytest.raises(LookupError):
        services.engine.conversations.rate(alice, final.user_message_id, 1)  # a question is not an answer
    with pytest.raises(ValueError):
        services.engine.conversations.rate(alice, final.message_id, 5)


def test_leaving_mid_answer_keeps_the_partial_answer(services):
    turns = runner(services, TurnSettings(
        system_prompt="s", max_message_chars=1000, thinking=False,
        generation=GenerationParams(max_new_tokens=300, temperature=0.0)))
    stream = turns.stream_turn(user(services), "tell me everything")
    first = next(stream)
    next(stream)  # one piece of the answer arrived
    stream.close()  # the browser tab closed
    row = services.db.query_one(
        "SELECT finish_reason, completion_tokens FROM messages WHERE conversation_id = ? AND role = 'assistant'",
        [first.conversation_id])
    assert row["finish_reason"] == "cancelled" and row["completion_tokens"] < 300


def test_thinking_is_logged_but_not_shown(services, monkeypatch):
    pieces = ["<think>", "the user wants", " a number", "</think>", "\n\n42"]
    def scripted_stream(prompt, params, adapter, result, guide=None):
        # the tiny random model cannot think; script what Qwen3 emits in thinking mode
        yield from pieces

    monkeypatch.setattr(services.model, "stream", scripted_stream)
    final = run_turn(services.engine.turns, user(services), "answer?")[-1]
    assert final.answer == "42"
    row = services.db.query_one("SELECT content, thinking FROM messages WHERE id = ?", [final.message_id])
    assert row == {"content": "42", "thinking": "the user wants a number"}
