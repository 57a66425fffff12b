"""What an attacker sends over HTTP, replayed: file paths of the server's own files, another
session's uploads, and staff of one department reaching into another's. Every refused call
leaves DuckDB as it was and reads, stores or copies nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_access import call, client, finance_world, handlers, session, table_counts
from webapp.app import build_app

CANARY = "CANARY-7f3a-secret-of-the-server"


@pytest.fixture
def canary(tmp_path) -> dict[str, Path]:
    """Files outside Gradio's upload folder, one per type a file input accepts."""
    folder = tmp_path / "server-files"
    folder.mkdir()
    files = {ext: folder / f"secret{ext}" for ext in (".md", ".jsonl", ".json", ".txt", ".bin")}
    for ext, path in files.items():
        line = json.dumps({"messages": [{"role": "user", "content": CANARY}]}) if "json" in ext else CANARY
        path.write_text(line + "\n", encoding="utf-8")
    return files


def gradio_copies_of_canary() -> list[Path]:
    from gradio.utils import get_upload_folder

    root = Path(get_upload_folder())
    found = []
    for path in root.rglob("*") if root.exists() else ():
        try:
            if path.is_file() and CANARY.encode() in path.read_bytes():
                found.append(path)
        except OSError:
            pass
    return found


def file_data(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}


def index_of(found, name) -> int:
    return next(i for i, _, handler, _ in found if handler == name)


def upload(client, name: str, text: str) -> str:
    response = client.post("gradio_api/upload", files=[("files", (name, text.encode(), "text/plain"))])
    assert response.status_code == 200, response.text
    return response.json()[0]


def nothing_stored(services) -> None:
    stored = [r["t"] for r in services.db.query(
        "SELECT content AS t FROM messages UNION ALL SELECT text FROM kb_chunks"
        " UNION ALL SELECT messages FROM training_samples")]
    assert not [t for t in stored if CANARY in (t or "")]
    assert gradio_copies_of_canary() == []


def test_no_file_input_reads_or_copies_a_server_path(running_app, canary):
    url, services = running_app
    blocks = build_app(services)
    admin = session(url, "finance-admin")
    found = handlers(blocks, admin.get("config").json())
    send, add, import_ = (index_of(found, n) for n in ("send", "add_documents", "import_samples"))
    before = table_counts(services)
    for path in canary.values():
        employee = session(url, "hr-employee")
        status, error = call(employee, send, [{"text": "Summarize the attachment", "files": [file_data(path)]},
                                              [], None, []])
        assert status == 403 or error, "the chat read a server file"
        # the same without Gradio's meta: the handler would still see a path
        status, _ = call(employee, send, [{"text": "Summarize", "files": [{"path": str(path)}]}, [], None, []])
        assert status == 403
        assert call(admin, add, [[file_data(path)], ["finance"]])[0] == 403
        reviewer = session(url, "finance-reviewer")
        assert call(reviewer, import_, [file_data(path), "finance"])[0] == 403
        # a path that climbs out of Gradio's folder is no better
        from gradio.utils import get_upload_folder
        climbing = os.path.join(get_upload_folder(), "x", "..", "..", "..", str(path).lstrip("/"))
        assert call(admin, add, [[file_data(climbing)], ["finance"]])[0] == 403
    assert table_counts(services) == before
    nothing_stored(services)


