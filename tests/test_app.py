"""The launched app, driven over HTTP with gradio_client as a program would."""

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from storage import chats
from webapp.demo import DEMO_PASSWORD


def login(url, username, password=DEMO_PASSWORD):
    return Client(url, auth=(username, password), verbose=False)


def test_wrong_password_is_refused_without_saying_which_part(running_app):
    url, _ = running_app
    for username, password in [("finance-employee", "wrong"), ("no-such-user", DEMO_PASSWORD)]:
        with pytest.raises(ValueError) as info:
            login(url, username, password)
        assert "Could not login" in str(info.value)
        assert "password" not in str(info.value).lower() and "user" not in str(info.value).lower()


def test_chat_and_feedback_land_in_duckdb_with_the_right_user_and_adapter(running_app):
    url, services = running_app
    client = login(url, "finance-employee")
    me = client.predict(api_name="/whoami")
    assert me == {"username": "finance-employee", "role": "employee", "owner": False, "department": "finance",
                  "model": "tiny-qwen3", "adapter": None, "adapter_version": None}

    job = client.submit("上季度华东区销售额是多少？", None, api_name="/chat")
    updates = list(job)
    final = job.result()
    assert final["done"] and final["answer"] and final["message_id"]
    assert len(updates) > 2, "the answer should stream in pieces"

    follow = client.predict("And the quarter before?", final["conversation_id"], api_name="/chat")
    assert follow["conversation_id"] == final["conversation_id"]
    client.predict(final["message_id"], -1, "没有查数据 / did not look the numbers up", api_name="/feedback")
    client.predict(follow["message_id"], 1, "", api_name="/feedback")

    alice = services.auth.current_user("finance-employee")
    conversation = chats.get_conversation(services.db, final["conversation_id"])
    assert conversation.user_id == alice.id and conversation.department_id == "finance"
    rows = services.db.query(
        "SELECT m.id, m.role, m.model, m.adapter, f.rating, f.comment, f.user_id FROM messages m"
        " LEFT JOIN feedback f ON f.message_id = m.id WHERE m.conversation_id = ? ORDER BY m.id",
        [final["conversation_id"]],
    )
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    assert rows[0]["id"] == final["user_message_id"]
    assert (rows[1]["rating"], rows[1]["comment"], rows[1]["user_id"]) == (-1, "没有查数据 / did not look the numbers up", alice.id)
    assert rows[3]["rating"] == 1 and rows[1]["model"] == "tiny-qwen3"
    generated = services.db.query_one(  # every round of the turn (tool calls included)
        "SELECT sum(completion_tokens) AS n FROM messages WHERE role = 'assistant' AND id > ? AND id <= ?",
        [final["user_message_id"], final["message_id"]])["n"]
    assert final["completion_tokens"] == generated > 0  # the client is told what was generated

    listed = client.predict(api_name="/conversations")
    assert [c["id"] for c in listed] == [final["conversation_id"]]
    view = client.predict(final["conversation_id"], api_name="/conversation")
    turn = [i for i in view["items"] if i["type"] != "sources"]  # passages: tests/test_knowledge.py
    assert [i["type"] for i in turn] == ["user", "text", "user", "text"] and view["pending"] == []
    assert turn[0]["content"] == "上季度华东区销售额是多少？"
    assert turn[1]["message_id"] == final["message_id"] and turn[1]["rating"] == -1


def test_nobody_reads_or_rates_another_users_conversation(running_app):
    url, _ = running_app
    owner = login(url, "finance-employee")
    answer = owner.predict("private question", None, api_name="/chat")
    intruder = login(url, "hr-admin")  # an admin of another department: still not theirs
    assert intruder.predict(api_name="/conversations") == []
    with pytest.raises(AppError, match="not found"):
        intruder.predict(answer["conversation_id"], api_name="/conversation")
    with pytest.raises(AppError, match="not found"):
        intruder.predict("continue it", answer["conversation_id"], api_name="/chat")
    with pytest.raises(AppError, match="Only the assistant"):
        intruder.predict(answer["message_id"], -1, "", api_name="/feedback")


def test_review_and_admin_handlers_refuse_other_roles_on_the_server(running_app):
    url, _ = running_app
    employee = login(url, "finance-employee")
    for endpoint in ("/review_queue", "/admin_overview", "/samples_export"):
        with pytest.raises(AppError, match="not allowed"):
            employee.predict(api_name=endpoint)
    reviewer = login(url, "finance-reviewer")
    assert reviewer.predict(api_name="/review_queue") == []
    with pytest.raises(AppError, match="needs the role admin"):
        reviewer.predict(api_name="/admin_overview")
    admin = login(url, "hr-admin")
    assert admin.predict(api_name="/admin_overview")["users"] == 3, "an admin's overview is their department's"
    assert login(url, "company-owner").predict(api_name="/admin_overview")["users"] == 7


def test_bad_input_gets_a_clear_message_and_nothing_is_stored(running_app):
    url, services = running_app
    client = login(url, "hr-employee")
    with pytest.raises(AppError, match="empty"):
        client.predict("   ", None, api_name="/chat")
    with pytest.raises(AppError, match="200,000 characters; the limit is 16,000"):
        client.predict("长" * 200_000, None, api_name="/chat")
    assert services.db.scalar("SELECT count(*) FROM messages") == 0
    # and the app still answers
    assert client.predict("still there?", None, api_name="/chat")["done"]


def test_concurrent_users_get_their_own_answers(running_app):
    url, services = running_app
    clients = {name: login(url, name) for name in ("finance-employee", "hr-employee", "finance-reviewer")}
    jobs = {name: c.submit(f"question from {name}", None, api_name="/chat") for name, c in clients.items()}
    results = {name: job.result(timeout=120) for name, job in jobs.items()}
    for name, result in results.items():
        rows = chats.list_messages(services.db, result["conversation_id"])
        assert rows[0].content == f"question from {name}"
        assert rows[1].content == result["answer"]
        owner = chats.get_conversation(services.db, result["conversation_id"]).user_id
        assert owner == services.auth.current_user(name).id


def test_gradios_copies_of_uploads_are_removed_when_the_server_stops(services, tmp_path):
    """Documents and attachments go into the knowledge base or the database; Gradio's copies
    in its temp folder must not outlive the server (nor, running, the hour they are kept)."""
    from webapp.app import build_app
    from webapp.server import BackgroundServer, build_server

    blocks = build_app(services)
    upload = tmp_path / "gradio-cache" / "contract.txt"
    upload.parent.mkdir()
    upload.write_text("Contract 2026-17")
    blocks.upload_file_set.add(str(upload))  # where Gradio's upload route records what it saved
    server = BackgroundServer(build_server(services, blocks), "127.0.0.1", services.settings.port).start()
    try:
        assert upload.exists(), "a fresh upload stays while the server runs"
    finally:
        server.stop()
    assert not upload.exists()
