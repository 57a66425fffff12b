"""The gate's evaluation of a kept night, timed at this commit and at another in one call: the
candidate and the active adapter answer every evaluation case greedily through the batched
decoder (finetune.recipe.evaluate), as the refresh runs it after training.

    .venv/bin/python bench/gate_eval.py DATA_DIR --against REV

DATA_DIR is a data dir a night left (bench/feedback_loop.py --keep-data): its first run's
eval.jsonl, its base model and the adapter it trained. The cases get what this commit's refresh
writes beside them and an older night's file lacks (spelled_tool: the tool whose whole call the
question spells, from the demo tool files). REV is checked out in a temporary git worktree and
run in its own process, then this working tree; each prints its wall time, the bench counts the
answers that are the same and prints the gate's metrics and decision at both. A row goes to
bench/results/gate_eval.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# Run inside the tree being measured: its own recipe, decoder and attention.
EVALUATE = r"""
import dataclasses, json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from finetune import recipe
run = json.loads(open(sys.argv[2]).read())
fields = {f.name for f in dataclasses.fields(recipe.RecipeConfig)}
cfg = recipe.RecipeConfig(**{k: v for k, v in run.items() if k in fields})
cfg = dataclasses.replace(cfg, progress_file=sys.argv[3], active_adapter=None)
tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32),
                                  cfg.output_dir)
started = time.perf_counter()
recipe.evaluate(cfg, model, tokenizer)
seconds = time.perf_counter() - started
answers = [json.loads(line) for line in open(sys.argv[3]) if '"event": "eval"' in line][-1]
print(json.dumps({"seconds": seconds, "candidate": answers["candidate"], "active": answers["active"]}))
"""


def with_spelled_tool(cases: list[dict], today) -> list[dict]:
    """The cases as this commit's refresh writes them: each with the offered tool whose whole call
    its question spells (webapp.services.department_spelled_tool), from the demo tool files, on
    the night's day. A night's file that has them is kept as it is."""
    if all("spelled_tool" in case for case in cases):
        return cases
    from webapp.tools.builtin import BUILTINS
    from webapp.tools.grounding import spelled_tool
    from webapp.tools.registry import DEMO_TOOLS_FILE, load_registry

    registry = load_registry([DEMO_TOOLS_FILE], BUILTINS)  # the knowledge search grounds nothing
    out = []
    for case in cases:
        question = [m.get("content") or "" for m in case["messages"] if m["role"] == "user"][-1]
        spec = spelled_tool([spec for tool in case.get("tools") or () if (spec := registry.get(tool["function"]["name"]))],
                            question, today)
        out.append({**case, "spelled_tool": spec.name if spec else None})
    return out


def evaluate_at(tree: Path, run_json: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="hangjia-gate-eval-") as scratch:
        shown = subprocess.run([sys.executable, "-c", EVALUATE, str(tree), str(run_json),
                                str(Path(scratch) / "progress.jsonl")],
                               cwd=tree, capture_output=True, text=True)
    if shown.returncode:
        raise SystemExit(f"the evaluation at {tree} failed:\n{shown.stderr[-3000:]}")
    return json.loads(shown.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--against", required=True, help="the commit whose evaluation is timed beside")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "gate_eval.jsonl")
    args = parser.parse_args()

    from provenance import append, commit, cpu_device

    from finetune.evaluate import EvalCase, gate, per_case_scores, score, worse_cases

    kept = sorted((args.data_dir / "runs").glob("run-*"))[0]
    night = dt.date.fromtimestamp((kept / "run.json").stat().st_mtime)
    rows = with_spelled_tool([json.loads(line) for line in (kept / "eval.jsonl").read_text(encoding="utf-8")
                              .splitlines() if line], night)
    scratch = Path(tempfile.mkdtemp(prefix="hangjia-gate-cases-"))
    (scratch / "eval.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    run_json = scratch / "run.json"
    run_json.write_text(json.dumps({**json.loads((kept / "run.json").read_text()),
                                    "eval_cases": str(scratch / "eval.jsonl")}))
    cases = len(rows)
    worktree = Path(tempfile.mkdtemp(prefix="hangjia-against-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.against], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        then = evaluate_at(worktree, run_json)
        print(f"at {args.against}: {then['seconds']:.0f} s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    try:
        now = evaluate_at(ROOT, run_json)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"here: {now['seconds']:.0f} s", flush=True)
    same = sum(a == b for who in ("candidate", "active") for a, b in zip(then[who], now[who]))
    print(f"{cases} cases, {2 * cases} answers: {same} the same; {then['seconds'] / now['seconds']:.2f}x as fast")
    evaluated = [EvalCase(**{k: v for k, v in r.items() if k in EvalCase.__dataclass_fields__}) for r in rows]
    metrics = {(where, who): score(evaluated, answers[who]) for where, answers in (("then", then), ("here", now))
               for who in ("active", "candidate")}
    print(f"| metric | active at {args.against} | candidate at {args.against} | active here | candidate here |")
    print("|---|---|---|---|---|")
    for metric in metrics["here", "active"]:
        print(f"| {metric} | " + " | ".join(f"{metrics[key][metric]:.3f}" for key in
                                            (("then", "active"), ("then", "candidate"), ("here", "active"),
                                             ("here", "candidate"))) + " |")
    decisions = {}
    for where, answers in (("then", then), ("here", now)):  # as finetune/refresh.py decides (default settings)
        decisions[where] = gate(metrics[where, "candidate"], metrics[where, "active"],
                                worse=worse_cases(evaluated, answers["active"], answers["candidate"]),
                                per_case=(per_case_scores(evaluated, answers["active"]),
                                          per_case_scores(evaluated, answers["candidate"])))["passed"]
    print(f"gate (default margin and tolerance): at {args.against} {decisions['then']}, here {decisions['here']}")
    append(args.results, "bench/gate_eval.py", cpu_device(), commit(), against=args.against, cases=cases,
           seconds_then=round(then["seconds"], 1), seconds_here=round(now["seconds"], 1),
           same_answers=same, answers=2 * cases,
           spelled_cases=sum(bool(r.get("spelled_tool")) for r in rows),
           metrics={f"{where} {who}": {k: round(v, 4) for k, v in m.items()} for (where, who), m in metrics.items()},
           gate_passed=decisions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
