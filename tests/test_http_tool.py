"""An HTTP tool defined in a TOML file, against a real HTTP server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from storage import Database, migrate, tool_audit
from webapp.auth import Auth
from webapp.demo import seed_demo_company
from webapp.tools.builtin import BUILTINS
from webapp.tools.executor import ToolExecutor
from webapp.tools.parser import ToolCall
from webapp.tools.registry import load_registry


class FakeErp(BaseHTTPRequestHandler):
    requests: list = []
    failures_left = {"/api/invoices/INV-503": 2}

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        FakeErp.requests.append({"method": self.command, "path": self.path, "body": body,
                                 "auth": self.headers.get("Authorization"), "user": self.headers.get("X-Hangjia-User")})
        path = self.path.split("?")[0]
        if FakeErp.failures_left.get(path, 0) > 0:
            FakeErp.failures_left[path] -= 1
            self.send_response(503)
            self.end_headers()
            return
        if path.endswith("INV-404"):
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"no such invoice")
            return
        payload = json.dumps({"path": path, "body": json.loads(body) if body else None}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def erp():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeErp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeErp.requests = []
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def executor(tmp_path, erp):
    tools = tmp_path / "tools.toml"
    tools.write_text(f"""
[[tool]]
name = "get_invoice"
description = "Look up an invoice in the ERP by its number."
kind = "http"
method = "GET"
url = "{erp}/api/invoices/{{invoice_id}}"
headers = {{ Authorization = "Bearer ${{ERP_TOKEN}}" }}
departments = ["finance"]
retries = 2
backoff_s = 0
[tool.parameters]
type = "object"
required = ["invoice_id"]
properties.invoice_id = {{ type = "string" }}
properties.fields = {{ type = "string" }}

[[tool]]
name = "create_ticket"
description = "Open a ticket in the helpdesk."
kind = "http"
method = "POST"
url = "{erp}/api/tickets"
side_effect = true
[tool.parameters]
type = "object"
required = ["title"]
properties.title = {{ type = "string" }}
""")
    db = Database(tmp_path / "h.duckdb")
    migrate(db)
    auth = Auth(db)
    seed_demo_company(db, auth)
    registry = load_registry([tools], BUILTINS, environ={"ERP_TOKEN": "s3cret"})
    ex = ToolExecutor(registry, db, sleep=lambda s: None)
    yield ex, auth
    ex.close()
    db.close()


def test_get_with_path_parameter_header_from_env_and_query(executor):
    ex, auth = executor
    outcome = ex.execute(auth.current_user("finance-employee"),
                         ToolCall("get_invoice", {"invoice_id": "INV-1", "fields": "total"}))
    assert outcome.status == "ok" and json.loads(outcome.content)["path"] == "/api/invoices/INV-1"
    request = FakeErp.requests[-1]
    assert request["path"] == "/api/invoices/INV-1?fields=total"
    assert request["auth"] == "Bearer s3cret" and request["user"] == "finance-employee"


def test_arguments_cannot_change_the_path(executor):
    ex, auth = executor
    ex.execute(auth.current_user("finance-employee"), ToolCall("get_invoice", {"invoice_id": "../../admin"}))
    assert FakeErp.requests[-1]["path"] == "/api/invoices/..%2F..%2Fadmin"


def test_5xx_is_retried_4xx_is_not(executor):
    ex, auth = executor
    user = auth.current_user("finance-employee")
    flaky = ex.execute(user, ToolCall("get_invoice", {"invoice_id": "INV-503"}))
    assert flaky.status == "ok"
    assert [r.status for r in tool_audit.attempts_of(ex.db, flaky.call_id)] == ["error", "error", "ok"]
    missing = ex.execute(user, ToolCall("get_invoice", {"invoice_id": "INV-404"}))
    assert missing.status == "error" and "404" in missing.content and "no such invoice" in missing.content
    assert len(tool_audit.attempts_of(ex.db, missing.call_id)) == 1


def test_permissions_from_the_file_apply(executor):
    ex, auth = executor
    assert ex.execute(auth.current_user("hr-employee"), ToolCall("get_invoice", {"invoice_id": "1"})).status == "denied"
    assert FakeErp.requests == []


def test_post_with_side_effect_is_sent_only_after_approval(executor):
    ex, auth = executor
    user = auth.current_user("hr-employee")
    pending = ex.execute(user, ToolCall("create_ticket", {"title": "打印机坏了"}))
    assert pending.status == "pending" and FakeErp.requests == []
    done = ex.resolve_pending(user, pending.call_id, True)
    assert done.status == "ok"
    assert FakeErp.requests[-1]["method"] == "POST" and json.loads(FakeErp.requests[-1]["body"]) == {"title": "打印机坏了"}


def test_unreachable_system_is_a_clear_transient_error(tmp_path):
    tools = tmp_path / "t.toml"
    tools.write_text("""
[[tool]]
name = "dead"
description = "nothing listens here"
kind = "http"
url = "http://127.0.0.1:9/x"
retries = 1
backoff_s = 0
""")
    db = Database(tmp_path / "d.duckdb")
    migrate(db)
    auth = Auth(db)
    seed_demo_company(db, auth)
    ex = ToolExecutor(load_registry([tools], BUILTINS), db, sleep=lambda s: None)
    outcome = ex.execute(auth.current_user("hr-employee"), ToolCall("dead", {}))
    assert outcome.status == "error" and "could not be reached" in outcome.content
    assert len(tool_audit.attempts_of(db, outcome.call_id)) == 2
    ex.close()
    db.close()
