"""The OpenAI-compatible API, driven with the official `openai` client against the
launched server, and the Prometheus endpoint read with prometheus_client's parser."""

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage import audit, chats, tool_audit
from tests.conftest import make_lora_adapter
from tests.test_knowledge import HR_SECRET, add_hr_secret
from tests.test_tool_turns import call


def client_for(running_app, username, name="test"):
    url, services = running_app
    user = services.auth.current_user(username)
    _, key = services.auth.create_api_key(user, name)
    return openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0, timeout=120), key


def test_chat_answers_through_the_same_turn_as_the_browser_and_is_logged(running_app):
    url, services = running_app
    client, _ = client_for(running_app, "finance-employee")
    models = client.models.list()
    assert [m.id for m in models.data] == ["hangjia-finance"]

    reply = client.chat.completions.create(
        model="hangjia-finance", messages=[{"role": "user", "content": "What is gross margin?"}])
    extra = reply.model_extra["hangjia"]
    stored = chats.list_messages(services.db, extra["conversation_id"])
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[0].content == "What is gross margin?"
    assert reply.choices[0].message.content == stored[1].content
    conversation = chats.get_conversation(services.db, extra["conversation_id"])
    assert conversation.user_id == services.auth.current_user("finance-employee").id
    outcome = chats.message_outcome(services.db, stored[1].id)
    assert reply.usage.completion_tokens == outcome["completion_tokens"] > 0
    assert reply.usage.prompt_tokens == outcome["prompt_tokens"] > 0

    # continuing the stored conversation by id: the engine sees the earlier turn
    follow = client.chat.completions.create(
        model="hangjia", messages=[{"role": "user", "content": "And net margin?"}],
        extra_body={"conversation_id": extra["conversation_id"]})
    assert follow.model_extra["hangjia"]["conversation_id"] == extra["conversation_id"]
    assert len(chats.list_messages(services.db, extra["conversation_id"])) == 4


