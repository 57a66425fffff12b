"""Login over HTTP: one answer for every wrong login, in the same time; a slow hash;
guessing throttled; sessions that end; API keys that are never stored."""

import contextlib
import statistics
import time

import httpx
import pytest

from storage import api_keys
from tests.conftest import make_settings
from webapp.auth import api_key_hash


def login(url, username, password="hangjia-demo", address=None):
    """A login over HTTP; `address` is the client address a trusted proxy forwards."""
    headers = {"X-Forwarded-For": address} if address else {}
    return httpx.post(url + "login", data={"username": username, "password": password}, headers=headers, timeout=30)


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer_in_the_same_time(running_app):
    url, _ = running_app
    wrong_password, unknown_user = login(url, "finance-employee", "not-it"), login(url, "nobody-here", "not-it")
    assert (wrong_password.status_code, wrong_password.text) == (unknown_user.status_code, unknown_user.text)
    assert wrong_password.status_code == 400

    def seconds(username):
        started = time.perf_counter()
        login(url, username, "still-not-it")
        return time.perf_counter() - started

    # 4 tries each stays under the 5-per-window throttle for each name
    known = statistics.median(seconds("hr-employee") for _ in range(4))
    unknown = statistics.median(seconds(f"ghost-{i}") for i in range(4))
    assert 0.5 < known / unknown < 2.0, (known, unknown)
    assert known > 0.02, "the password hash is deliberately slow"


def test_guessing_is_slowed_per_name_and_address_with_growing_delays_and_locks_nobody_out(running_app):
    url, services = running_app
    now = [1000.0]
    services.auth.clock = lambda: now[0]
    attacker = "203.0.113.9"
    for _ in range(5):
        assert login(url, "hr-reviewer", "guess", attacker).status_code == 400
    assert login(url, "hr-reviewer", address=attacker).status_code == 400, "slowed: refused, even the right password"
    assert login(url, "hr-reviewer").status_code == 200, "the user's own address is not slowed: no lockout"
    assert login(url, "hr-admin", address=attacker).status_code == 200, "other names are not slowed"
    now[0] += 2.5  # the first delay (2 s) has passed: one more guess is checked...
    assert login(url, "hr-reviewer", "guess", attacker).status_code == 400
    now[0] += 3.0  # ...and the next delay has doubled to 4 s
    assert login(url, "hr-reviewer", address=attacker).status_code == 400
    now[0] += 1.5
    assert login(url, "hr-reviewer", address=attacker).status_code == 200
    assert services.auth.login_wait("hr-reviewer", attacker) == 0, "a login starts afresh"


def test_guesses_sent_in_parallel_are_slowed_like_guesses_sent_one_by_one(services):
    import threading

    from webapp.auth import FREE_LOGIN_TRIES

    checked = []
    original = services.auth._dummy_hash

    def guess():
        checked.append(services.auth.check_login("finance-admin", "guess", "198.51.100.7"))

    threads = [threading.Thread(target=guess) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert services.auth._dummy_hash == original and checked == [False] * 12
    assert services.auth._failures[("finance-admin", "198.51.100.7")][0] == FREE_LOGIN_TRIES, \
        "only the free tries reached the password check; the rest were refused unchecked"
    assert not services.auth.check_login("finance-admin", "hangjia-demo", "198.51.100.7")
    assert services.auth.check_login("finance-admin", "hangjia-demo", "192.0.2.1")


def test_api_keys_are_stored_only_as_hashes(running_app):
    url, services = running_app
    user = services.auth.current_user("finance-employee")
    _, key = services.auth.create_api_key(user, "laptop")
    rows = services.db.query("SELECT * FROM api_keys")
    assert key not in repr(rows) and rows[0]["key_hash"] == api_key_hash(key)
    assert api_keys.user_of_key(services.db, api_key_hash(key)).username == "finance-employee"


@contextlib.contextmanager
def served_with(tmp_path, tiny_model, embedder, clock=time.monotonic, **settings):
    """The app behind a real HTTP server with these settings, its sessions timed by `clock`; its URL."""
    from webapp.app import build_app
    from webapp.server import BackgroundServer, build_server
    from webapp.services import open_services

    services = open_services(make_settings(tmp_path, knowledge=False, **settings), model=tiny_model, embedder=embedder)
    server = BackgroundServer(build_server(services, build_app(services), clock), "127.0.0.1", services.settings.port)
    server.start()
    try:
        yield f"http://127.0.0.1:{services.settings.port}/"
    finally:
        server.stop()
        services.close()


class Clock:
    """The sessions' clock, moved by the test instead of waited for."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def short_sessions(tmp_path, tiny_model, embedder):
    clock = Clock()
    with served_with(tmp_path, tiny_model, embedder, clock, session_hours=3 / 3600) as url:
        yield url, clock


@pytest.fixture
def idle_sessions(tmp_path, tiny_model, embedder):
    clock = Clock()
    with served_with(tmp_path, tiny_model, embedder, clock, session_idle_minutes=3 / 60) as url:
        yield url, clock


def test_a_session_ends_after_session_hours(short_sessions):
    url, clock = short_sessions
    client = httpx.Client(base_url=url, timeout=30)
    assert client.post("login", data={"username": "finance-employee", "password": "hangjia-demo"}).status_code == 200
    assert client.get("config").status_code == 200
    clock.now += 3.5
    assert client.get("config").status_code == 401, "the session has ended"
    assert client.post("login", data={"username": "finance-employee", "password": "hangjia-demo"}).status_code == 200
    assert client.get("config").status_code == 200, "logging in again starts a new one"


def test_a_session_ends_after_the_idle_limit_and_an_open_tab_alone_does_not_keep_it(idle_sessions):
    url, clock = idle_sessions
    client = httpx.Client(base_url=url, timeout=30)
    assert client.post("login", data={"username": "finance-employee", "password": "hangjia-demo"}).status_code == 200
    for _ in range(2):  # 4 s in all, past the 3 s limit, with a request every 2 s
        clock.now += 2
        assert client.get("config").status_code == 200, "a user making requests stays logged in"
    clock.now += 2
    # what an open page keeps sending: its heartbeat stream (closed again at once here); counted
    # as activity, it would keep the session for 3 s more
    with client.stream("GET", "gradio_api/heartbeat/some-page") as heartbeat:
        assert heartbeat.status_code == 200
    clock.now += 1.5
    assert client.get("config").status_code == 401, "3.5 s without a request of the user's: logged out"
