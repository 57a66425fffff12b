"""Access, route by route (the Dify #41316 lesson: an API that forgot a permission check).

Every server function the app registers — the browser's private event handlers as well as
the named API — is called over HTTP the way the browser calls it, as anonymous and as each
role of each department, and so is every /v1 route. Only what the role allows succeeds;
a refused call changes nothing in DuckDB. Roles are per department: a reviewer or admin of
HR reaches nothing of finance through the named API, /v1 or /metrics; the owner reaches all."""

import json
import uuid

import httpx
import pytest

from storage import audit, chats
from webapp.app import build_app

# The least role each group of handlers needs, by the function that registers them. A new
# handler outside these groups fails the test until someone decides who may call it.
REQUIRED_ROLE = {
    "build_app": "employee", "_register_api": "employee", "build_chat_tab": "employee",
    "build_api_keys_section": "employee", "register_knowledge_api": "employee",
    "build_review_tab": "reviewer", "register_review_api": "reviewer",
    "build_admin_tab": "admin", "register_admin_api": "admin", "build_knowledge_section": "admin",
    "build_cache_section": "admin", "register_cache_api": "admin", "build_monitoring_section": "admin",
    "build_audit_section": "admin", "register_operations_api": "admin",
}
RANK = {"anonymous": 0, "employee": 1, "reviewer": 2, "admin": 3}
USERS = [f"{d}-{r}" for d in ("finance", "hr") for r in ("employee", "reviewer", "admin")]


def handlers(blocks, config):
    """(fn_index, registering function, handler name, input values) of every server
    function of the launched app; inputs are the components' initial values, as a fresh
    page would send them."""
    values = {c["id"]: c.get("props", {}).get("value") for c in config["components"]}
    out = []
    for dependency in config["dependencies"]:
        if not dependency.get("backend_fn"):
            continue
        index = dependency["id"]
        qualname = getattr(blocks.fns[index].fn, "__qualname__", "")
        owner = qualname.split(".<locals>.")[0] if ".<locals>." in qualname else qualname
        out.append((index, owner, qualname.split(".")[-1], [values.get(i) for i in dependency["inputs"]]))
    return out


def session(url, username=None):
    client = httpx.Client(base_url=url, timeout=60, follow_redirects=False)
    if username:
        response = client.post("login", data={"username": username, "password": "hangjia-demo"})
        assert response.status_code in (200, 302, 303), response.text
    return client


