"""The calls a kept night's adapter made, held by this commit's grounding and by another's
(its code and its tool file).

Grounding (webapp/tools/grounding.py) changes a call's values after the model wrote it, and the
model's first call does not depend on it. So the calls one measured night logged (the audit
keeps what ran and what the model wrote) are scored three ways without running the model again:
as the model wrote them, grounded by this code, and grounded by the code of another commit. The
first call of the latest conversation of each held-out question counts, as in feedback_loop.py.

    .venv/bin/python bench/feedback_loop.py --keep-data ...      # a night, its data dir kept
    .venv/bin/python bench/feedback_loop.py --reuse DIR ...      # (or) measured again with this code
    .venv/bin/python bench/grounding_ab.py DIR --against cfea54e [--sets held-out-2,held-out-3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import inspect
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent


def grounding_of(commit: str):
    """(ground(spec, arguments, question, today) -> (arguments, overruled) by that commit's
    webapp/tools/grounding.py, with its calendar reader where it has one; the demo's query_sales
    as that commit's tool file defines it)."""
    from webapp.tools.builtin import BUILTINS
    from webapp.tools.registry import load_registry

    folder = Path(tempfile.mkdtemp(prefix="hangjia-grounding-"))

    def show(path: str) -> str | None:
        shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True)
        return shown.stdout if shown.returncode == 0 else None

    modules = {}
    for name in ("calendar", "grounding"):
        source = show(f"webapp/tools/{name}.py")
        if source is None:
            continue
        path = folder / f"{name}.py"
        # the module of that commit reads its sibling of that commit, not today's
        path.write_text(source.replace("from webapp.tools import calendar", "import calendar_then as calendar"))
        spec = importlib.util.spec_from_file_location(f"{name}_then", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"{name}_then"] = module
        spec.loader.exec_module(module)
        modules[name] = module
    tools = folder / "demo_tools.toml"
    tools.write_text(show("webapp/tools/demo_tools.toml"))
    then = modules["grounding"].ground_arguments
    dated = "today" in inspect.signature(then).parameters  # older code reads no date

    def ground(spec, arguments: dict, question: str, today: dt.date) -> tuple[dict, dict]:
        return then(spec, arguments, question, *([today] if dated else []))

    return ground, load_registry([tools], BUILTINS).get("query_sales")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--against", required=True, help="the commit whose grounding is compared")
    parser.add_argument("--sets", default="held-out-2,held-out-3")
    parser.add_argument("--today", type=dt.date.fromisoformat, default=None,
                        help="the date the night was measured on (default: today)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "grounding_ab.jsonl")
    args = parser.parse_args()

    from feedback_loop import HELD_OUT_FILES, exact, held_out_questions
    from provenance import append, commit, cpu_device

    from storage import accounts, chats, tool_audit
    from storage.db import Database
    from webapp.tools import grounding
    from webapp.tools.builtin import BUILTINS
    from webapp.tools.registry import DEMO_TOOLS_FILE, load_registry

    code = commit()
    then, then_spec = grounding_of(args.against)
    spec = load_registry([DEMO_TOOLS_FILE], BUILTINS).get("query_sales")
    today = args.today or dt.date.today()
    db = Database(args.data_dir / "hangjia.duckdb")
    employee = accounts.find_user(db, "finance-employee")
    latest: dict[str, dict | None] = {}  # question -> the first call of its latest conversation, or None
    for conversation in sorted(chats.list_conversations(db, employee.id, limit=100_000), key=lambda c: c.id):
        messages = chats.list_messages(db, conversation.id)
        question = next((m.content for m in messages if m.role == "user"), None)
        answered = [m for m in messages if m.role == "assistant"]
        if question is None or not answered:
            continue
        calls = tool_audit.latest_of_conversation(db, conversation.id)
        first = calls[0] if calls else None
        latest[question] = None if first is None else {
            "tool": first.tool, "status": first.status, "ran": json.loads(first.arguments),
            "written": {k: v for k, v in {**json.loads(first.arguments), **first.replaced}.items() if v is not None}}

    table = {}
    print(f"| set | sales questions | as the model wrote them | grounded at {args.against} | grounded here |")
    print("|---|---|---|---|---|")
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        sales, _ = held_out_questions(HELD_OUT_FILES[name])
        counts = {"written": 0, "then": 0, "now": 0, "logged": 0}
        for q in sales:
            call = latest.get(q.text)
            if call is None:
                continue
            written = {**call, "arguments": call["written"], "overruled": {}}
            now = {**call, "arguments": grounding.ground_arguments(spec, call["written"], q.text, today)[0]}
            then_arguments = then(then_spec, call["written"], q.text, today)[0]
            counts["written"] += exact(written, q.expected)
            counts["then"] += exact({**call, "arguments": then_arguments}, q.expected)
            counts["now"] += exact(now, q.expected)
            counts["logged"] += exact({**call, "arguments": call["ran"]}, q.expected)
        n = len(sales)
        print(f"| {name} | {n} | {counts['written']} ({counts['written'] / n:.0%}) | {counts['then']} "
              f"({counts['then'] / n:.0%}) | {counts['now']} ({counts['now'] / n:.0%}) |")
        table[name] = {"sales": n, **counts}
        if counts["logged"] != counts["now"]:
            print(f"  (the calls as logged score {counts['logged']}: the night was measured with other code)")
    db.close()
    append(args.results, "bench/grounding_ab.py", cpu_device(), code, against=args.against,
           command=" ".join(a for a in sys.argv[1:] if a != str(args.data_dir)), sets=table,
           columns={"written": "as the model wrote them", "then": f"grounded at {args.against}",
                    "now": "grounded by this commit", "logged": "as the measured night ran them"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
