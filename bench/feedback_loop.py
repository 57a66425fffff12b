"""Does it learn? One night of reviewed feedback, end to end, through the product's own paths.

1. A fresh data dir, the demo company, the embedded model, no adapter.
2. Finance employees ask sales questions through the app's API (/chat, as the browser does)
   and thumbs-down each answer that did not look the numbers up (/feedback).
3. A finance reviewer corrects each case with the right query_sales call (/review_decide).
4. The nightly job runs now (NightlyRefresh.run_nightly, what the scheduler fires): train,
   evaluate, gate, promote by the product's policy.
5. Questions the training never saw are asked before and after; the table compares them:
   - dev: other templates of the same slots and 20 questions that need no tool, used while
     tuning the recipe;
   - held-out, held-out-2, held-out-3, held-out-4: bench/data/loop_heldout*.jsonl, sales
     questions and questions that need no tool in employees' own chat phrasing, each written
     from a brief without these templates and frozen before any tuning against it. The first
     three were read while tuning (the tool file's spellings were extended after them, and the
     third's failures showed the made-up calls and the chatty questions answered in prose);
     the fourth was never read, and no failures are printed for it.
   A call is exact when it asks the sales system for the same figure: the region, the metric,
   and the same months (last_year and 2025 are the same period in 2026). "exact (model)" scores
   the call as the model wrote it, before the question's own spellings overruled its values
   (webapp/tools/grounding.py).

    .venv/bin/python bench/feedback_loop.py [--train 30] [--dev 40] [--no-tool 20] [--sets dev,held-out-3]
    .venv/bin/python bench/feedback_loop.py --gate-only --keep-data     # the night alone, its data dir kept
    .venv/bin/python bench/feedback_loop.py --reuse DIR --sets held-out-3   # a serving change, same adapter

The same scenario runs in CI on the tiny random model (tests/test_feedback_loop.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REGIONS = {"华东": "East China", "华南": "South China", "华北": "North China", "西南": "Southwest China",
           "华中": "Central China"}
PERIODS = {  # canonical period -> (Chinese, English)
    "last_quarter": ("上季度", "last quarter"), "last_month": ("上个月", "last month"),
    "this_year": ("今年", "this year"), "last_year": ("去年", "last year"),
    "this_quarter": ("本季度", "this quarter"), "2025-Q3": ("2025年第三季度", "in Q3 2025"),
}
TRAIN_TEMPLATES = [
    ("zh", "revenue", "{pz}{r}区销售额是多少？"), ("zh", "revenue", "{r}区{pz}的销售收入是多少"),
    ("zh", "units", "{pz}{r}区销量是多少？"), ("en", "revenue", "What was revenue in {re} {pe}?"),
    ("en", "revenue", "How did {re} do {pe}?"), ("en", "units", "How many units did {re} sell {pe}?"),
]
HELD_OUT_TEMPLATES = [
    ("zh", "revenue", "请问{r}地区{pz}卖了多少钱"), ("zh", "revenue", "帮我查一下{r}{pz}的销售额"),
    ("zh", "revenue", "{pz}{r}的营收情况如何？"), ("zh", "units", "{r}{pz}一共卖出多少台？"),
    ("en", "revenue", "Show me {re} sales for {pe}"), ("en", "revenue", "Revenue for the {re} region {pe}?"),
    ("en", "revenue", "{pe_cap}, what were sales in {re}?"), ("en", "units", "Units sold in {re} {pe}, please"),
]
NO_TOOL_QUESTIONS = [
    "什么是应收账款周转率？", "毛利率是什么意思？", "你好", "谢谢！", "请介绍一下你自己",
    "报销需要在多少天内提交？", "年假有几天？", "什么是资产负债表？", "流动比率和速动比率有什么区别？",
    "帮我写一句新年祝福", "What is a balance sheet?", "Hello!", "What does EBITDA stand for?",
    "Explain working capital in one sentence.", "How do I submit an expense claim?",
    "What is the difference between revenue and profit?", "Thank you!", "Who are you?",
    "What is a cash flow statement?", "Give me a tip for writing a clear email.",
]


DATA = Path(__file__).resolve().parent / "data"
HELD_OUT_FILES = {"held-out": DATA / "loop_heldout.jsonl", "held-out-2": DATA / "loop_heldout2.jsonl",
                  "held-out-3": DATA / "loop_heldout3.jsonl", "held-out-4": DATA / "loop_heldout4.jsonl"}
READ_WHILE_TUNING = ("dev", "held-out", "held-out-2", "held-out-3")  # failures are printed only for these
RESULTS = Path(__file__).resolve().parent / "results" / "feedback_loop.jsonl"


@dataclass(frozen=True)
class SalesQuestion:
    text: str
    language: str
    expected: dict[str, Any]  # normalised query_sales arguments


def held_out_questions(path: Path) -> tuple[list[SalesQuestion], list[str]]:
    """A frozen held-out set: (sales questions, questions that need no tool)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "_header" not in r]
    sales = [SalesQuestion(r["text"], r["language"], r["expected"]) for r in rows if r["expected"]]
    return sales, [r["text"] for r in rows if not r["expected"]]