def test_streaming_yields_the_stored_answer_piece_by_piece(running_app):
    url, services = running_app
    client, _ = client_for(running_app, "hr-employee")
    stream = client.chat.completions.create(
        model="hangjia-hr", stream=True,
        messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
                  {"role": "user", "content": "How many leave days do I have?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "it streamed"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    conversation_id = chunks[-1].model_extra["hangjia"]["conversation_id"]
    stored = chats.list_messages(services.db, conversation_id)
    # the client's earlier turns were stored first, so the review and audit see what the model saw
    assert [(m.role, m.content) for m in stored[:3]] == [
        ("user", "Hello"), ("assistant", "Hi, how can I help?"), ("user", "How many leave days do I have?")]
    assert text == stored[3].content


def test_tools_run_on_the_server_with_the_callers_permissions(running_app, script):
    url, services = running_app
    script(call("query_sales", region="East China", period="last_quarter"), "East China sold well.",
           call("query_sales", region="East China", period="last_quarter"), "I cannot see sales.")
    finance, _ = client_for(running_app, "finance-employee")
    reply = finance.chat.completions.create(model="hangjia-finance",
                                            messages=[{"role": "user", "content": "Sales in East China?"}])
    assert reply.choices[0].message.content == "East China sold well."
    actions = reply.model_extra["hangjia"]["actions"]
    assert [(a["tool"], a["status"]) for a in actions] == [("query_sales", "ok")]
    logged = tool_audit.latest_of_conversation(services.db, reply.model_extra["hangjia"]["conversation_id"])
    assert [(r.tool, r.status, r.user_id) for r in logged] == [
        ("query_sales", "ok", services.auth.current_user("finance-employee").id)]

    hr, _ = client_for(running_app, "hr-employee")
    denied = hr.chat.completions.create(model="hangjia-hr", messages=[{"role": "user", "content": "Sales?"}])
    assert [a["status"] for a in denied.model_extra["hangjia"]["actions"]] == ["denied"]


def test_a_side_effect_waits_for_approval_through_the_api(running_app, script):
    url, services = running_app
    script(call("send_email", to="boss@example.com", subject="Hi", body="Numbers attached."), "Sent.")
    client, key = client_for(running_app, "finance-employee")
    reply = client.chat.completions.create(model="hangjia", messages=[{"role": "user", "content": "Email my boss"}])
    pending = reply.model_extra["hangjia"]["pending"]
    assert len(pending) == 1 and pending[0]["tool"] == "send_email"
    other, other_key = client_for(running_app, "hr-employee")
    refused = httpx.post(f"{url}v1/actions/{pending[0]['call_id']}", json={"approve": True},
                         headers={"Authorization": f"Bearer {other_key}"})
    assert refused.status_code == 404, "another user cannot approve it"
    done = httpx.post(f"{url}v1/actions/{pending[0]['call_id']}", json={"approve": True},
                      headers={"Authorization": f"Bearer {key}"}, timeout=120).json()
    assert done["choices"][0]["message"]["content"] == "Sent."
    assert [a["status"] for a in done["hangjia"]["actions"]] == ["ok"]


def test_each_key_gets_its_departments_adapter_and_documents_only(running_app, script, tiny_model_dir, tmp_path):
    url, services = running_app
    services.model.load_adapter("finance", make_lora_adapter(tiny_model_dir, tmp_path / "fin", seed=1), "v7")
    add_hr_secret(services.knowledge)
    model = script("I do not know.", "Here it is.")
    finance, _ = client_for(running_app, "finance-employee")
    hr, _ = client_for(running_app, "hr-employee")
    with pytest.raises(openai.NotFoundError):
        hr.chat.completions.create(model="hangjia-finance", messages=[{"role": "user", "content": "hi"}])
    assert hr.models.list().data[0].model_extra["adapter_version"] is None
    assert finance.models.list().data[0].model_extra["adapter_version"] == "v7"

    question = "What is the confidential HR bonus pool for 2026?"
    from_finance = finance.chat.completions.create(model="hangjia-finance",
                                                   messages=[{"role": "user", "content": question}])
    assert from_finance.model_extra["hangjia"]["adapter_version"] == "v7"
    assert "8.8 million" not in model.prompts[0] and not from_finance.model_extra["hangjia"]["sources"]
    from_hr = hr.chat.completions.create(model="hangjia-hr", messages=[{"role": "user", "content": question}])
    assert from_hr.model_extra["hangjia"]["adapter"] is None
    assert any(s["text"] == HR_SECRET for s in from_hr.model_extra["hangjia"]["sources"])  # positive control


def test_no_key_a_wrong_key_and_a_revoked_key_are_refused(running_app):
    url, services = running_app
    client, key = client_for(running_app, "finance-employee")
    body = {"model": "hangjia", "messages": [{"role": "user", "content": "hi"}]}
    before = chats.usage_summary(services.db)["messages"]
    assert httpx.post(url + "v1/chat/completions", json=body).status_code == 401
    wrong = openai.OpenAI(base_url=url + "v1", api_key="hj-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(**body)
    user = services.auth.current_user("finance-employee")
    key_id = services.auth.keys_visible_to(user)[0]["id"]
    hr_admin = services.auth.current_user("hr-admin")
    with pytest.raises(PermissionError):
        services.auth.revoke_api_key(hr_admin, key_id)  # not their department's key
    services.auth.revoke_api_key(user, key_id)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(**body)
    assert chats.usage_summary(services.db)["messages"] == before, "refused calls store nothing"
    assert [e["action"] for e in audit.events(services.db, "api_key.")][:2] == ["api_key.revoke", "api_key.create"]


def test_bad_requests_get_openai_shaped_errors(running_app):
    url, services = running_app
    _, key = client_for(running_app, "finance-employee")
    headers = {"Authorization": f"Bearer {key}"}
    cases = [
        (b"{not json", 400), (json.dumps({"model": "hangjia", "messages": []}).encode(), 400),
        (json.dumps({"model": "hangjia", "messages": [{"role": "user", "content": "x" * 20000}]}).encode(), 400),
        (json.dumps({"model": "hangjia", "messages": [{"role": "user", "content": "hi"}],
                     "conversation_id": 999999}).encode(), 404),
        (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404),
    ]
    for body, status in cases:
        response = httpx.post(url + "v1/chat/completions", content=body, headers=headers)
        assert response.status_code == status, (body[:60], response.text)
        assert response.json()["error"]["message"]
    # raw completions are an admin's (a generation backend), not an employee's
    assert httpx.post(url + "v1/completions", json={"model": "hangjia", "prompt": "hi"},
                      headers=headers).status_code == 403


def test_prometheus_endpoint_parses_and_counts(running_app):
    url, services = running_app
    client, _ = client_for(running_app, "finance-employee")
    client.chat.completions.create(model="hangjia", messages=[{"role": "user", "content": "hi there"}])
    assert httpx.get(url + "metrics").status_code == 401
    employee_key = client.api_key
    assert httpx.get(url + "metrics", headers={"Authorization": f"Bearer {employee_key}"}).status_code == 401
    _, admin_key = client_for(running_app, "finance-admin")
    text = httpx.get(url + "metrics", headers={"Authorization": f"Bearer {admin_key}"}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["hangjia_http_requests"].samples
                if s.name.endswith("_total")}
    assert requests[("/v1/chat/completions", "200")] == 1
    tokens = {s.labels["kind"]: s.value for s in families["hangjia_tokens"].samples if s.name.endswith("_total")}
    assert tokens["completion"] > 0 and tokens["prompt"] > 0
    answers = {s.labels["outcome"]: s.value for s in families["hangjia_answers"].samples}
    assert answers["ok"] == chats.usage_summary(services.db)["messages"] / 2
    assert "hangjia_generation_duration_seconds" in families


def test_documents_attached_over_the_api_reach_the_model_as_in_the_browser(running_app, script):
    """OpenAI's file content parts: the document goes in whole (it fits), is stored with the
    message, and the response says so; broken parts get a clear 400 and store nothing."""
    import base64

    url, services = running_app
    scripted = script("The notice period is 45 days.")
    client, key = client_for(running_app, "finance-employee")
    document = "# Supplier contract\n\nEither party may end this contract with a notice period of 45 days.\n"
    data_url = "data:text/markdown;base64," + base64.b64encode(document.encode()).decode()
    reply = client.chat.completions.create(model="hangjia-finance", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What notice period does the attached contract set?"},
        {"type": "file", "file": {"filename": "contract.md", "file_data": data_url}}]}])
    assert reply.choices[0].message.content == "The notice period is 45 days."
    assert "notice period of 45 days" in scripted.prompts[-1]
    extra = reply.model_extra["hangjia"]
    assert any("contract.md" in notice for notice in extra["notices"])
    stored = services.db.query("SELECT filename, mode FROM message_attachments")
    assert [(r["filename"], r["mode"]) for r in stored] == [("contract.md", "whole")]

    headers = {"Authorization": f"Bearer {key}"}
    before = services.db.query_one("SELECT count(*) AS n FROM messages")["n"]
    for part, says in [
        ({"type": "file", "file": {"filename": "x.md", "file_data": "not base64!"}}, "not valid base64"),
        ({"type": "file", "file": {"file_id": "file-abc"}}, "Uploaded-file ids are not supported"),
        ({"type": "file", "file": {"filename": "tool.exe", "file_data": base64.b64encode(b"MZ").decode()}}, "exe"),
    ]:
        response = httpx.post(url + "v1/chat/completions", headers=headers, json={
            "model": "hangjia", "messages": [{"role": "user", "content": [{"type": "text", "text": "Read it"}, part]}]})
        assert response.status_code == 400 and says in response.json()["error"]["message"], response.text
    assert services.db.query_one("SELECT count(*) AS n FROM messages")["n"] == before