def test_an_upload_is_usable_by_its_own_session_only(running_app):
    url, services = running_app
    blocks = build_app(services)
    finance_admin, hr_admin = session(url, "finance-admin"), session(url, "hr-admin")
    found = handlers(blocks, finance_admin.get("config").json())
    add, listing = index_of(found, "add_documents"), index_of(found, "listing")
    page = "tab-of-finance"
    assert call(finance_admin, listing, [], page) == (200, None)  # the page shows the departments to choose
    path = upload(finance_admin, "travel-policy.md", "# Travel\n\nTrain tickets are booked through the portal.")
    # several files at once, the answer compressed as a browser asks for it (brotli): still recorded
    many = finance_admin.post("gradio_api/upload", headers={"Accept-Encoding": "br, gzip"}, files=[
        ("files", (f"policy-{'x' * 80}-{i}.md", f"# Policy {i}\n\nRule {i}.".encode(), "text/plain")) for i in range(6)])
    assert many.status_code == 200 and len(many.json()) == 6
    # another user (here an admin too) may not hand that path to a handler
    before = table_counts(services)
    assert call(hr_admin, add, [[file_data(path)], ["hr"]])[0] == 403
    # nor may another login session of the same user
    assert call(session(url, "finance-admin"), add, [[file_data(path)], ["finance"]])[0] == 403
    assert table_counts(services) == before
    # positive control: the session that uploaded them adds them
    assert call(finance_admin, add, [[file_data(path)], ["finance"]], page) == (200, None)
    assert call(finance_admin, add, [[file_data(p) for p in many.json()], ["finance"]], page) == (200, None)
    assert [d.source_name for d in services.knowledge.documents("finance")].count("travel-policy.md") == 1


def test_an_attachment_uploaded_by_the_employee_goes_into_the_prompt(running_app):
    url, services = running_app
    blocks = build_app(services)
    employee = session(url, "hr-employee")
    found = handlers(blocks, employee.get("config").json())
    send = index_of(found, "send")
    path = upload(employee, "notes.txt", "Meeting on Friday about the onboarding plan.")
    assert call(employee, send, [{"text": "Summarize the attachment", "files": [file_data(path)]}, [], None, []]) \
        == (200, None)
    rows = services.db.query("SELECT filename, mode FROM message_attachments")
    assert [(r["filename"], r["mode"]) for r in rows] == [("notes.txt", "whole")]


# -- roles are per department (the department dimension of every handler: tests/test_access.py) --

def test_a_reviewers_tool_correction_runs_as_the_employee_and_is_audited_as_the_reviewers(running_app, script):
    from storage import audit, tool_audit

    url, services = running_app
    final = finance_world(services, script)
    reviewer = client(url, "finance-reviewer")
    decided = reviewer.predict(final.message_id, "approved", "should_call_tool", "East China sold 3.2 million.",
                               "query_sales", '{"region": "华东", "period": "last_quarter"}', "",
                               api_name="/review_decide")
    assert decided["sample_id"]
    rows = tool_audit.attempts_of(services.db, f"call_review_{final.message_id}")
    employee, reviewer_user = (services.auth.current_user(n) for n in ("finance-employee", "finance-reviewer"))
    assert [(r.user_id, r.acted_by, r.status) for r in rows] == [(employee.id, reviewer_user.id, "ok")]
    events = audit.events(services.db, "review.tool_run")
    assert [(e["username"], json.loads(e["detail"])["on_behalf_of"]) for e in events] == \
        [("finance-reviewer", "finance-employee")]


def test_the_owner_reaches_every_department_and_each_look_is_audited(running_app, script):
    from storage import audit

    url, services = running_app
    final = finance_world(services, script)
    hr = services.auth.current_user("hr-employee")
    script("You have 10 days.")
    list(services.engine.turns.stream_turn(hr, "How many days of annual leave do I have?"))
    owner = client(url, "company-owner")
    assert owner.predict(api_name="/whoami")["owner"] is True
    assert owner.predict(api_name="/admin_overview")["users"] == 7
    assert [c["message_id"] for c in owner.predict(-1, "finance", "", "", "", False, api_name="/review_queue")] \
        == [final.message_id]
    departments = {r["department_id"] for r in owner.predict(7, api_name="/monitoring")["daily"]}
    assert departments == {"finance", "hr"}
    actions = [e["action"] for e in audit.events(services.db, "owner.")]
    assert "owner.read.overview" in actions and "owner.read.monitoring" in actions
    # the owner's own department is theirs: no audit event for finance's queue
    assert "owner.review.queue" not in actions
    owner.predict(-1, "hr", "", "", "", False, api_name="/review_queue")
    assert "owner.review.queue" in [e["action"] for e in audit.events(services.db, "owner.")]
    assert {k["department_id"] for k in services.auth.keys_visible_to(services.auth.current_user("company-owner"))} \
        <= {"finance", "hr"}
    assert "owner.read.api_keys" in [e["action"] for e in audit.events(services.db, "owner.")]
    # a department admin neither sees nor revokes the keys of an owner sitting in the department
    key_id, _ = services.auth.create_api_key(services.auth.current_user("company-owner"), "owner's laptop")
    finance_admin = services.auth.current_user("finance-admin")
    assert key_id not in [k["id"] for k in services.auth.keys_visible_to(finance_admin)]
    with pytest.raises(Exception, match="no key"):
        services.auth.revoke_api_key(finance_admin, key_id)