def call(client, fn_index, data, session_hash=None):
    """One call the way the browser makes it: join the queue, read the result from the stream.
    Returns (http status of the join, error message or None). Calls with the same
    session_hash share a page's state, as one open browser tab does."""
    session_hash = session_hash or uuid.uuid4().hex[:11]
    joined = client.post("gradio_api/queue/join", json={
        "data": data, "fn_index": fn_index, "session_hash": session_hash,
        # what a browser sends with a select or like event (handlers that take gr.SelectData)
        "event_data": {"index": [0, 0], "value": None, "row_value": [], "col_value": [], "selected": True,
                       "liked": True},
        "trigger_id": None})
    if joined.status_code != 200:
        return joined.status_code, joined.text
    with client.stream("GET", "gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed":
                output = message.get("output") or {}
                return 200, None if message.get("success") else str(output.get("error"))
    return 200, "no result"


def table_counts(services):
    names = [r["table_name"] for r in services.db.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'")]
    return {name: services.db.scalar(f'SELECT count(*) FROM "{name}"') for name in names}


@pytest.fixture
def blocks_of(running_app):
    url, services = running_app
    # the launched app's own Blocks (the mounted one); rebuilt here only to read its handlers
    return build_app(services)


@pytest.mark.slow  # every handler under every role over HTTP (about 10 s)
def test_every_server_function_refuses_roles_below_its_own_and_changes_nothing(running_app, blocks_of):
    url, services = running_app
    config = session(url, "finance-admin").get("config").json()
    found = handlers(blocks_of, config)
    assert len(found) == len([f for f in blocks_of.fns.values() if f.fn is not None]), \
        "the rebuilt Blocks has the launched app's handlers"
    unclassified = sorted({owner for _, owner, _, _ in found} - set(REQUIRED_ROLE))
    assert not unclassified, f"decide who may call the handlers of {unclassified} (REQUIRED_ROLE)"
    before = table_counts(services)

    anonymous = session(url)
    for index, owner, name, data in found:
        status, _ = call(anonymous, index, data)
        assert status in (401, 403), f"anonymous called {owner}.{name}"

    refused = 0
    for username in USERS:
        role = username.split("-", 1)[1]
        client = session(url, username)
        for index, owner, name, data in found:
            if RANK[role] >= RANK[REQUIRED_ROLE[owner]]:
                continue
            status, error = call(client, index, data)
            assert status == 200 and error and ("not allowed" in error or "没有权限" in error), \
                f"{username} called {owner}.{name}: {error}"
            refused += 1
    assert refused > 50
    assert table_counts(services) == before, "a refused call changed the database"
    assert audit.events(services.db) == []

    # positive control: the same way of calling works for a role that may
    admin = session(url, "finance-admin")
    overview = next(i for i, owner, name, _ in found if name == "admin_overview_api")
    assert call(admin, overview, []) == (200, None)


def test_every_v1_route_needs_a_key_and_the_right_role(running_app):
    url, services = running_app
    from webapp.openai_api import build_openai_router

    routes = sorted({(route.path, method) for route in build_openai_router(services).routes
                     for method in route.methods})
    assert ("/v1/chat/completions", "POST") in routes and ("/metrics", "GET") in routes
    keys = {}
    for username in USERS:
        user = services.auth.current_user(username)
        keys[username] = services.auth.create_api_key(user, "access test")[1]
    before = table_counts(services)
    allowed = {"employee": {"/v1/models", "/v1/chat/completions", "/v1/actions/{call_id}"}}
    allowed["reviewer"] = allowed["employee"]
    allowed["admin"] = allowed["employee"] | {"/v1/completions", "/metrics"}
    for path, method in routes:
        concrete = path.replace("{call_id}", "nonexistent")
        for who in [None, *USERS]:
            headers = {"Authorization": f"Bearer {keys[who]}"} if who else {}
            response = httpx.request(method, url + concrete.lstrip("/"), headers=headers, json={"model": "x"},
                                     timeout=60)
            role = who.split("-", 1)[1] if who else "anonymous"
            if role != "anonymous" and path in allowed[role]:
                assert response.status_code not in (401, 403), (who, path, response.text)
            else:
                assert response.status_code in (401, 403), (who, path, response.status_code)
    assert table_counts(services) == before


def test_another_departments_review_cases_and_samples_are_out_of_reach(running_app, script):
    from gradio_client import Client

    url, services = running_app
    script("a wrong answer")
    finance = services.auth.current_user("finance-employee")
    final = list(services.engine.turns.stream_turn(finance, "What is EBITDA?"))[-1]
    services.engine.conversations.rate(finance, final.message_id, -1, "wrong")
    hr_reviewer = Client(url, auth=("hr-reviewer", "hangjia-demo"), verbose=False)
    assert hr_reviewer.predict(-1, "", "", "", "", False, api_name="/review_queue") == []
    with pytest.raises(Exception):
        hr_reviewer.predict(-1, "finance", "", "", "", False, api_name="/review_queue")
    with pytest.raises(Exception):
        hr_reviewer.predict(final.message_id, api_name="/review_case")
    with pytest.raises(Exception):
        hr_reviewer.predict(final.message_id, "approved", "other", "ok", "", "{}", "", api_name="/review_decide")
    with pytest.raises(Exception):
        hr_reviewer.predict("finance", "", api_name="/samples_export")
    finance_reviewer = Client(url, auth=("finance-reviewer", "hangjia-demo"), verbose=False)
    assert [c["message_id"] for c in finance_reviewer.predict(-1, "", "", "", "", False,
                                                              api_name="/review_queue")] == [final.message_id]
    assert chats.get_feedback(services.db, final.message_id, finance.id)["rating"] == -1


# -- the department dimension ---------------------------------------------------------------

def finance_world(services, script):
    """A finance answer rated down, a finance adapter version, a training run and cache figures:
    what another department's staff must not reach."""
    from storage import adapters as registry

    script("The East China revenue was 12,345,678 yuan.")
    employee = services.auth.current_user("finance-employee")
    final = list(services.engine.turns.stream_turn(employee, "What was East China's revenue last quarter?"))[-1]
    services.engine.conversations.rate(employee, final.message_id, -1, "did not use the sales system")
    registry.add_version(services.db, "finance", "v1", str(services.settings.data_dir / "nowhere"), "tiny", None)
    registry.start_run(services.db, "finance", "manual", status="failed", reason="finance-only run")
    return final


def client(url, username):
    from gradio_client import Client

    return Client(url, auth=(username, "hangjia-demo"), verbose=False)


REFUSED = ("not allowed", "没有权限", "among the departments you review", "not your department", "No conversation")


def refused(fn, *args, api_name):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        fn.predict(*args, api_name=api_name)
    assert any(word in str(info.value) for word in REFUSED), (api_name, str(info.value))


def test_another_departments_staff_reach_nothing_of_finance(running_app, script):
    url, services = running_app
    final = finance_world(services, script)
    jsonl = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    before = table_counts(services)
    for username in ("hr-reviewer", "hr-admin"):
        hr = client(url, username)
        refused(hr, -1, "finance", "", "", "", False, api_name="/review_queue")
        refused(hr, final.message_id, api_name="/review_case")
        refused(hr, final.message_id, "approved", "should_call_tool", "The revenue was 1.", "query_sales",
                '{"region": "华东", "period": "last_quarter"}', "", api_name="/review_decide")
        refused(hr, "finance", "", api_name="/samples_export")
        refused(hr, jsonl, "finance", api_name="/samples_import")
        assert hr.predict(-1, "", "", "", "", False, api_name="/review_queue") == []
        assert "12,345,678" not in hr.predict("", "", api_name="/samples_export")
    hr_admin = client(url, "hr-admin")
    refused(hr_admin, "finance", "v1", api_name="/promote")
    refused(hr_admin, "finance", True, api_name="/retrain")
    refused(hr_admin, "finance", api_name="/cache_clear")
    refused(hr_admin, final.conversation_id, api_name="/audit_conversation")
    assert table_counts(services) == before, "a refused call changed the database"
    # what HR's admin reads names no finance figure (the audit search itself is an audit event)
    reads = {name: hr_admin.predict(*args, api_name=name) for name, args in [
        ("/admin_overview", ()), ("/adapters", ()), ("/monitoring", (7,)), ("/cache_stats", ()),
        ("/knowledge_documents", ()), ("/audit_search", ("", "", "", "", "", ""))]}
    assert "finance" not in json.dumps(reads, ensure_ascii=False), reads
    assert reads["/admin_overview"]["users"] == 3


def test_v1_and_metrics_show_each_admin_their_own_department_only(running_app, script):
    from prometheus_client.parser import text_string_to_metric_families

    url, services = running_app
    final = finance_world(services, script)
    script("HR answer")
    list(services.engine.turns.stream_turn(services.auth.current_user("hr-employee"), "annual leave?"))
    keys = {u: services.auth.create_api_key(services.auth.current_user(u), "t")[1]
            for u in ("hr-admin", "finance-admin", "company-owner")}

    def departments_in_metrics(who):
        text = httpx.get(url + "metrics", headers={"Authorization": f"Bearer {keys[who]}"}, timeout=60).text
        return {s.labels["department"] for f in text_string_to_metric_families(text) for s in f.samples
                if "department" in s.labels}

    before = table_counts(services)
    hr = {"Authorization": f"Bearer {keys['hr-admin']}"}
    raw = httpx.post(url + "v1/completions", json={"model": "hangjia-finance", "prompt": "hi"}, headers=hr,
                     timeout=60)
    assert raw.status_code == 404
    follow = httpx.post(url + "v1/chat/completions", headers=hr, timeout=60, json={
        "model": "hangjia", "messages": [{"role": "user", "content": "go on"}],
        "conversation_id": final.conversation_id})
    assert follow.status_code == 404
    assert table_counts(services) == before
    assert departments_in_metrics("hr-admin") == {"hr"}
    assert departments_in_metrics("finance-admin") == {"finance"}
    assert departments_in_metrics("company-owner") == {"finance", "hr"}
    assert [e["action"] for e in audit.events(services.db, "owner.read.metrics")] == ["owner.read.metrics"]
