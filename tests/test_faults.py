"""Faults: the app killed with SIGKILL while it writes or trains, a full disk, a second app
on the same data dir. Nothing acknowledged is lost; the database always opens."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from finetune.samples import tool_call_message
from storage import Database, chats
from tests.conftest import free_port, make_settings

ROOT = Path(__file__).resolve().parents[1]
FAST_REFRESH = ["--lora-r", "4", "--lora-alpha", "8", "--epochs", "1", "--gradient-accumulation", "2",
                "--eval-max-new-tokens", "4", "--general-replay", "2", "--learning-rate", "1e-3",
                "--gate-margin", "-1", "--gate-tolerance", "1"]


class AppProcess:
    """launch.py in its own process on the tiny model, as an operator starts it."""

    def __init__(self, model_dir: Path, data_dir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        self.process = subprocess.Popen(
            [sys.executable, "launch.py", "--demo", "--no-demo-feedback", "--model", str(model_dir),
             "--data-dir", str(data_dir), "--port", str(self.port), "--no-knowledge", "--no-cache", "--no-scheduler", "--device", "cpu",
             "--temperature", "0", "--max-new-tokens", "8", *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout=180) -> "AppProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("the app exited:\n" + self.process.stdout.read()[-3000:])
            try:
                if httpx.get(self.url, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("the app did not start")

    def client(self, username: str) -> Client:
        return Client(self.url, auth=(username, "hangjia-demo"), verbose=False)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_while_chatting_and_rating_loses_nothing_acknowledged(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"
    app = AppProcess(tiny_model_dir, data_dir).wait_ready()
    try:
        # DuckDB has one writer: a second app on the same data dir is refused, saying why
        second = subprocess.run(
            [sys.executable, "launch.py", "--demo", "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
             "--port", str(free_port()), "--no-knowledge", "--device", "cpu"],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert second.returncode == 1 and "already in use by another process" in second.stderr

        turns, votes, errors = [], [], []
        stop = threading.Event()

        def user_loop(username):
            client = app.client(username)
            number = 0
            while not stop.is_set():
                number += 1
                try:
                    answer = client.predict(f"question {number} from {username}", None, api_name="/chat")
                    turns.append((answer["message_id"], answer["answer"], answer["conversation_id"]))
                    rating = 1 if number % 2 else -1
                    client.predict(answer["message_id"], rating, f"comment {number}", api_name="/feedback")
                    votes.append((answer["message_id"], rating, f"comment {number}"))
                except Exception as exc:  # the kill ends the calls in flight; those were never acknowledged
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=user_loop, args=(u,)) for u in
                   ("finance-employee", "hr-employee", "finance-reviewer", "hr-reviewer")]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(votes) < 12 and time.monotonic() < deadline:
            time.sleep(0.1)
        app.kill()  # mid-write: the users are still chatting and rating
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert len(votes) >= 12
    finally:
        app.stop()

    db = Database(data_dir / "hangjia.duckdb")  # opens: the WAL is replayed
    try:
        for message_id, answer, conversation_id in turns:
            stored = {m.id: m for m in chats.list_messages(db, conversation_id)}
            assert stored[message_id].role == "assistant" and stored[message_id].content == answer
        for message_id, rating, comment in votes:
            owner = chats.get_message_owner(db, message_id)
            feedback = chats.get_feedback(db, message_id, owner["user_id"])
            assert (feedback["rating"], feedback["comment"]) == (rating, comment)
    finally:
        db.close()
    # and the app starts again on it
    again = AppProcess(tiny_model_dir, data_dir).wait_ready()
    try:
        assert again.client("finance-employee").predict("after the crash", None, api_name="/chat")["done"]
    finally:
        again.stop()


def samples_jsonl(count=6):
    return "\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"华东 {2020 + i} 年销售额？"},
        tool_call_message("query_sales", {"region": "华东", "period": str(2020 + i)}, "c")]}, ensure_ascii=False)
        for i in range(count))


def trainers_of(data_dir: Path) -> list[int]:
    """Training processes working for this data dir (their config lies in its runs folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "finetune.recipe" in command and str(data_dir) in command:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_sigkill_during_a_refresh_keeps_the_active_adapter_and_the_next_run_works(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"
    app = AppProcess(tiny_model_dir, data_dir, *FAST_REFRESH, "--epochs", "4").wait_ready()
    try:
        admin = app.client("finance-admin")
        admin.predict(samples_jsonl(), "finance", api_name="/samples_import")
        first = admin.predict("finance", True, api_name="/retrain")
        assert first["status"] == "succeeded" and first["promoted"], first
        admin.submit("finance", True, api_name="/retrain")  # the second run: killed while it works
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = admin.predict(api_name="/adapters")["runs"]
            if runs and runs[0]["status"] == "running" and runs[0]["id"] != first["run_id"]:
                break
            time.sleep(0.2)
        time.sleep(2.0)  # into the training subprocess
        assert trainers_of(data_dir), "the kill lands while the trainer works"
        app.kill()
        # the trainer dies with the app: nothing trains on, or writes an adapter, unseen
        deadline = time.monotonic() + 10
        while trainers_of(data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not trainers_of(data_dir)
    finally:
        app.stop()

    app = AppProcess(tiny_model_dir, data_dir, *FAST_REFRESH).wait_ready()
    try:
        admin = app.client("finance-admin")
        state = admin.predict(api_name="/adapters")
        killed = state["runs"][0]
        assert killed["status"] == "failed" and "stopped" in killed["reason"], killed
        active = [v for v in state["versions"] if v["status"] == "active"]
        assert [v["version"] for v in active] == [first["version"]], "the active adapter is still the first one"
        assert app.client("finance-employee").predict(api_name="/whoami")["adapter_version"] == first["version"]
        third = admin.predict("finance", True, api_name="/retrain")
        assert third["status"] == "succeeded" and third["version"] != first["version"], third
    finally:
        app.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs as the data dir (needs root, as CI has; skipped otherwise)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte (again: a rolled-back write gives some back)."""
    filler = directory / "filler"
    with open(filler, "ab") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_is_a_clear_error_reads_go_on_and_nothing_is_corrupted(small_disk, tiny_model, embedder, caplog):
    import gradio as gr

    from webapp.services import open_services
    from webapp.ui.chat import conversation_view, rate, stream_answer

    services = open_services(make_settings(small_disk, data_dir=small_disk / "data", knowledge=False),
                             model=tiny_model, embedder=embedder)
    try:
        user = services.auth.current_user("finance-employee")
        first, rest = stream_answer(services, user, "before the disk filled up", None)
        before = list(rest)[-1]
        filler = fill(small_disk)

        # a question longer than the slack a file system page may have left (what fits there is written)
        with pytest.raises(gr.Error, match="could not save.*disk is full"):
            first, rest = stream_answer(services, user, "while the disk is full " + "数据" * 800, None)
            list(rest)
        fill(small_disk)
        # (a write small enough for the WAL's last, partly used page needs no new space)
        with pytest.raises(gr.Error, match="disk is full"):
            rate(services, user, before.message_id, -1, "答案不对" * 1000)
        assert "a write failed and was rolled back" in caplog.text
        # reads go on: the conversation list and the earlier turn
        assert chats.list_conversations(services.db, user.id)[0].id == before.conversation_id
        items, _ = conversation_view(services, user, before.conversation_id)
        assert [i["type"] for i in items] == ["user", "text"]

        filler.unlink()
        first, rest = stream_answer(services, user, "after space was freed", None)
        after = list(rest)[-1]
        assert after.done
    finally:
        services.close()
    db = Database(small_disk / "data" / "hangjia.duckdb")
    try:
        titles = [c.title for c in chats.list_conversations(db, user.id)]
        assert "after space was freed" in titles and "before the disk filled up" in titles
        assert "while the disk is full" not in titles, "the refused turn left nothing half-written"
    finally:
        db.close()
