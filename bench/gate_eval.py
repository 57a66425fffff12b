"""The gate's evaluation of a kept night, timed at this commit and at another in one call: the
candidate and the active adapter answer every evaluation case greedily through the batched
decoder (finetune.recipe.evaluate), as the refresh runs it after training.

    .venv/bin/python bench/gate_eval.py DATA_DIR --against REV

DATA_DIR is a data dir a night left (bench/feedback_loop.py --keep-data): its first run's
eval.jsonl, its base model and the adapter it trained. REV is checked out in a temporary git
worktree and run in its own process, then this working tree; each prints its wall time, and
the bench counts the answers that are the same. A row goes to bench/results/gate_eval.jsonl.
"""

from __future__ import annotations

import argparse
import json
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

    run_json = sorted((args.data_dir / "runs").glob("run-*"))[0] / "run.json"
    cases = sum(1 for line in (run_json.parent / "eval.jsonl").read_text(encoding="utf-8").splitlines() if line)
    worktree = Path(tempfile.mkdtemp(prefix="hangjia-against-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.against], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        then = evaluate_at(worktree, run_json)
        print(f"at {args.against}: {then['seconds']:.0f} s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    now = evaluate_at(ROOT, run_json)
    print(f"here: {now['seconds']:.0f} s", flush=True)
    same = sum(a == b for who in ("candidate", "active") for a, b in zip(then[who], now[who]))
    print(f"{cases} cases, {2 * cases} answers: {same} the same; {then['seconds'] / now['seconds']:.2f}x as fast")
    append(args.results, "bench/gate_eval.py", cpu_device(), commit(), against=args.against, cases=cases,
           seconds_then=round(then["seconds"], 1), seconds_here=round(now["seconds"], 1),
           same_answers=same, answers=2 * cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
