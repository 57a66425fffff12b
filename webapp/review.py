"""The reviewer's workbench behind the Review tab and its API: the queue, one case with
its whole context, and decisions that turn corrections into training samples."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from finetune.dataset import (
    ImportResult,
    existing_questions,
    export_jsonl,
    import_jsonl,
    make_sample,
)
from finetune.samples import REASONS, tool_call_message
from serving.chat_format import with_passages
from storage import accounts, audit, chats, reviews
from storage.accounts import User
from storage.db import Database
from webapp.auth import check_department
from webapp.engine import ChatEngine
from webapp.tools.executor import ToolExecutor, normalise_arguments, validation_errors
from webapp.tools.parser import ToolCall

REVIEW_ROLES = ("reviewer", "admin")
DECISIONS = ("approved", "rejected", "skipped")


class ReviewInputError(ValueError):
    """A decision that cannot be stored as given; the message says what to fix."""


class CaseNotFound(LookupError):
    """No such case in the departments this reviewer works on."""


@dataclass
class ReviewSettings:
    scrub_pii: bool = True
    eval_fraction: float = 0.1


def no_case(message_id) -> str:
    return f"There is no answer {message_id} among the departments you review."


def parse_day(text: str | None) -> dt.date | None:
    if not text or not str(text).strip():
        return None
    try:
        return dt.date.fromisoformat(str(text).strip())
    except ValueError:
        raise ReviewInputError(f"{text!r} is not a date; write it as 2026-11-28.")


class ReviewService:
    def __init__(self, db: Database, engine: ChatEngine, tools: ToolExecutor, settings: ReviewSettings):
        self.db = db
        self.conversations = engine.conversations  # the case's context as the model had it
        self.turns = engine.turns  # the system message a sample trains with
        self.tools = tools
        self.settings = settings

    def departments_of(self, reviewer: User) -> list[str] | None:
        """The departments a reviewer or admin reviews: the ones assigned to them, by default
        their own; None (every department) for the owner only."""
        if reviewer.owner:
            return None
        return reviews.reviewer_departments(self.db, reviewer.id) or [reviewer.department_id]

    def _check_department(self, reviewer: User, department_id: str | None, action: str = "review",
                          case: int | None = None) -> None:
        """Refuses a department the reviewer does not review (for a case, with the words used for
        a case that does not exist, so that probing ids tells nothing); audits the owner's look
        into another department."""
        allowed = self.departments_of(reviewer)
        if allowed is not None and department_id not in allowed:
            if case is not None:
                raise CaseNotFound(no_case(case))
            raise CaseNotFound(f"Department {department_id!r} is not among the departments you review.")
        if reviewer.owner:
            check_department(self.db, reviewer, department_id, action)  # audits a look into another

    def queue(self, reviewer: User, rating: int = -1, department: str | None = None,
              adapter_version: str | None = None, since: str | None = None, until: str | None = None,
              with_comment_only: bool = False) -> list[dict[str, Any]]:
        allowed = self.departments_of(reviewer)
        if department:
            self._check_department(reviewer, department, "review.queue")
            allowed = [department]
        elif allowed is None:
            self._check_department(reviewer, None, "review.queue")
        until_day = parse_day(until)
        flt = reviews.QueueFilter(allowed, rating, adapter_version or None, parse_day(since),
                                  until_day + dt.timedelta(days=1) if until_day else None, with_comment_only)
        return reviews.review_queue(self.db, flt, reviewer.id)

    def case(self, reviewer: User, message_id: int) -> dict[str, Any]:
        header = reviews.case_header(self.db, int(message_id))
        if header is None:
            raise CaseNotFound(no_case(message_id))
        self._check_department(reviewer, header["department_id"], "review.case", int(message_id))
        owner = accounts.get_user(self.db, header["user_id"])
        items, _ = self.conversations.items(owner, header["conversation_id"])
        # the conversation up to the answer under review
        cut = next((i for i, item in enumerate(items) if item.get("message_id") == header["message_id"]), len(items) - 1)
        turn_start = max((i for i, item in enumerate(items[:cut + 1]) if item["type"] == "user"), default=0)
        return {
            **{k: header[k] for k in ("message_id", "conversation_id", "department_id", "username", "model",
                                      "adapter", "adapter_version", "rating", "comment", "content")},
            "answered_at": header["created_at"].isoformat(),
            "items": items[:cut + 1],
            "turn_tools": [i for i in items[turn_start:cut + 1] if i["type"] == "tool"],
            "decisions": [{**d, "created_at": d["created_at"].isoformat()} for d in reviews.decisions_of(
                self.db, header["message_id"])],
            "tools": [spec.function_schema() for spec in self.tools.tools_for(owner)],
        }

    def decide(self, reviewer: User, message_id: int, decision: str, reason: str | None = None,
               answer: str | None = None, tool_name: str | None = None, tool_arguments: Any = None,
               note: str | None = None) -> dict[str, Any]:
        """Approve (a training sample is stored), reject (not a model error) or skip."""
        if decision not in DECISIONS:
            raise ReviewInputError(f"decision must be one of {', '.join(DECISIONS)}.")
        header = reviews.case_header(self.db, int(message_id))
        if header is None:
            raise CaseNotFound(no_case(message_id))
        self._check_department(reviewer, header["department_id"], "review.decide", int(message_id))
        if reason is not None and reason not in REASONS:
            raise ReviewInputError(f"reason must be one of {', '.join(REASONS)}.")
        sample = None
        if decision == "approved":
            sample = self._sample(reviewer, header, reason, (answer or "").strip() or None, tool_name or None,
                                  tool_arguments)
        review_id, sample_id = reviews.record_decision(
            self.db, header["message_id"], reviewer.id, decision, reason if decision != "skipped" else None,
            (note or "").strip() or None, sample)
        return {"review_id": review_id, "sample_id": sample_id,
                "split": sample["split"] if sample else None,
                "near_duplicate_of": sample["near_duplicate_of"] if sample else None}

    def _sample(self, reviewer: User, header: dict[str, Any], reason: str | None, answer: str | None,
                tool_name: str | None, tool_arguments: Any) -> dict[str, Any]:
        owner = accounts.get_user(self.db, header["user_id"])
        stored = chats.list_messages(self.db, header["conversation_id"])
        question_id = max((m.id for m in stored if m.role == "user" and m.id < header["message_id"]), default=None)
        if question_id is None:
            raise ReviewInputError("This answer has no question before it.")
        # the passages the question was served with belong to the sample: trained without them, the
        # adapter never saw a question with passages and called tools for policy questions (#8)
        system, passages = self.turns.system(), self.conversations.passages_for(question_id)
        tools = [spec.function_schema() for spec in self.tools.tools_for(owner)]
        if reason is None:
            raise ReviewInputError("Pick a reason for the approval.")
        if reason == "good_example":
            if answer or tool_name:
                raise ReviewInputError("A good example keeps the original answer; clear the correction.")
            context = self.conversations.history_messages(header["conversation_id"],
                                                          up_to_message_id=header["message_id"])
            target: list[dict[str, Any]] = []
            origin = "good_example"
        else:
            if not answer and not tool_name:
                raise ReviewInputError("Write the corrected answer, or pick the tool the model should have called.")
            context = self.conversations.history_messages(header["conversation_id"], up_to_message_id=question_id)
            target = self._target(reviewer, owner, header, answer, tool_name, tool_arguments)
            origin = "correction"
        existing = existing_questions(self.db, header["department_id"])
        messages = [system, *with_passages(context, passages), *target]
        return make_sample(header["department_id"], messages, tools, origin, reason, existing, self.settings.scrub_pii,
                           self.settings.eval_fraction)

    def _target(self, reviewer: User, owner: User, header: dict[str, Any], answer: str | None,
                tool_name: str | None, tool_arguments: Any) -> list[dict[str, Any]]:
        """What the model should have said: a tool call (with its real result and the
        final answer, when the reviewer wrote one), or only the corrected answer."""
        if not tool_name:
            return [{"role": "assistant", "content": answer}]
        spec = self.tools.registry.get(tool_name)
        if spec is None or not spec.allows(owner):
            raise ReviewInputError(f"{header['username']} may not use a tool named {tool_name!r}.")
        if isinstance(tool_arguments, str):
            try:
                tool_arguments = json.loads(tool_arguments or "{}")
            except json.JSONDecodeError as exc:
                raise ReviewInputError(f"The tool arguments are not valid JSON: {exc.msg} at position {exc.pos}.")
        if not isinstance(tool_arguments, dict):
            raise ReviewInputError("The tool arguments must be a JSON object.")
        arguments = normalise_arguments(spec, tool_arguments)
        errors = validation_errors(spec, arguments)
        if errors:
            raise ReviewInputError(f"Invalid arguments for {tool_name}: " + " ".join(errors))
        call_id = f"call_review_{header['message_id']}"
        messages = [tool_call_message(tool_name, arguments, call_id)]
        if answer is None:
            return messages  # the sample teaches the call itself
        if spec.side_effect:
            raise ReviewInputError(f"{tool_name} has side effects: correct the call only, without a final answer.")
        # the real result, fetched with the employee's own permissions, audited as the reviewer's
        # action on the employee's behalf: the tool rows name both, the audit trail the reviewer
        outcome = self.tools.execute(owner, ToolCall(tool_name, arguments), call_id=call_id,
                                     message_id=header["message_id"], conversation_id=header["conversation_id"],
                                     acted_by=reviewer)
        audit.record(self.db, reviewer.id, reviewer.department_id, "review.tool_run", tool=tool_name,
                     call_id=call_id, on_behalf_of=owner.username, status=outcome.status)
        if outcome.status != "ok":
            raise ReviewInputError(f"Running {tool_name} failed ({outcome.content}); fix the arguments.")
        return [*messages, {"role": "tool", "content": outcome.content, "tool_call_id": call_id},
                {"role": "assistant", "content": answer}]

    def export(self, user: User, department: str | None = None, split: str | None = None) -> str:
        departments = self.departments_of(user)
        if department:
            self._check_department(user, department, "samples.export")
            departments = [department]
        elif departments is None:
            self._check_department(user, None, "samples.export")
        return export_jsonl(self.db, departments, split)

    def import_samples(self, user: User, text: str, department: str | None) -> ImportResult:
        if department:
            self._check_department(user, department, "samples.import")
        return import_jsonl(self.db, text, department or None, self.departments_of(user),
                            self.settings.scrub_pii, self.settings.eval_fraction)


def tool_argument_skeleton(schema: dict[str, Any]) -> str:
    """A JSON object to start the correction form from: required keys, enum hints."""
    skeleton = {}
    for name, prop in schema.get("properties", {}).items():
        if name in schema.get("required", []):
            skeleton[name] = prop.get("enum", [""])[0] if prop.get("enum") else ""
    return json.dumps(skeleton, ensure_ascii=False, indent=1)


