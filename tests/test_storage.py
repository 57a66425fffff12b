import subprocess
import sys
import textwrap

import pytest

from storage import MIGRATIONS, Database, StorageError, accounts, chats, migrate
from storage.migrations import applied_migrations


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "hangjia.duckdb")
    migrate(database)
    accounts.add_department(database, "finance", "Finance")
    yield database
    database.close()


def test_migrations_are_named_recorded_and_run_once(tmp_path):
    database = Database(tmp_path / "x.duckdb")
    assert migrate(database) == [m.name for m in MIGRATIONS]
    assert migrate(database) == []
    assert applied_migrations(database) == [m.name for m in MIGRATIONS]
    database.close()


def test_a_turn_and_its_feedback_survive_reopening(tmp_path, db):
    user = accounts.add_user(db, "alice", "hash", "employee", "finance")
    conv = chats.create_conversation(db, user.id, "finance", "Q3 revenue")
    chats.add_message(db, conv.id, "user", "How did Q3 go?")
    answer_id = chats.add_message(
        db, conv.id, "assistant", "Fine.", model="m", adapter="finance", adapter_version="v2",
        latency_ms=12.5, prompt_tokens=10, completion_tokens=2, finish_reason="stop",
    )
    chats.record_feedback(db, answer_id, user.id, -1, "vague")
    db.close()

    reopened = Database(tmp_path / "hangjia.duckdb")
    messages = chats.list_messages(reopened, conv.id)
    assert [(m.role, m.content) for m in messages] == [("user", "How did Q3 go?"), ("assistant", "Fine.")]
    assert messages[1].adapter == "finance" and messages[1].adapter_version == "v2" and messages[1].rating == -1
    assert chats.get_feedback(reopened, answer_id, user.id)["comment"] == "vague"
    reopened.close()


def test_second_vote_replaces_the_first_and_keeps_the_comment(db):
    user = accounts.add_user(db, "bob", "hash", "employee", "finance")
    conv = chats.create_conversation(db, user.id, "finance", "t")
    answer_id = chats.add_message(db, conv.id, "assistant", "a")
    chats.record_feedback(db, answer_id, user.id, -1, "wrong number")
    chats.record_feedback(db, answer_id, user.id, -1, None)  # the click, then the comment box
    assert chats.get_feedback(db, answer_id, user.id)["comment"] == "wrong number"
    chats.record_feedback(db, answer_id, user.id, 1, None)
    row = chats.get_feedback(db, answer_id, user.id)
    assert (row["rating"], row["comment"]) == (1, None)
    assert db.scalar("SELECT count(*) FROM feedback") == 1


def test_conversations_are_listed_per_user_newest_first(db):
    a = accounts.add_user(db, "a", "h", "employee", "finance")
    b = accounts.add_user(db, "b", "h", "employee", "finance")
    first = chats.create_conversation(db, a.id, "finance", "first")
    chats.create_conversation(db, a.id, "finance", "second")
    chats.create_conversation(db, b.id, "finance", "b's")
    chats.add_message(db, first.id, "user", "bump")  # touching a conversation moves it up
    assert [c.title for c in chats.list_conversations(db, a.id)] == ["first", "second"]
    assert [c.title for c in chats.list_conversations(db, b.id)] == ["b's"]


def test_a_failed_transaction_leaves_nothing(db):
    with pytest.raises(RuntimeError):
        with db.transaction() as cur:
            cur.execute("INSERT INTO departments (id, name) VALUES ('hr', 'HR')")
            raise RuntimeError("boom")
    assert [d.id for d in accounts.list_departments(db)] == ["finance"]


def test_constraints_guard_typed_columns(db):
    with pytest.raises(ValueError):
        accounts.add_user(db, "x", "h", "superuser", "finance")
    with pytest.raises(StorageError, match="Department 'no-such-department' does not exist"):
        accounts.add_user(db, "x", "h", "employee", "no-such-department")
    accounts.add_user(db, "dup", "h", "employee", "finance")
    with pytest.raises(accounts.DuplicateUserError):
        accounts.add_user(db, "dup", "h", "employee", "finance")


@pytest.mark.slow
def test_a_second_process_on_the_same_file_is_refused_with_a_clear_message(tmp_path, db):
    script = textwrap.dedent(
        f"""
        from storage import Database, DatabaseLockedError
        try:
            Database({str(db.path)!r})
        except DatabaseLockedError as exc:
            print("REFUSED", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout, out.stderr
    assert "already in use by another process" in out.stdout and "--data-dir" in out.stdout


def test_writes_from_many_threads_are_all_kept(db):
    from concurrent.futures import ThreadPoolExecutor

    user = accounts.add_user(db, "t", "h", "employee", "finance")
    conv = chats.create_conversation(db, user.id, "finance", "load")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: chats.add_message(db, conv.id, "user", f"m{i}"), range(200)))
    assert len(chats.list_messages(db, conv.id)) == 200


def test_a_user_with_history_can_move_department(db):
    accounts.add_department(db, "hr", "HR")
    user = accounts.add_user(db, "mover", "h", "employee", "finance")
    conv = chats.create_conversation(db, user.id, "finance", "t")
    chats.record_feedback(db, chats.add_message(db, conv.id, "assistant", "a"), user.id, 1, None)
    accounts.move_user(db, user.id, "hr")
    assert accounts.get_user(db, user.id).department_id == "hr"
    with pytest.raises(StorageError, match="does not exist"):
        accounts.move_user(db, user.id, "nowhere")
