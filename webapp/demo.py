"""First start: a demo company, or one admin with a random password."""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path

from storage import accounts, company
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
