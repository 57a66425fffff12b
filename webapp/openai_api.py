"""The OpenAI-compatible API (/v1), served beside the Gradio app.

A call goes through the same turn (webapp/turn.py) as the browser: the key's owner is the
user, so their department's adapter, ACL-filtered retrieval, the response cache, tools
with the user's permissions and the logging all apply. What differs from OpenAI's API,
because hangjia keeps the conversation and runs the company's tools itself:

- `conversation_id` (extra body field) continues a stored conversation; without it,
  earlier user/assistant messages the client sends are stored as a new conversation.
  Client system messages are ignored: the company's system prompt applies.
- Tools run on the server; each response lists them in `hangjia.actions`. A side-effect
  action waiting for the user is listed in `hangjia.pending`; approve or decline it with
  POST /v1/actions/{call_id} {"approve": true|false}.
- Sampling settings (temperature, max_tokens) are the server's, set by the admin.
- Documents: file content parts of the last user message ({"type": "file", "file":
  {"filename", "file_data"}}, base64 or a data: URL) are attached as the browser's 📎 does:
  whole when they fit, the most related passages when not; `hangjia.notices` says which.

Errors are OpenAI's shape: {"error": {"message", "type", "code"}} with the HTTP status.
POST /v1/completions (raw prompt in, text out, no retrieval or tools) is for admins: it
is what another hangjia uses when this one serves as its generation backend.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
import uuid
from typing import Any, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from storage import StorageError, audit, chats
from webapp.auth import NotAuthorized, check_department
from webapp.conversations import ConversationNotFound, UserInputError
from webapp.metrics import CONTENT_TYPE
from webapp.models import GenerationParams, GenerationResult
from webapp.turn import GenerationFailed, TurnUpdate

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 48 * 1024 * 1024  # attachments travel inside the JSON, base64-encoded (the browser's limit is 50 MB)
MAX_ATTACHMENTS = 10


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": None,
                                       "code": self.code}}, status_code=self.status)


def model_id(department_id: str) -> str:
    return f"hangjia-{department_id}"


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _text_of(content: Any) -> str | None:
    """OpenAI content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    return None


def _files_of(content: Any) -> list[tuple[str, bytes]]:
    """The documents attached to a message as OpenAI sends them: content parts
    {"type": "file", "file": {"filename": ..., "file_data": "data:...;base64,..." or bare base64}}.
    They go where the browser's 📎 goes: whole when they fit, as passages when they do not."""
    if not isinstance(content, list):
        return []
    files = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "file":
            continue
        file = part.get("file")
        if not isinstance(file, dict):
            raise ApiError(400, "A file part needs a `file` object with `filename` and `file_data`.")
        if file.get("file_id") is not None and file.get("file_data") is None:
            raise ApiError(400, "Uploaded-file ids are not supported: send the document itself as `file_data` "
                                "(base64, or a data: URL).")
        name, data = file.get("filename"), file.get("file_data")
        if not isinstance(name, str) or not name.strip() or not isinstance(data, str):
            raise ApiError(400, "A file part needs `filename` (with its extension: .pdf, .docx, .md, .txt ...) "
                                "and `file_data`.")
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            files.append((name.strip(), base64.b64decode(data, validate=True)))
        except ValueError:  # binascii.Error is one
            raise ApiError(400, f"The file_data of {name.strip()!r} is not valid base64.")
    if len(files) > MAX_ATTACHMENTS:
        raise ApiError(400, f"{len(files)} files in one message; at most {MAX_ATTACHMENTS}.")
    return files


