"""Grounding on its own: a question and the call a model wrote, and what should run.

Each case gives a question, the query_sales call a small model might write for it, and the
arguments that should run after the question's own words held their values
(webapp/tools/grounding.py). A case is right when grounding gives exactly those. A wrong
overrule (a value replaced where the question left room for another reading, or replaced by the
wrong value) sends the wrong query to the company's system; a missed one leaves the model's
mistake. The date is the set's own (periods like 去年四季度 are resolved against it).

    .venv/bin/python bench/grounding.py [--against COMMIT]

Sets: bench/data/grounding_dev.jsonl (the cases the rule was written with: the tests' cases and
a review's adversarial questions) and bench/data/grounding_heldout.jsonl (written from a brief by
someone who saw neither the code nor the dev cases, frozen before any tuning against it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(__file__).resolve().parent / "data"
SETS = {"development": DATA / "grounding_dev.jsonl", "held-out": DATA / "grounding_heldout.jsonl"}
TODAY = dt.date(2026, 12, 7)  # both sets were written for this day


def score(path: Path, spec, show: bool, ground_arguments=None) -> dict:
    """ground_arguments: the grounding to score (default: this commit's)."""
    from webapp.tools import grounding

    ground_arguments = ground_arguments or grounding.ground_arguments
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "_header" not in r]
    out = {"overrule": 0, "keep": 0, "right_overrule": 0, "right_keep": 0, "wrong_overrule": 0, "missed": 0}
    for row in rows:
        written = {k: v for k, v in row["model_call"].items() if v is not None}
        expected = {k: v for k, v in row["expected"].items() if v is not None}
        ran = {k: v for k, v in ground_arguments(spec, written, row["question"], TODAY)[0].items() if v is not None}
        kind = "keep" if expected == written else "overrule"
        out[kind] += 1
        if ran == expected:
            out[f"right_{kind}"] += 1
            continue
        # a value changed to something that should not run: wrong; the model's mistake left: missed
        changed = {k for k in set(ran) | set(written) if ran.get(k) != written.get(k)}
        wrong = any(ran.get(k) != expected.get(k) for k in changed)
        out["wrong_overrule" if wrong else "missed"] += 1
        if show:
            print(f"  {'WRONG' if wrong else 'missed'}: {row['question']!r} {written} -> {ran}, expected {expected}")
    out["cases"] = len(rows)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="a commit whose grounding is scored beside this one's")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "grounding.jsonl")
    args = parser.parse_args()

    from provenance import append, commit, cpu_device

    from webapp.tools.builtin import BUILTINS
    from webapp.tools.registry import DEMO_TOOLS_FILE, load_registry

    code = commit()
    spec = load_registry([DEMO_TOOLS_FILE], BUILTINS).get("query_sales")
    table, against = {}, {}
    for name, path in SETS.items():
        # the held-out set's cases are never printed: reading them would be tuning on them
        table[name] = score(path, spec, show=name == "development")
        if args.against:
            from grounding_ab import grounding_of

            ground, then_spec = grounding_of(args.against)
            against[name] = score(path, then_spec, False, ground)
    print("| set | grounding | cases | overrules due: made right | keeps due: kept | wrong overrules | missed |")
    print("|---|---|---|---|---|---|---|")
    for name in table:
        for label, t in ((code, table[name]), (args.against, against.get(name))):
            if t:
                print(f"| {name} | {label} | {t['cases']} | {t['right_overrule']}/{t['overrule']} | "
                      f"{t['right_keep']}/{t['keep']} | {t['wrong_overrule']} | {t['missed']} |")
    append(args.results, "bench/grounding.py", cpu_device(), code, sets=table,
           **({"against": args.against, "against_sets": against} if args.against else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
