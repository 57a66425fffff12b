"""The tool-call parser on the development set and the held-out set, side by side.

    python bench/parser.py

bench/data/parser_dev.jsonl was written with the parser; bench/data/parser_heldout.jsonl was
written independently from other engines' own parser tests (vLLM, SGLang, ...) and realistic
company outputs, and frozen before any tuning against it. A case is right when the parser gives
exactly its calls (names and arguments, in order), its number of errors, and (where the case
pins it) its visible text, whitespace runs counted as one space. Prints a table and each held-out case that is wrong.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webapp.tools.parser import parse_output  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def load(name: str) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "_header" not in r]


def same_text(got: str, want: str) -> bool:
    """Equal once runs of whitespace are one space (the sets' rule: where a block is removed
    mid-text, engines do not agree on the blank lines left)."""
    return re.sub(r"\s+", " ", got).strip() == re.sub(r"\s+", " ", want).strip()


def judge(case: dict) -> dict:
    parsed = parse_output(case["raw"])
    calls = [{"name": c.name, "arguments": c.arguments} for c in parsed.calls]
    right = {"calls": calls == case["calls"], "errors": len(parsed.errors) == case.get("errors", 0),
             "text": "text" not in case or same_text(parsed.text, case["text"])}
    return {**right, "all": all(right.values()), "got": {"calls": calls, "errors": parsed.errors, "text": parsed.text}}


def main() -> int:
    print("| set | cases | calls right | errors right | text right | all right |")
    print("|---|---|---|---|---|---|")
    wrong = []
    for name, label in (("parser_dev.jsonl", "development"), ("parser_heldout.jsonl", "held-out")):
        if not (DATA / name).exists():
            print(f"| {label} | (missing {name}) | | | | |")
            continue
        cases = load(name)
        results = [judge(c) for c in cases]
        count = {k: sum(r[k] for r in results) for k in ("calls", "errors", "text", "all")}
        n = len(cases)
        print(f"| {label} | {n} | " + " | ".join(f"{count[k]} ({count[k] / n:.0%})" for k in
                                                  ("calls", "errors", "text", "all")) + " |")
        if label == "held-out":
            wrong = [(c, r) for c, r in zip(cases, results) if not r["all"]]
    for case, result in wrong:
        print(f"\nwrong: {case['id']} ({case.get('source')})\n  raw: {case['raw'][:200]!r}\n"
              f"  want: calls={case['calls']} errors={case.get('errors', 0)} text={case.get('text')!r}\n"
              f"  got:  {json.dumps(result['got'], ensure_ascii=False)[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