def _sse(payload: Any) -> str:
    """One server-sent event as OpenAI streams them."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _turn_failure(exc: Exception) -> ApiError:
    """A turn that failed after it started: the model, or the database refusing a write."""
    if isinstance(exc, StorageError):
        return ApiError(503, str(exc), "server_error", "storage_unavailable")
    reference = secrets.token_hex(3)
    log.error("a /v1 turn failed (ref %s)", reference, exc_info=exc)
    return ApiError(500, f"The model failed while answering; it was logged (ref {reference}). Try again; if it keeps "
                         "failing, give your admin the reference.", "server_error", "generation_failed")


def _joined_text(update: TurnUpdate) -> str:
    return "\n\n".join(i["content"] for i in update.items if i.get("type") == "text" and i.get("content"))


def _extras(update: TurnUpdate) -> dict[str, Any]:
    return {
        "conversation_id": update.conversation_id, "message_id": update.message_id,
        "adapter": update.adapter, "adapter_version": update.adapter_version, "cached": update.cached,
        "actions": [i for i in update.items if i.get("type") == "tool"],
        "sources": [s for i in update.items if i.get("type") == "sources" for s in i.get("sources", [])],
        "pending": update.pending,
        "notices": [i["content"] for i in update.items if i.get("type") == "notice"],
    }


async def _body_of(request: Request) -> dict[str, Any]:
    # read up to the limit and no further: a client streaming gigabytes is refused, not buffered
    too_big = ApiError(413, f"The request body is over the limit of {MAX_BODY_BYTES:,} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise too_big
        parts.append(part)
    raw = b"".join(parts)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ApiError(400, f"The body is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}).")
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.")
    return body


class OpenAIHandlers:
    """The handlers of /v1 and /metrics over the app's services. The model is one device: at
    most generation_concurrency turns generate at once, the others wait here (Gradio's queue
    does the same for the browser)."""

    def __init__(self, services):
        self.services = services
        self.generating = threading.BoundedSemaphore(services.settings.generation_concurrency)

    def user_of(self, request: Request):
        try:
            return self.services.auth.user_for_api_key(_bearer(request))
        except NotAuthorized as exc:
            raise ApiError(401, str(exc), "authentication_error", "invalid_api_key")

    def models_of(self, user) -> list[dict[str, Any]]:
        adapter = self.services.model.adapter_for(user.department_id)
        return [{"id": model_id(user.department_id), "object": "model", "created": 0, "owned_by": "hangjia",
                 "base_model": self.services.model.name, "department": user.department_id,
                 "adapter_version": adapter.version if adapter else None}]

    def check_model(self, user, requested: Any) -> str:
        allowed = {m["id"] for m in self.models_of(user)}
        if requested in allowed or requested == "hangjia":
            return model_id(user.department_id)
        raise ApiError(404, f"The model {requested!r} does not exist or you have no access to it. "
                            f"Yours: {', '.join(sorted(allowed))}.", code="model_not_found")

    async def list_models(self, request: Request):
        return {"object": "list", "data": self.models_of(self.user_of(request))}

    async def chat_completions(self, request: Request):
        user = self.user_of(request)
        body = await _body_of(request)
        model = self.check_model(user, body.get("model"))
        if body.get("tools"):
            raise ApiError(400, "Client-side tools are not supported: hangjia runs the company's tools itself, "
                                "with your permissions. Send the question without `tools`.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "`messages` must be a non-empty list of {role, content} objects.")
        turns = [{"role": m.get("role"), "content": _text_of(m.get("content"))} for m in messages
                 if m.get("role") != "system"]
        if not turns or turns[-1]["role"] != "user" or turns[-1]["content"] is None:
            raise ApiError(400, "The last message must be the user's, with text content.")
        # documents count in the last message only: earlier ones were answered already (send the
        # conversation_id to keep what the model was given then)
        attachments = _files_of(messages[-1].get("content"))
        conversation_id = body.get("conversation_id")
        if conversation_id is not None and (isinstance(conversation_id, bool) or not isinstance(conversation_id, int)):
            raise ApiError(400, "`conversation_id` must be an integer.")

        def start():
            nonlocal conversation_id
            if conversation_id is None and len(turns) > 1:
                conversation_id = self.services.engine.conversations.import_history(user, turns[:-1])
            return self.services.engine.turns.stream_turn(user, turns[-1]["content"], conversation_id,
                                                     attachments=attachments or None, fresh=bool(body.get("fresh")))

        return await self._respond(start, bool(body.get("stream")), model)

    async def resolve_action(self, request: Request, call_id: str):
        user = self.user_of(request)
        body = await _body_of(request)
        if not isinstance(body.get("approve"), bool):
            raise ApiError(400, "Send {\"approve\": true} or {\"approve\": false}.")
        return await self._respond(lambda: self.services.engine.turns.resolve_action(user, call_id, body["approve"]),
                                   bool(body.get("stream")), model_id(user.department_id))

    async def _respond(self, start, stream: bool, model: str):
        def first_update():
            self.generating.acquire()
            try:
                updates = start()
                return updates, next(updates)
            except BaseException:
                self.generating.release()
                raise

        try:
            updates, first = await run_in_threadpool(first_update)
        except UserInputError as exc:
            raise ApiError(400, str(exc), code=exc.code)
        except ConversationNotFound as exc:
            raise ApiError(404, str(exc), code="conversation_not_found")
        except LookupError as exc:  # an action that is not (or no longer) waiting, or not the caller's
            raise ApiError(404, str(exc), code="not_found")
        except StorageError as exc:
            raise _turn_failure(exc)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def rest() -> Iterator[TurnUpdate]:
            try:
                yield first
                yield from updates
            finally:
                updates.close()
                self.generating.release()

        if not stream:
            def consume():
                last = first
                for last in rest():
                    pass
                return last
            try:
                last = await run_in_threadpool(consume)
            except (GenerationFailed, StorageError) as exc:
                raise _turn_failure(exc)
            usage, finish = self._usage_and_finish(last)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": _joined_text(last)},
                                 "finish_reason": finish}],
                    "usage": usage, "hangjia": _extras(last)}

        def events() -> Iterator[str]:
            def chunk(delta: dict, finish: str | None = None, **extra) -> str:
                return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                             **extra})

            sent, last = "", first
            yield chunk({"role": "assistant", "content": ""})
            try:
                for last in rest():
                    text = _joined_text(last)
                    if len(text) > len(sent) and text.startswith(sent):
                        yield chunk({"content": text[len(sent):]})
                        sent = text
            except (GenerationFailed, StorageError) as exc:
                failure = _turn_failure(exc)
                yield _sse({"error": {"message": failure.message, "type": failure.kind, "code": failure.code}})
                return
            usage, finish = self._usage_and_finish(last)
            yield chunk({}, finish, usage=usage, hangjia=_extras(last))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _usage_and_finish(self, update: TurnUpdate) -> tuple[dict[str, int], str]:
        """Token counts and finish reason of the stored final answer (one read)."""
        outcome = (chats.message_outcome(self.services.db, update.message_id) if update.message_id else None) or {}
        prompt, completion = int(outcome.get("prompt_tokens") or 0), int(outcome.get("completion_tokens") or 0)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return usage, "length" if outcome.get("finish_reason") == "length" else "stop"

    async def completions(self, request: Request):
        user = self.user_of(request)
        if user.role != "admin" and not user.owner:
            raise ApiError(403, "Raw completions are for admins (a generation backend); use /v1/chat/completions.",
                           "permission_error")
        body = await _body_of(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "`prompt` must be a non-empty string.")
        requested = body.get("model")
        adapter = self.services.model.adapter_for(user.department_id)
        if requested == self.services.model.name:
            slot = None
        elif requested in (model_id(user.department_id), "hangjia"):
            slot = adapter.loaded_as if adapter else None
        else:
            raise ApiError(404, f"The model {requested!r} does not exist or you have no access to it. Yours: "
                                f"{model_id(user.department_id)}, {self.services.model.name}.", code="model_not_found")
        params = _sampling(body, self.services.settings)
        prompt_tokens = self.services.model.count_tokens(prompt)
        if prompt_tokens + params.max_new_tokens > self.services.model.max_context:
            raise ApiError(400, f"The prompt has {prompt_tokens:,} tokens; with max_tokens {params.max_new_tokens:,}"
                                f" it exceeds the context of {self.services.model.max_context:,}.",
                           code="context_length_exceeded")
        audit.record(self.services.db, user.id, user.department_id, "v1.completions", model=requested,
                     prompt_tokens=prompt_tokens)
        result = GenerationResult()
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def pieces() -> Iterator[str]:
            with self.generating:
                yield from self.services.model.stream(prompt, params, slot, result)

        def usage() -> dict[str, int]:
            return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens}

        if not body.get("stream"):
            text = await run_in_threadpool(lambda: "".join(pieces()))
            if result.error:
                raise ApiError(500, f"Generation failed: {result.error}", "server_error")
            return {"id": completion_id, "object": "text_completion", "created": created, "model": requested,
                    "choices": [{"index": 0, "text": text, "finish_reason": result.finish_reason, "logprobs": None}],
                    "usage": usage()}

        def events() -> Iterator[str]:
            def chunk(text: str, finish: str | None, **extra) -> str:
                return _sse({"id": completion_id, "object": "text_completion", "created": created, "model": requested,
                             "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                             **extra})

            for piece in pieces():
                yield chunk(piece, None)
            if result.error:
                yield _sse({"error": {"message": result.error, "type": "server_error"}})
                return
            yield chunk("", result.finish_reason, usage=usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def metrics(self, request: Request):
        """Prometheus scrape: the metrics token (--metrics-token) sees every department; an
        admin's API key their own department's series; the owner's key all (audited)."""
        token = _bearer(request)
        if self.services.settings.metrics_token and token == self.services.settings.metrics_token:
            return Response(self.services.metrics.exposition(), media_type=CONTENT_TYPE)
        try:
            user = self.services.auth.user_for_api_key(token)
        except NotAuthorized:
            user = None
        if user is None or user.role != "admin" and not user.owner:
            return ApiError(401, "Scraping needs the metrics token or an admin's API key as a Bearer token.",
                            "authentication_error").response()
        if user.owner:
            check_department(self.services.db, user, None, "read.metrics")
            return Response(self.services.metrics.exposition(), media_type=CONTENT_TYPE)
        return Response(self.services.metrics.exposition(user.department_id), media_type=CONTENT_TYPE)