def sales_questions(templates, count: int, seed: int) -> list[SalesQuestion]:
    rng = random.Random(seed)
    combos = [(t, r, p) for t in templates for r in REGIONS for p in PERIODS]
    rng.shuffle(combos)
    out = []
    for (language, metric, template), region, period in combos[:count]:
        pz, pe = PERIODS[period]
        text = template.format(r=region, re=REGIONS[region], pz=pz, pe=pe, pe_cap=pe[0].upper() + pe[1:])
        out.append(SalesQuestion(text, language, {"region": region, "period": period, "metric": metric}))
    return out


def first_call(update: dict) -> dict | None:
    """The first tool action of a turn as the executor saw it (arguments normalised)."""
    tools = [i for i in update["items"] if i["type"] == "tool"]
    return tools[0] if tools else None


def same_period(a: Any, b: Any) -> bool:
    """Two period values that name the same months today (last_year and 2025 in 2026)."""
    from webapp.tools.builtin import parse_period

    if a == b:
        return True
    try:
        today = dt.date.today()
        return parse_period(str(a), today) == parse_period(str(b), today)
    except Exception:  # a value the sales system would refuse
        return False


def exact(call: dict | None, expected: dict, as_written: bool = False) -> bool:
    """The call asks for the expected figure; as_written: with the model's own values, before
    the question's spellings overruled them."""
    if call is None or call["tool"] != "query_sales" or call["status"] not in ("ok", "error"):
        return False
    arguments = {"metric": "revenue", **call["arguments"]}
    if as_written:
        arguments.update(call.get("overruled") or {})
    return all(same_period(arguments.get(k), v) if k == "period" else arguments.get(k) == v
               for k, v in expected.items()) and not arguments.get("product_line")


def measure(client, sales: list[SalesQuestion], no_tool: list[str]) -> dict:
    matched = written = valid = 0
    failures = []
    for q in sales:
        update = client.predict(q.text, None, True, api_name="/chat")
        call = first_call(update)
        right = exact(call, q.expected)
        matched += right
        written += exact(call, q.expected, as_written=True)
        valid += call is None or call["status"] not in ("invalid",) and call["tool"] != "(unparsed)"
        if not right:
            failures.append((q.text, call["arguments"] if call else update["answer"][:60]))
    false_calls = 0
    for text in no_tool:
        update = client.predict(text, None, True, api_name="/chat")
        call = first_call(update)
        false_calls += call is not None
        if call is not None:
            failures.append((text, call["tool"]))
        valid += call is None or call["status"] not in ("invalid",) and call["tool"] != "(unparsed)"
    total = len(sales) + len(no_tool)
    return {"exact": matched / max(len(sales), 1), "exact_model": written / max(len(sales), 1),
            "valid": valid / max(total, 1),
            "false_calls": false_calls / max(len(no_tool), 1), "failures": failures}


def brief(figures: dict[str, dict]) -> str:
    return "; ".join(f"{name}: exact {f['exact']:.0%} (model {f['exact_model']:.0%}), valid {f['valid']:.0%}, false calls {f['false_calls']:.0%}"
                     for name, f in figures.items())


def teach(employee, reviewer, questions: list[SalesQuestion]) -> dict:
    """Employees ask and thumb down what did not look the numbers up; the reviewer corrects."""
    asked = {}
    for q in questions:
        update = employee.predict(q.text, None, True, api_name="/chat")
        if not exact(first_call(update), q.expected):
            employee.predict(update["message_id"], -1, "没有查销售数据 / did not look up the sales data",
                             api_name="/feedback")
            asked[update["message_id"]] = q
    queue = reviewer.predict(-1, "finance", "", "", "", False, api_name="/review_queue")
    corrected = 0
    for case in queue:
        q = asked.get(case["message_id"])
        if q is None:
            continue
        reviewer.predict(case["message_id"], "approved", "should_call_tool", "", "query_sales",
                         json.dumps(q.expected, ensure_ascii=False), "", api_name="/review_decide")
        corrected += 1
    return {"asked": len(questions), "thumbs_down": len(asked), "corrected": corrected}


def launch(services):
    from webapp.app import build_app, launch_options

    app = build_app(services)
    app.queue().launch(server_name="127.0.0.1", server_port=services.settings.port, prevent_thread_lock=True,
                       quiet=True, **launch_options(services))
    return app, f"http://127.0.0.1:{services.settings.port}/"


