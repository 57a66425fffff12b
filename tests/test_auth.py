import pytest

from storage import Database, accounts, migrate
from webapp.auth import Auth, NotAuthorized, hash_password, verify_password
from webapp.demo import DEMO_PASSWORD, demo_users, ensure_first_admin, seed_demo_company


@pytest.fixture
def auth(tmp_path):
    db = Database(tmp_path / "a.duckdb")
    migrate(db)
    yield Auth(db)
    db.close()


def test_hashes_are_salted_and_verify():
    first, second = hash_password("s3cret-pass"), hash_password("s3cret-pass")
    assert first != second and first.startswith("scrypt$")
    assert verify_password("s3cret-pass", first) and not verify_password("s3cret-pasS", first)
    assert not verify_password("x", "garbage")


def test_demo_company_has_one_user_per_role_and_department(auth):
    assert seed_demo_company(auth.db, auth)
    assert not seed_demo_company(auth.db, auth)  # never twice
    assert {d.id for d in accounts.list_departments(auth.db)} == {"finance", "hr"}
    for username, role, dept in demo_users():
        assert auth.check_login(username, DEMO_PASSWORD)
        user = auth.current_user(username)
        assert (user.role, user.department_id) == (role, dept)


def test_wrong_password_and_unknown_user_look_the_same(auth):
    seed_demo_company(auth.db, auth)
    assert auth.check_login("finance-employee", "nope") is False
    assert auth.check_login("nobody", DEMO_PASSWORD) is False
    assert auth.check_login(None, None) is False


def test_empty_data_dir_outside_demo_gets_one_admin_with_a_random_password(auth):
    password = ensure_first_admin(auth.db, auth)
    assert password and len(password) >= 12
    assert auth.check_login("admin", password)
    assert auth.current_user("admin").role == "admin"
    assert ensure_first_admin(auth.db, auth) is None


def test_roles_are_checked(auth):
    seed_demo_company(auth.db, auth)
    assert auth.require_role("hr-reviewer", "reviewer", "admin").username == "hr-reviewer"
    with pytest.raises(NotAuthorized, match="needs the role admin"):
        auth.require_role("hr-reviewer", "admin")
    with pytest.raises(NotAuthorized):
        auth.current_user(None)
    with pytest.raises(NotAuthorized):
        auth.current_user("ghost")
    with pytest.raises(ValueError, match="at least 8"):
        auth.create_user("x", "short", "employee", "hr")


def test_password_guessing_is_slowed_to_five_tries_per_five_minutes(auth):
    seed_demo_company(auth.db, auth)
    now = {"t": 1000.0}
    auth.clock = lambda: now["t"]
    for _ in range(5):
        assert not auth.check_login("hr-employee", "guess")
    assert not auth.check_login("hr-employee", DEMO_PASSWORD)  # refused for a while, even when right
    assert auth.check_login("finance-employee", DEMO_PASSWORD)  # other accounts are not affected
    now["t"] += 301
    assert auth.check_login("hr-employee", DEMO_PASSWORD)  # the window passed
    assert not auth.check_login("hr-employee", "guess")  # and a success reset the count
    assert auth.check_login("hr-employee", DEMO_PASSWORD)


def test_a_key_is_marked_used_at_most_once_a_minute_and_admins_list_their_department(auth):
    seed_demo_company(auth.db, auth)
    employee, admin = auth.current_user("finance-employee"), auth.current_user("finance-admin")
    key_id, key = auth.create_api_key(employee, "laptop")
    auth.create_api_key(auth.current_user("hr-employee"), "hr laptop")

    def last_used():
        return auth.db.scalar("SELECT last_used_at FROM api_keys WHERE id = ?", [key_id])

    assert last_used() is None
    assert auth.user_for_api_key(key).username == "finance-employee"
    first = last_used()
    assert first is not None
    auth.user_for_api_key(key)
    assert last_used() == first  # within the minute: no second write
    auth.db.write("UPDATE api_keys SET last_used_at = last_used_at - INTERVAL 2 MINUTE WHERE id = ?", [key_id])
    auth.user_for_api_key(key)
    assert last_used() >= first  # stale again: written anew
    assert [k["name"] for k in auth.keys_visible_to(admin)] == ["laptop"]  # not HR's key
    assert [k["name"] for k in auth.keys_visible_to(employee)] == ["laptop"]