def build_openai_router(services) -> APIRouter:
    """/v1 (models, chat completions, tool actions, raw completions) and /metrics."""
    handlers = OpenAIHandlers(services)
    router = APIRouter()
    router.add_api_route("/v1/models", handlers.list_models, methods=["GET"])
    router.add_api_route("/v1/chat/completions", handlers.chat_completions, methods=["POST"])
    router.add_api_route("/v1/actions/{call_id}", handlers.resolve_action, methods=["POST"])
    router.add_api_route("/v1/completions", handlers.completions, methods=["POST"])
    router.add_api_route("/metrics", handlers.metrics, methods=["GET"])
    return router


def _sampling(body: dict[str, Any], settings) -> GenerationParams:
    """The caller's sampling values within the server's limits."""
    try:
        max_tokens = int(body.get("max_tokens") or settings.max_new_tokens)
        temperature = float(body.get("temperature", settings.temperature))
        top_p = float(body.get("top_p", settings.top_p))
    except (TypeError, ValueError):
        raise ApiError(400, "max_tokens, temperature and top_p must be numbers.")
    if max_tokens < 1 or not 0 <= temperature <= 2 or not 0 < top_p <= 1:
        raise ApiError(400, "max_tokens ≥ 1, 0 ≤ temperature ≤ 2, 0 < top_p ≤ 1.")
    return GenerationParams(max_new_tokens=min(max_tokens, settings.max_new_tokens * 4),
                            temperature=temperature, top_p=top_p)
