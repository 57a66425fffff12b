"""Overhead of one tool round, excluding the tool itself: parse the model output, check
permission, normalise and validate arguments, run a no-op tool through the executor's
timeout pool, write the audit row. Target: under 5 ms.

    .venv/bin/python bench/tool_overhead.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()

    from storage import Database, migrate
    from webapp.auth import Auth
    from webapp.demo import seed_demo_company
    from webapp.tools.builtin import BUILTINS
    from webapp.tools.executor import ToolExecutor
    from webapp.tools.parser import parse_output
    from webapp.tools.registry import DEMO_TOOLS_FILE, ToolSpec, load_registry

    db = Database(Path(tempfile.mkdtemp(prefix="hangjia-bench-")) / "bench.duckdb")
    migrate(db)
    auth = Auth(db)
    seed_demo_company(db, auth)
    registry = load_registry([DEMO_TOOLS_FILE], BUILTINS)
    sales = registry.get("query_sales")
    # query_sales' real schema, permissions and aliases, with a tool body that does nothing
    registry.add(ToolSpec("noop_sales", sales.description, sales.parameters, lambda a, c: {"ok": True},
                          roles=sales.roles, departments=sales.departments, aliases=sales.aliases))
    executor = ToolExecutor(registry, db, today=lambda: dt.date(2026, 11, 28))
    user = auth.current_user("finance-employee")
    raw = ("<think>\nThe user asks about East China last quarter.\n</think>\n\nLet me check.\n<tool_call>\n"
           + json.dumps({"name": "noop_sales", "arguments": {"region": "East China", "period": "last_quarter"}})
           + "\n</tool_call>")
    known = set(registry.names())

    for _ in range(50):  # warm-up
        executor.execute(user, parse_output(raw, known).calls[0])
    parse_ms, round_ms = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        parsed = parse_output(raw, known)
        t1 = time.perf_counter()
        outcome = executor.execute(user, parsed.calls[0])
        t2 = time.perf_counter()
        assert outcome.status == "ok"
        parse_ms.append((t1 - t0) * 1000)
        round_ms.append((t2 - t0) * 1000)

    print(f"{args.rounds} tool rounds, DuckDB audit row per call, 2-core CPU")
    print(f"{'step':<34}{'median ms':>11}{'p95 ms':>9}{'max ms':>9}")
    for name, values in (("parse output", parse_ms), ("full round (parse+checks+run+audit)", round_ms)):
        print(f"{name:<34}{statistics.median(values):>11.3f}{percentile(values, 0.95):>9.3f}{max(values):>9.3f}")
    verdict = "met" if percentile(round_ms, 0.95) < 5 else "NOT met"
    print(f"target p95 < 5 ms: {verdict}")
    executor.close()
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
