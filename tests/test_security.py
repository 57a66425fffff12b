"""What an attacker sends over HTTP, replayed: file paths of the server's own files, another
session's uploads, and staff of one department reaching into another's. Every refused call
leaves DuckDB as it was and reads, stores or copies nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_access import call, handlers, session, table_counts
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
    # another user (here an admin too) may not hand that path to a handler
    before = table_counts(services)
    assert call(hr_admin, add, [[file_data(path)], ["hr"]])[0] == 403
    # nor may another login session of the same user
    assert call(session(url, "finance-admin"), add, [[file_data(path)], ["finance"]])[0] == 403
    assert table_counts(services) == before
    # positive control: the session that uploaded it adds it
    assert call(finance_admin, add, [[file_data(path)], ["finance"]], page) == (200, None)
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