Sets = dict[str, tuple[list[SalesQuestion], list[str]]]  # name -> (sales questions, questions needing no tool)


def run_scenario(services, train: list[SalesQuestion], sets: Sets, log=functools.partial(print, flush=True),
                 measure_before: bool = True, measure_after: bool = True, compare_guides: bool = False,
                 night: bool = True) -> dict:
    """The whole night, through the launched app. Returns before/after figures per set, and the run.
    night=False: the night already ran in this data dir (--reuse); only what it serves is measured."""
    from gradio_client import Client

    from storage import adapters as registry
    from webapp.demo import DEMO_PASSWORD

    def measure_all(client) -> dict[str, dict]:
        return {name: measure(client, sales, no_tool) for name, (sales, no_tool) in sets.items()}

    app, url = launch(services)
    try:
        employee = Client(url, auth=("finance-employee", DEMO_PASSWORD), verbose=False)
        reviewer = Client(url, auth=("finance-reviewer", DEMO_PASSWORD), verbose=False)
        before = {}
        if measure_before:
            log("measuring before …")
            before = measure_all(employee)
            log(f"before: {brief(before)}")
        taught, outcome, refresh_s = {}, None, 0.0
        if night:
            log(f"teaching with {len(train)} questions …")
            taught = teach(employee, reviewer, train)
            log(f"{taught}; the nightly refresh runs now …")
            started = time.perf_counter()
            outcomes = services.nightly.run_nightly()
            refresh_s = time.perf_counter() - started
            finance_runs = {r["id"] for r in registry.runs(services.db) if r["department_id"] == "finance"}
            outcome = next((o for o in outcomes if o.run_id in finance_runs), None)
            log(f"refresh: {outcome}")
        after_adapter = employee.predict(api_name="/whoami")["adapter_version"]
        after = {}
        if measure_after:
            log("measuring after …")
            after = measure_all(employee)
            log(f"after: {brief(after)}")
        handwritten = unguided = None
        if compare_guides:  # the same adapter, tool calls decoded with the hand-written guide, then with none
            from handwritten_guide import ToolCallGuide as HandwrittenGuide

            turns = services.engine.turns
            product_guide = turns.guide

            def handwritten_guide(tools: list[dict]):
                specs = [turns.executor.registry.get(tool["function"]["name"]) for tool in tools]
                return HandwrittenGuide.from_tools(tools, {spec.name: spec.aliases for spec in specs if spec})

            turns.guide = handwritten_guide
            log("measuring after, hand-written guide …")
            handwritten = measure_all(employee)
            log(f"after, hand-written guide: {brief(handwritten)}")
            turns.guide = product_guide
            turns.settings = dataclasses.replace(turns.settings, guided_tool_calls=False)
            log("measuring after, unguided …")
            unguided = measure_all(employee)
            log(f"after, unguided: {brief(unguided)}")
        finance = [r for r in registry.runs(services.db) if r["department_id"] == "finance"]
        run = next((r for r in finance if (r["id"] == outcome.run_id if outcome else r["status"] == "succeeded")), None)
        return {"before": before, "after": after, "handwritten": handwritten, "unguided": unguided, "taught": taught,
                "refresh_s": refresh_s,
                "outcome": outcome, "adapter_after": after_adapter, "run": run}
    finally:
        app.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=30)
    parser.add_argument("--dev", type=int, default=40, help="dev sales questions (other templates)")
    parser.add_argument("--no-tool", type=int, default=20, help="dev questions that need no tool")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sets", default=",".join(["dev", *HELD_OUT_FILES]),
                        help="the question sets to measure, comma-separated (default: %(default)s)")
    parser.add_argument("--skip-before", action="store_true",
                        help="do not measure the untrained model (it is deterministic: greedy decoding)")
    parser.add_argument("--gate-only", action="store_true",
                        help="stop after the night's gate decision (reruns of the same night)")
    parser.add_argument("--compare-guides", action="store_true",
                        help="measure the trained adapter twice more: with the hand-written guide hangjia used "
                             "before xgrammar (bench/handwritten_guide.py), and without a guide")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep the run's data dir (DuckDB file, adapters; about 0.5 GB) instead of removing it")
    parser.add_argument("--reuse", type=Path, metavar="DATA_DIR",
                        help="measure again what a kept night's data dir (--keep-data) serves, without teaching or "
                             "training: a serving change compared on the same adapter")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting for the refresh, e.g. --set learning_rate=5e-4 --set epochs=3")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="append the night's figures as one JSON line here (default: %(default)s)")
    parser.add_argument("--label", default="", help="what this night varies, kept in its result row")
    args = parser.parse_args()
    from provenance import append, commit, cpu_device

    code = commit()  # the code this run measures, read before anything can move HEAD

    import os

    from tests.conftest import free_port
    from webapp.services import open_services
    from webapp.settings import settings_from_sources

    overrides = dict(item.split("=", 1) for item in args.set)
    base = settings_from_sources(cli={}, environ={f"HANGJIA_{k.upper()}": v for k, v in overrides.items()})
    settings = dataclasses.replace(
        base, data_dir=args.reuse or Path(tempfile.mkdtemp(prefix="hangjia-bench-loop-")), demo=True, demo_feedback=False, temperature=0.0,
        max_new_tokens=args.max_new_tokens, scheduler=False, min_new_samples=10, port=free_port(), max_tool_rounds=1)
    services = open_services(settings)
    train = sales_questions(TRAIN_TEMPLATES, args.train, seed=1)
    available = {"dev": lambda: (sales_questions(HELD_OUT_TEMPLATES, args.dev, seed=2), NO_TOOL_QUESTIONS[:args.no_tool]),
                 **{name: functools.partial(held_out_questions, path) for name, path in HELD_OUT_FILES.items()}}
    chosen = [name.strip() for name in args.sets.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in available]
    if unknown:
        parser.error(f"unknown sets {unknown}; choose from {list(available)}")
    sets = {name: available[name]() for name in chosen}
    try:
        # a reused night's app serves its adapter already: there is no "before" to measure
        result = run_scenario(services, train, sets,
                              measure_before=not (args.skip_before or args.gate_only or args.reuse),
                              measure_after=not args.gate_only, compare_guides=args.compare_guides,
                              night=args.reuse is None)
    finally:
        services.close()
        if not args.keep_data and args.reuse is None:
            shutil.rmtree(settings.data_dir, ignore_errors=True)
    gate = (result["outcome"].gate or {}) if result["outcome"] else {}
    append(args.results, "bench/feedback_loop.py", cpu_device(), code, label=args.label, model=settings.model,
           command=" ".join(a for a in sys.argv[1:] if a != str(args.reuse)), overrides=overrides,
           night="reused: a kept night measured again" if args.reuse else "run", taught=result["taught"],
           refresh_s=round(result["refresh_s"], 1), mode=(result["run"] or {}).get("mode"),
           gate_passed=bool(gate.get("passed")), gate_reasons=gate.get("reasons", []), gate_table=gate.get("table", []),
           adapter_after=result["adapter_after"] or "base",
           sets={name: {"sales": len(sales), "no_tool": len(no_tool)} for name, (sales, no_tool) in sets.items()},
           **{column: {name: {k: v for k, v in figures.items() if k != "failures"} for name, figures in result[column].items()}
              for column in ("before", "after", "handwritten", "unguided") if result[column]})
    lora = (f"LoRA r={settings.lora_r} alpha={settings.lora_alpha} on {settings.lora_target_modules}, "
            f"lr {settings.learning_rate}").replace("None", "(by model size)")
    data = settings.data_dir if args.keep_data or args.reuse else "removed (--keep-data keeps it)"
    print(f"\nmachine: {os.cpu_count()} CPUs; model {settings.model}; data {data}; {lora},"
          f" {settings.epochs} epochs; overrides {overrides or 'none'}")
    print(f"refresh mode: {(result['run'] or {}).get('mode')}")
    if args.reuse:
        print(f"the night kept in {args.reuse}, measured again; serving: {result['adapter_after'] or 'base'}\n")
    else:
        print(f"taught: {result['taught']}; refresh {result['refresh_s']:.0f} s; gate "
              f"{'passed' if gate.get('passed') else 'failed: ' + '; '.join(gate.get('reasons', []))}; "
              f"serving after: {result['adapter_after'] or 'base'}\n")
    columns = [("before", result["before"]), ("after", result["after"]),
               ("after, hand-written guide", result["handwritten"]), ("after, unguided", result["unguided"])]
    columns = [(label, figures) for label, figures in columns if figures]
    print("| set | metric | " + " | ".join(label for label, _ in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, (sales, no_tool) in sets.items() if columns else ():
        for label, key in ((f"tool-call exact match, {len(sales)} sales questions", "exact"),
                           ("tool-call exact, as the model wrote it", "exact_model"),
                           ("valid format", "valid"), (f"false tool calls, {len(no_tool)} questions needing none",
                                                       "false_calls")):
            print(f"| {name} | {label} | " + " | ".join(f"{figures[name][key]:.0%}" for _, figures in columns) + " |")
    for row in gate.get("table", []):
        print(f"| gate | {row['metric']} (active -> candidate) | {row.get('active')} -> {row.get('candidate')} |")
    for name in result["after"]:
        if name in READ_WHILE_TUNING:  # a set that was never read stays that way
            print(f"\nfailures after, {name}:", json.dumps(result["after"][name]["failures"], ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