def test_department_admins_manage_only_their_departments_documents(running_app):
    url, services = running_app
    blocks = build_app(services)
    hr_admin = session(url, "hr-admin")
    found = handlers(blocks, hr_admin.get("config").json())
    listing, add, delete = (index_of(found, n) for n in ("listing", "add_documents", "delete_document"))
    page = "hr-admins-tab"
    assert call(hr_admin, listing, [], page) == (200, None)
    finance_only = next(d for d in services.knowledge.documents() if d.departments == ("finance",))
    before = table_counts(services)
    planted = upload(hr_admin, "reimbursement.md", "# 报销\n\n报销需要在3天内提交，联系 fake@example.com")
    status, error = call(hr_admin, add, [[file_data(planted)], ["finance"]], page)
    assert status == 200 and "finance" in error  # not a choice HR's admin has
    replacing = upload(hr_admin, finance_only.source_name, "# Replaced by HR")
    assert call(hr_admin, add, [[file_data(replacing)], ["hr"]], page) == (200, None)
    status, error = call(hr_admin, delete, [finance_only.id], page)
    assert status == 200 and "No document" in error
    assert table_counts(services) == before, "HR's admin changed finance's knowledge"
    assert services.knowledge.documents("finance")[0].title and finance_only.id in [
        d.id for d in services.knowledge.documents("finance")]
    # HR's admin lists HR's and company-wide documents only
    _, shown = call_output(hr_admin, listing, [], page)
    frame = shown[1].get("value", shown[1])
    titles = {row[1] for row in frame["data"]}
    assert finance_only.title not in titles and titles


def call_output(client, fn_index, data, session_hash):
    """Like call, but returns the handler's output values."""
    import uuid

    session_hash = session_hash or uuid.uuid4().hex[:11]
    client.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session_hash,
                                               "trigger_id": None})
    with client.stream("GET", "gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message.get("success"), message["output"]["data"]
    return False, None


def test_users_get_clear_messages_never_python_errors(running_app, caplog):
    from gradio_client.exceptions import AppError

    url, services = running_app
    employee = client(url, "finance-employee")
    answer = employee.predict("hello", None, api_name="/chat")
    with pytest.raises(AppError) as info:
        employee.predict(answer["message_id"], 5, "", api_name="/feedback")
    assert "A rating is 1 (thumbs up) or -1 (thumbs down); this was 5" in str(info.value)
    for args, name in [(("abc",), "/conversation"), (("not-a-number", "approved"), "/review_decide")]:
        caller = employee if name == "/conversation" else client(url, "finance-reviewer")
        with pytest.raises(AppError) as info:
            caller.predict(*args, api_name=name)
        message = str(info.value)
        assert "invalid literal" not in message and "Traceback" not in message
        assert "Check it and try again" in message and "ref " in message
    assert "invalid literal" in caplog.text, "the details go to the server's log"
    # an error in Gradio's own processing of an input (a number field sent text) is not shown raw either
    blocks = build_app(services)
    browser = session(url, "hr-employee")
    revoke = index_of(handlers(blocks, browser.get("config").json()), "do_revoke")
    status, error = call(browser, revoke, ["abc"])
    assert status == 200 and error is not None and "__round__" not in error and "Traceback" not in error
