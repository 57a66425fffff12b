"""Runs tool calls: permission -> arguments -> (approval) -> run with timeout and retries,
with an audit row for every attempt and decision."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from storage import tool_audit
from storage.accounts import User
from storage.db import Database
from webapp.tools.grounding import ground_arguments
from webapp.tools.parser import ToolCall
from webapp.tools.registry import ToolRegistry, ToolSpec

log = logging.getLogger(__name__)


class TransientToolError(RuntimeError):
    """A failure worth retrying: the system was busy or unreachable."""


class ToolUserError(ValueError):
    """The tool ran and refused the request (no data for that period, 404...). Not retried;
    the message goes back to the model."""


@dataclass
class ToolContext:
    """What a tool may know about the call. Built by the server from the user's row."""

    db: Database
    user: User
    today: dt.date
    conversation_id: int | None = None
    message_id: int | None = None  # the answer that made the call


@dataclass
class ToolOutcome:
    call_id: str
    tool: str
    arguments: dict[str, Any]
    status: str  # ok / error / denied / invalid / timeout / declined / pending
    content: str  # what the model is told
    side_effect: bool = False
    attempts: int = 0
    latency_ms: float = 0.0
    overruled: dict[str, Any] = field(default_factory=dict)  # parameter -> the model's value, replaced

    @property
    def summary(self) -> str:
        return summarize(self.content)


def summarize(text: str | None, limit: int = 300) -> str:
    """One line for an action card."""
    text = (text or "").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:16]


def normalise_arguments(spec: ToolSpec, arguments: dict[str, Any]) -> dict[str, Any]:
    """Map known aliases onto enum values ("East China" -> "华东"), case- and space-insensitive;
    unknown values pass through to validation, which rejects them with the valid choices."""
    result = dict(arguments)
    for param, aliases in spec.aliases.items():
        value = result.get(param)
        if not isinstance(value, str):
            continue
        key = " ".join(value.split()).casefold()
        for alias, canonical in aliases.items():
            if " ".join(alias.split()).casefold() == key:
                result[param] = canonical
                break
        else:
            enum = spec.parameters.get("properties", {}).get(param, {}).get("enum")
            if enum:
                for choice in enum:
                    if isinstance(choice, str) and choice.casefold() == key:
                        result[param] = choice
    return result


def validation_errors(spec: ToolSpec, arguments: dict[str, Any]) -> list[str]:
    errors = []
    for error in sorted(spec.validator.iter_errors(arguments), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in error.path) or "arguments"
        if error.validator == "enum":
            choices = ", ".join(map(str, error.validator_value))
            errors.append(f"{where}: {error.instance!r} is not allowed; choose one of {choices}.")
        else:
            errors.append(f"{where}: {error.message}.")
    return errors


