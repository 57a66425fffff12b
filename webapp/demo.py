"""First start: a demo company, or one admin with a random password."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from pathlib import Path

from storage import accounts, chats, company
from storage.db import Database
from webapp.auth import Auth

DEMO_DEPARTMENTS = {"finance": "Finance 财务部", "hr": "Human Resources 人力资源部"}
DEMO_PASSWORD = "hangjia-demo"  # demo only; stated in the README
# The demo's one company-wide user: seeded as an admin of finance, granted the owner role by
# demo mode's configuration (see Settings.owners).
DEMO_OWNER = ("company-owner", "admin", "finance")


def demo_users() -> list[tuple[str, str, str]]:
    """(username, role, department) for one user per role and department."""
    return [(f"{dept}-{role}", role, dept) for dept in DEMO_DEPARTMENTS for role in accounts.ROLES]


def seed_demo_company(db: Database, auth: Auth) -> bool:
    """Seed departments and demo users into an empty database; False if it has users."""
    if accounts.count_users(db):
        return False
    for dept_id, name in DEMO_DEPARTMENTS.items():
        accounts.add_department(db, dept_id, name)
    for username, role, dept in [*demo_users(), DEMO_OWNER]:
        auth.create_user(username, DEMO_PASSWORD, role, dept)
    # the demo company's systems, reached through the demo tools
    company.seed_sales(db, dt.date.today())
    company.seed_customers(db)
    return True


def ensure_first_admin(db: Database, auth: Auth) -> str | None:
    """On an empty database, create `admin` with a random password and return it (shown once)."""
    if accounts.count_users(db):
        return None
    accounts.add_department(db, "general", "General 综合部")
    password = secrets.token_urlsafe(12)
    auth.create_user("admin", password, "admin", "general")
    return password


DEMO_DOCUMENTS_DIR = Path(__file__).parent / "knowledge" / "demo"


def demo_documents() -> list[tuple[Path, list[str], bool]]:
    """(file, departments, company-wide) for the demo knowledge base: the file name's
    prefix says who reads it (finance-, hr-, company-)."""
    out = []
    for path in sorted(DEMO_DOCUMENTS_DIR.glob("*.md")):
        prefix = path.name.split("-", 1)[0]
        out.append((path, [] if prefix == "company" else [prefix], prefix == "company"))
    return out


def seed_demo_documents(knowledge) -> int:
    """Load the demo documents into an empty knowledge base; returns how many were added."""
    if knowledge.documents():
        return 0
    added = 0
    for path, departments, company_wide in demo_documents():
        reports = knowledge.add_files([(path.name, path.read_bytes())], departments, company_wide)
        added += sum(r.status == "added" for r in reports)
    return added


DEMO_FEEDBACK = Path(__file__).with_name("demo_feedback.jsonl")


def seed_demo_feedback(db: Database, auth: Auth, review, model_name: str) -> tuple[int, int]:
    """The demo company's first weeks, so that one Retrain shows the loop: finance employees
    asked for sales figures, the untrained model answered without looking them up, they
    pressed 👎; a reviewer corrected most answers with the query_sales call (through the review
    service, as the Review tab does). The rest wait in the review queue for the newcomer.
    Returns (corrected, waiting)."""
    employee, reviewer = auth.current_user("finance-employee"), auth.current_user("finance-reviewer")
    corrected = waiting = 0
    for line in DEMO_FEEDBACK.read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        _, (_, answer_id) = chats.start_conversation(
            db, employee.id, employee.department_id, case["question"][:60],
            [("user", case["question"], {}), ("assistant", case["answer"], {"model": model_name})])
        chats.record_feedback(db, answer_id, employee.id, -1, case["comment"])
        if case["reviewed"]:
            review.decide(reviewer, answer_id, "approved", reason="should_call_tool", tool_name="query_sales",
                          tool_arguments=case["call"])
            corrected += 1
        else:
            waiting += 1
    return corrected, waiting