def test_an_endless_body_is_refused_at_the_limit_not_read_into_memory(running_app):
    """A body 4x the limit without a Content-Length: the server keeps at most about the limit
    in memory (it used to read the whole body, then refuse it), and answers 413."""
    import tracemalloc

    from webapp.openai_api import MAX_BODY_BYTES

    url, _ = running_app
    _, key = client_for(running_app, "finance-employee")

    def endless():  # no Content-Length: the server must count as it reads
        chunk = b" " * (1 << 20)
        for _ in range(4 * MAX_BODY_BYTES // len(chunk)):
            yield chunk

    tracemalloc.start()  # the server runs in this process: its allocations are traced too
    try:
        response = httpx.post(url + "v1/chat/completions", content=endless(), timeout=120,
                              headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 413 and "over the limit" in response.json()["error"]["message"]
    assert peak < 2 * MAX_BODY_BYTES, f"{peak / 2**20:.0f} MiB held for a {4 * MAX_BODY_BYTES / 2**20:.0f} MiB body"


def test_a_streamed_answer_that_copied_the_tools_streams_only_what_was_decoded_again(running_app, script):
    """The copy is held back, so a client's stream (which cannot take text back) never sees it and
    goes on with the call and the answer."""
    from tests.test_degeneration import SCHEMA_ECHO

    script(SCHEMA_ECHO, call("query_sales", region="East China", period="last_quarter"), "East China sold well.")
    client, _ = client_for(running_app, "finance-employee")
    chunks = list(client.chat.completions.create(model="hangjia-finance", stream=True,
                                                 messages=[{"role": "user", "content": "Sales in East China?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "East China sold well." and '"type"' not in text
    assert [a["tool"] for a in chunks[-1].model_extra["hangjia"]["actions"]] == ["query_sales"]
