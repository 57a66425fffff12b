"""Load: N simulated employees chat at once through the app's API, with feedback clicks.

Starts the real server (Gradio + /v1, uvicorn) on a fresh data dir, creates N employees,
and has each one ask, wait for the answer and sometimes rate it, for M minutes, through
gradio_client's /chat and /feedback — the browser's server functions. First, as the
reference for the same machine and run, one user alone for a fixed number of turns.
At the end every user finishes the turn in hand, the server stops, and the DuckDB file is
checked: turns completed by clients == turns logged, every acknowledged vote stored.

    .venv/bin/python bench/load.py [--users 20] [--minutes 5] [--max-new-tokens 128]
                                   [--decoding generate|batched] [--model embedded]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTIONS = [
    "What is a balance sheet?", "报销的期限是多久？", "How many days of annual leave do new employees get?",
    "Explain gross margin in two sentences.", "年假可以跨年使用吗？", "Write a one-line thank-you note to a colleague.",
    "What should I check before approving an expense claim?", "什么是同比和环比？",
    "How do I report a lost laptop?", "Summarize the travel policy in one sentence.",
]
PASSWORD = "load-test-password"


@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)  # message ids of completed turns
    votes: list[tuple[int, int, str]] = field(default_factory=list)  # acknowledged (message, rating, comment)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def user_loop(url: str, username: str, tally: Tally, until: float, max_turns: int, seed: int) -> None:
    from gradio_client import Client

    rng = random.Random(seed)
    try:
        client = Client(url, auth=(username, PASSWORD), verbose=False)
    except Exception as exc:
        with tally.lock:
            tally.errors.append(f"{username} login: {exc}")
        return
    turns = 0
    while time.monotonic() < until and turns < max_turns:
        question = rng.choice(QUESTIONS)
        if rng.random() < 0.5:  # half are the user's own wording: no cache hit possible
            question = f"{question} ({username}, {turns})"
        started = time.monotonic()
        try:
            answer = client.predict(question, None, api_name="/chat")
            elapsed = time.monotonic() - started
            with tally.lock:
                tally.latencies_s.append(elapsed)
                tally.turns.append(answer["message_id"])
            turns += 1
            if rng.random() < 0.4:
                rating = rng.choice([1, -1])
                comment = f"load {username} {turns}" if rating == -1 else ""
                client.predict(answer["message_id"], rating, comment, api_name="/feedback")
                with tally.lock:
                    tally.votes.append((answer["message_id"], rating, comment))
        except Exception as exc:
            with tally.lock:
                tally.errors.append(f"{username}: {type(exc).__name__}: {exc}"[:300])
    client.close()


def run_phase(url: str, usernames: list[str], seconds: float, max_turns: int) -> tuple[Tally, float]:
    tally = Tally()
    until = time.monotonic() + seconds
    started = time.monotonic()
    threads = [threading.Thread(target=user_loop, args=(url, name, tally, until, max_turns, i))
               for i, name in enumerate(usernames)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def report(name: str, tally: Tally, wall_s: float) -> dict:
    row = {"phase": name, "turns": len(tally.turns), "votes": len(tally.votes), "errors": len(tally.errors),
           "p50_s": statistics.median(tally.latencies_s) if tally.latencies_s else float("nan"),
           "p95_s": percentile(tally.latencies_s, 0.95), "turns_per_min": len(tally.turns) / wall_s * 60}
    print(f"{name:<22} turns {row['turns']:>5}  votes {row['votes']:>4}  errors {row['errors']:>3}  "
          f"p50 {row['p50_s']:6.1f} s  p95 {row['p95_s']:6.1f} s  {row['turns_per_min']:6.1f} turns/min", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--reference-turns", type=int, default=5, help="turns of the single-user reference")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--decoding", default="generate", choices=["generate", "batched"])
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from storage import Database, chats
    from webapp.app import build_app
    from webapp.server import BackgroundServer, build_server
    from webapp.services import open_services
    from webapp.settings import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="hangjia-load-"))
    concurrency = 8 if args.decoding == "batched" else 1
    settings = Settings(data_dir=data_dir / "data", demo=True, model=args.model, max_new_tokens=args.max_new_tokens,
                        scheduler=False, port=7990, decoding=args.decoding, generation_concurrency=concurrency)
    services = open_services(settings)
    usernames = [f"load-user-{i:02d}" for i in range(args.users)]
    for i, name in enumerate([*usernames, "load-reference"]):
        services.auth.create_user(name, PASSWORD, "employee", ("finance", "hr")[i % 2])
    server = BackgroundServer(build_server(services, build_app(services)), "127.0.0.1", settings.port).start()
    url = f"http://127.0.0.1:{settings.port}/"
    print(f"hangjia load: {args.users} users x {args.minutes} min, model {services.model.name}, "
          f"max_new_tokens {args.max_new_tokens}, decoding {args.decoding}, {os.cpu_count()} CPUs", flush=True)
    try:
        reference, reference_wall = run_phase(url, ["load-reference"], 3600, args.reference_turns)
        rows = [report("1 user (reference)", reference, reference_wall)]
        loaded, loaded_wall = run_phase(url, usernames, args.minutes * 60, 10**9)
        rows.append(report(f"{args.users} users", loaded, loaded_wall))
    finally:
        server.stop()
        services.close()

    db = Database(settings.db_path)
    try:
        tallies = [reference, loaded]
        completed = [m for t in tallies for m in t.turns]
        logged = {m for m in completed if chats.message_outcome(db, m) is not None}
        user_messages = chats.usage_summary(db)
        votes = [v for t in tallies for v in t.votes]
        stored_votes = 0
        for message_id, rating, comment in votes:
            owner = chats.get_message_owner(db, message_id)
            stored = chats.get_feedback(db, message_id, owner["user_id"]) if owner else None
            stored_votes += bool(stored and stored["rating"] == rating and (stored["comment"] or "") == comment)
        turns_in_db = db.scalar("SELECT count(*) FROM messages WHERE role = 'user'")
    finally:
        db.close()
    print(f"turns completed by clients: {len(completed)}; user turns logged in DuckDB: {turns_in_db}; "
          f"answers found: {len(logged)}", flush=True)
    print(f"feedback acknowledged: {len(votes)}; stored as acknowledged: {stored_votes}; "
          f"messages in DuckDB: {user_messages['messages']}", flush=True)
    for error in (reference.errors + loaded.errors)[:10]:
        print("error:", error)
    ok = (len(completed) == turns_in_db == len(logged) and stored_votes == len(votes)
          and not reference.errors and not loaded.errors)
    print("RESULT:", "ok" if ok else "MISMATCH OR ERRORS", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
