"""Samples into and out of the store: scrubbed, split and checked for near-duplicates the
same way whether they come from a reviewer, an import file or the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

from finetune.samples import (
    Existing,
    assign_split,
    export_line,
    find_near_duplicate,
    fingerprint,
    last_question,
    parse_jsonl,
    scrub_messages,
    to_openai,
)
from storage import reviews
from storage.db import Database


class ImportRefused(ValueError):
    """The file has bad lines (listed); nothing was imported."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("Nothing was imported; fix these lines:\n" + "\n".join(self.errors))


def existing_questions(db: Database, department_id: str) -> list[Existing]:
    return [Existing(r["id"], r["split"], last_question(json.loads(r["messages"])))
            for r in reviews.sample_fingerprints(db, department_id)]


def make_sample(department_id: str, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None,
                origin: str, reason: str | None, existing: Sequence[Existing], scrub: bool,
                eval_fraction: float) -> dict[str, Any]:
    """A training_samples row. A near-duplicate of an earlier sample takes that sample's
    split, so one question never sits on both sides of the train/eval line."""
    messages = to_openai(messages)
    if scrub:
        messages = scrub_messages(messages)
    question = last_question(messages)
    duplicate = find_near_duplicate(question, existing)
    return {
        "department_id": department_id,
        "messages": json.dumps(messages, ensure_ascii=False),
        "tools": json.dumps(list(tools), ensure_ascii=False) if tools else None,
        "split": duplicate.split if duplicate else assign_split(department_id, question, eval_fraction),
        "origin": origin, "reason": reason,
        "fingerprint": fingerprint(question),
        "near_duplicate_of": duplicate.id if duplicate else None,
    }


@dataclass
class ImportResult:
    imported: int = 0
    near_duplicates: int = 0
    by_split: dict[str, int] = field(default_factory=dict)


def import_jsonl(db: Database, text: str, department_id: str | None, allowed: Collection[str] | None,
                 scrub: bool = True, eval_fraction: float = 0.1) -> ImportResult:
    """Import a JSONL file of samples, all or nothing. The department comes from the
    argument or each line's metadata.department, and must be one the caller may write."""
    parsed = parse_jsonl(text)
    errors = list(parsed.errors)
    targets = []
    for index, sample in enumerate(parsed.samples):
        target = department_id or (sample.get("metadata") or {}).get("department")
        if not target:
            errors.append(f"sample {index + 1}: no department; choose one, or set metadata.department")
        elif allowed is not None and target not in allowed:
            errors.append(f"sample {index + 1}: department {target!r} is not one you may import into")
        targets.append(target)
    if not parsed.samples and not errors:
        errors.append("the file has no samples")
    if errors:
        raise ImportRefused(errors)
    result = ImportResult()
    known: dict[str, list[Existing]] = {}
    rows = []
    for sample, target in zip(parsed.samples, targets):
        existing = known.setdefault(target, existing_questions(db, target))
        row = make_sample(target, sample["messages"], sample.get("tools"), "import", None, existing, scrub,
                          eval_fraction)
        rows.append(row)
        # later lines of the same file are compared with earlier ones too
        existing.append(Existing(-len(rows), row["split"], last_question(json.loads(row["messages"]))))
        result.near_duplicates += row["near_duplicate_of"] is not None
        result.by_split[row["split"]] = result.by_split.get(row["split"], 0) + 1
    ids = reviews.add_samples(db, rows)
    result.imported = len(ids)
    return result


def export_jsonl(db: Database, departments: Collection[str] | None, split: str | None = None) -> str:
    """OpenAI-format JSONL of the samples of these departments (None: all)."""
    lines = [export_line(row) for row in reviews.list_samples(db, split=split)
             if departments is None or row["department_id"] in departments]
    return "\n".join(lines) + ("\n" if lines else "")