class ToolExecutor:
    TRANSIENT = (TransientToolError, ConnectionError, TimeoutError)

    def __init__(
        self,
        registry: ToolRegistry,
        db: Database,
        max_result_chars: int = 4000,
        today: Callable[[], dt.date] = dt.date.today,
        sleep: Callable[[float], None] = time.sleep,
        max_workers: int = 8,
    ):
        self.registry = registry
        self.db = db
        self.max_result_chars = max_result_chars
        self.today = today
        self.sleep = sleep
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tool")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def tools_for(self, user: User) -> list[ToolSpec]:
        return self.registry.for_user(user)

    # -- audit ----------------------------------------------------------------------------

    def _audit(self, user: User, call_id: str, tool: str, arguments: Any, status: str, attempt: int,
               message_id: int | None, conversation_id: int | None, side_effect: bool = False,
               latency_ms: float | None = None, result: str | None = None, error: str | None = None,
               acted_by: int | None = None, overruled: dict | None = None) -> None:
        tool_audit.record_attempt(
            self.db, call_id=call_id, message_id=message_id, conversation_id=conversation_id,
            user_id=user.id, department_id=user.department_id, tool=tool[:200],
            arguments=json.dumps(arguments, ensure_ascii=False, default=str)[: self.max_result_chars],
            status=status, attempt=attempt, side_effect=side_effect, latency_ms=latency_ms,
            result=result, error=error, acted_by=acted_by,
            overruled=json.dumps(overruled, ensure_ascii=False, default=str) if overruled else None,
        )

    def _truncate(self, text: str) -> str:
        if len(text) <= self.max_result_chars:
            return text
        return text[: self.max_result_chars] + f"…(truncated {len(text) - self.max_result_chars:,} characters)"

    # -- the call -------------------------------------------------------------------------

    def record_malformed(self, user: User, error: str, message_id: int | None = None,
                         conversation_id: int | None = None) -> ToolOutcome:
        """A tool call the parser could not read: audited, and explained to the model."""
        call_id = new_call_id()
        self._audit(user, call_id, "(unparsed)", {}, "invalid", 0, message_id, conversation_id, error=error)
        return ToolOutcome(call_id, "(unparsed)", {}, "invalid", f"Error: {error}")

    def execute(self, user: User, call: ToolCall, *, call_id: str | None = None, message_id: int | None = None,
                conversation_id: int | None = None, approved: bool = False,
                acted_by: User | None = None, question: str | None = None,
                overruled: dict[str, Any] | None = None) -> ToolOutcome:
        """Run `call` with `user`'s permissions. acted_by: someone running it on the user's behalf
        (a reviewer fetching a correction's real result); the audit rows name both. question:
        the user's message that led to the call; closed values it spells overrule the model's
        (webapp.tools.grounding); overruled: what they replaced when the call was proposed."""
        call_id = call_id or new_call_id()
        audit = dict(message_id=message_id, conversation_id=conversation_id,
                     acted_by=acted_by.id if acted_by is not None else None)
        spec = self.registry.get(call.name)
        if spec is None or not spec.allows(user):
            # The model only saw tools this user may call; naming another one is denied,
            # whatever the conversation said.
            status = "invalid" if spec is None else "denied"
            message = (f"there is no tool named {call.name!r}." if spec is None
                       else f"you may not use the tool {call.name!r} (role {user.role}, department {user.department_id}).")
            self._audit(user, call_id, call.name, call.arguments, status, 0, **audit, error=message)
            return ToolOutcome(call_id, call.name, call.arguments, status, f"Error: {message}")

        arguments = normalise_arguments(spec, call.arguments)
        overruled = dict(overruled or {})
        if question:
            arguments, now = ground_arguments(spec, arguments, question, self.today())
            overruled.update(now)
        audit["overruled"] = overruled or None
        errors = validation_errors(spec, arguments)
        if errors:
            message = f"invalid arguments for {spec.name}: " + " ".join(errors)
            self._audit(user, call_id, spec.name, arguments, "invalid", 0, **audit,
                        side_effect=spec.side_effect, error=message)
            return ToolOutcome(call_id, spec.name, arguments, "invalid", f"Error: {message}", spec.side_effect,
                               overruled=overruled)

        if spec.side_effect and not approved:
            self._audit(user, call_id, spec.name, arguments, "pending", 0, **audit, side_effect=True)
            return ToolOutcome(call_id, spec.name, arguments, "pending",
                               "Waiting for the user to approve this action.", True, overruled=overruled)

        outcome = self._run(user, spec, arguments, call_id, audit)
        outcome.overruled = overruled
        return outcome

    def _run(self, user: User, spec: ToolSpec, arguments: dict[str, Any], call_id: str,
             audit: dict[str, Any]) -> ToolOutcome:
        context = ToolContext(self.db, user, self.today(), audit.get("conversation_id"), audit.get("message_id"))
        attempts = 1 + spec.retries
        total_ms = 0.0
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            future = self._pool.submit(spec.run, dict(arguments), context)
            status, content, error, retryable = "ok", "", None, False
            try:
                result = future.result(timeout=spec.timeout_s)
                content = self._truncate(result if isinstance(result, str)
                                         else json.dumps(result, ensure_ascii=False, default=str))
            except concurrent.futures.TimeoutError:
                future.cancel()
                status, error, retryable = "timeout", f"{spec.name} did not answer within {spec.timeout_s:g} s.", True
            except self.TRANSIENT as exc:
                status, error, retryable = "error", f"{spec.name} failed: {exc}", True
            except ToolUserError as exc:
                status, error = "error", str(exc)
            except Exception as exc:  # a bug or an unexpected failure of the tool: not retried
                log.exception("tool %s failed", spec.name)
                status, error = "error", f"{spec.name} failed unexpectedly ({type(exc).__name__}: {exc})."
            latency = (time.perf_counter() - started) * 1000
            total_ms += latency
            self._audit(user, call_id, spec.name, arguments, status, attempt, **audit, side_effect=spec.side_effect,
                        latency_ms=latency, result=content or None, error=error)
            if status == "ok":
                return ToolOutcome(call_id, spec.name, arguments, "ok", content, spec.side_effect, attempt, total_ms)
            if not retryable or attempt == attempts:
                return ToolOutcome(call_id, spec.name, arguments, status, f"Error: {error}", spec.side_effect,
                                   attempt, total_ms)
            self.sleep(spec.backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    # -- approval of side effects -----------------------------------------------------------

    def resolve_pending(self, user: User, call_id: str, approve: bool) -> ToolOutcome:
        """The user's answer to a pending side-effect call. Permissions and arguments are
        checked again: what was allowed when it was proposed may not be now."""
        rows = tool_audit.attempts_of(self.db, call_id)
        if not rows or rows[-1].user_id != user.id:
            raise LookupError(f"No action {call_id} waits for you.")
        last = rows[-1]
        if last.status != "pending":
            raise LookupError(f"Action {call_id} was already {last.status}.")
        arguments = json.loads(last.arguments)
        overruled = last.replaced
        audit = dict(message_id=last.message_id, conversation_id=last.conversation_id)
        if not approve:
            self._audit(user, call_id, last.tool, arguments, "declined", 0, **audit, side_effect=True,
                        overruled=overruled or None)
            return ToolOutcome(call_id, last.tool, arguments, "declined",
                               f"The user declined to run {last.tool}; it was not executed.", True, overruled=overruled)
        return self.execute(user, ToolCall(last.tool, arguments), call_id=call_id, approved=True, overruled=overruled,
                            **audit)
