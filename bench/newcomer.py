"""The newcomer's first ten minutes, timed: the demo as the README's quickstart starts it, on the
embedded model, then the loop through the app's own API.

1. A fresh data dir; the demo company with its seeded feedback (25 corrected sales answers, 5
   waiting for review), as `python launch.py` starts it.
2. The finance reviewer opens the queue and corrects the first waiting case with its
   query_sales call (/review_queue, /review_decide: what the Review tab sends).
3. The finance admin presses Retrain now (/retrain: what the Admin tab's button runs), and the
   refresh trains, evaluates and gates.
4. The finance employee asks a sales question nobody corrected and gets the answer, its tool
   call and the adapter version that gave it.

    .venv/bin/python bench/newcomer.py [--question "..."]

Prints the minutes of each stage; appends the row to bench/results/newcomer.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "newcomer.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default="上个月华南区的销售额是多少？",
                        help="the sales question asked after the refresh (not one of the demo's corrections)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    from provenance import append, commit, cpu_device

    code = commit()  # the code this run measures, read before anything can move HEAD

    from feedback_loop import first_call, launch
    from gradio_client import Client

    from tests.conftest import free_port
    from webapp.demo import DEMO_FEEDBACK, DEMO_PASSWORD
    from webapp.services import open_services
    from webapp.settings import settings_from_sources

    settings = dataclasses.replace(settings_from_sources(cli={}, environ={}),
                                   data_dir=Path(tempfile.mkdtemp(prefix="hangjia-bench-newcomer-")), demo=True,
                                   demo_feedback=True, scheduler=False, port=free_port())
    cases = [json.loads(line) for line in DEMO_FEEDBACK.read_text(encoding="utf-8").splitlines() if line.strip()]
    calls = {case["question"]: case["call"] for case in cases}
    marks = {}
    started = time.perf_counter()

    def mark(stage: str) -> None:
        marks[stage] = round((time.perf_counter() - started) / 60, 2)
        print(f"{marks[stage]:6.2f} min  {stage}", flush=True)

    services = open_services(settings)
    try:
        app, url = launch(services)
        try:
            mark("the app is up")
            reviewer = Client(url, auth=("finance-reviewer", DEMO_PASSWORD), verbose=False)
            queue = reviewer.predict(-1, "finance", "", "", "", False, api_name="/review_queue")
            case = queue[0]
            reviewer.predict(case["message_id"], "approved", "should_call_tool", "", "query_sales",
                             json.dumps(calls[case["question"]], ensure_ascii=False), "", api_name="/review_decide")
            mark(f"a waiting case corrected ({len(queue)} were waiting)")
            admin = Client(url, auth=("finance-admin", DEMO_PASSWORD), verbose=False)
            outcome = admin.predict("finance", True, api_name="/retrain")
            mark(f"refresh ended: {outcome['status']}, {outcome['version']}, "
                 f"{'promoted' if outcome['promoted'] else 'not promoted: ' + str(outcome['reason'])}")
            employee = Client(url, auth=("finance-employee", DEMO_PASSWORD), verbose=False)
            update = employee.predict(args.question, None, True, api_name="/chat")
            call = first_call(update)
            serving = employee.predict(api_name="/whoami")["adapter_version"] or "base"
            mark("the employee has the answer")
        finally:
            app.close()
    finally:
        services.close()
        shutil.rmtree(settings.data_dir, ignore_errors=True)
    print(f"\nasked {args.question!r} after the refresh: served by {serving}; tool call "
          f"{json.dumps(call['arguments'], ensure_ascii=False) if call else 'none'}; answer {update['answer'][:160]!r}")
    append(args.results, "bench/newcomer.py", cpu_device(), code, model=settings.model, question=args.question,
           minutes=marks, outcome=outcome, serving=serving,
           tool_call={"tool": call["tool"], "arguments": call["arguments"], "status": call["status"]} if call else None,
           answer=update["answer"][:400])
    return 0


if __name__ == "__main__":
    sys.exit(main())
