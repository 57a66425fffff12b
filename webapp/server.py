"""The HTTP server: the Gradio app mounted at /, the OpenAI-compatible API at /v1 and the
Prometheus endpoint at /metrics, all in one FastAPI app served by uvicorn."""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
import time
from typing import Any, Iterator

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Mount

from webapp.app import launch_options
from webapp.auth import LOGIN_CLIENT
from webapp.i18n import bilingual
from webapp.openai_api import ApiError, build_openai_router
from webapp.services import Services
from webapp.ui.common import FILES_KEEP_S

# Gradio runs sync handlers on anyio's thread pool; launch() would raise its size to
# max_threads, mounting does not, so the server does it at start.
MAX_THREADS = 64


def build_server(services: Services, blocks: gr.Blocks, clock=time.monotonic) -> FastAPI:
    """`clock` (seconds) times the login sessions' ends."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = MAX_THREADS
        yield

    api = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.middleware("http")(services.metrics.middleware())

    @api.middleware("http")
    async def login_client(request: Request, call_next):
        """The login check slows guessing per name and client address; Gradio's auth callback
        gets no request, so the address travels in a context variable."""
        if request.url.path.rstrip("/").endswith("/login"):
            LOGIN_CLIENT.set(request.client.host if request.client else "")
        return await call_next(request)

    @api.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    api.include_router(build_openai_router(services))
    options = {k: v for k, v in launch_options(services).items() if k != "max_threads"}
    server = gr.mount_gradio_app(api, blocks.queue(default_concurrency_limit=8), path="/", **options)
    # Gradio checks a file path a client sends (it must be one of Gradio's own uploads, never a
    # server path) only once the Blocks is marked launched; launch() marks it, mounting does not.
    # Marked here, Gradio's own check runs before anything is read or copied.
    blocks.has_launched = True
    gradio_app = next(route.app for route in server.routes if isinstance(route, Mount))
    # ...and a file uploaded by one login session is not for another one's handlers.
    server.middleware("http")(UploadLedger(gradio_app).middleware)
    expiry = SessionExpiry(gradio_app, services.settings.session_hours * 3600,
                           idle_s=services.settings.session_idle_minutes * 60 or None, clock=clock)
    server.middleware("http")(expiry.middleware)
    return server


def session_token(gradio_app, request: Request) -> str | None:
    """The Gradio login session's token of a request (its cookie), if it has one."""
    cookie_id = gradio_app.cookie_id
    return request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
        f"access-token-unsecure-{cookie_id}")


def file_paths(data: Any) -> Iterator[str]:
    """Every file path in a request's JSON: what a Gradio handler would read as a file
    (FileData dicts, with or without their meta, anywhere in the data)."""
    if isinstance(data, dict):
        if isinstance(data.get("path"), str):
            yield data["path"]
        for value in data.values():
            yield from file_paths(value)
    elif isinstance(data, list):
        for value in data:
            yield from file_paths(value)


def decoded(body: bytes, encoding: str | None) -> bytes:
    """A response body without its content encoding."""
    if encoding == "br":
        import brotli

        return brotli.decompress(body)
    if encoding == "gzip":
        return gzip.decompress(body)
    return body


class UploadLedger:
    """Which login session uploaded which file. A request to a handler may name only files
    its own session uploaded through /gradio_api/upload: another user's upload, a file the
    server wrote, or any other server path is refused before Gradio reads or copies it.
    Gradio's own check (the Blocks marked launched) then also keeps every path inside its
    upload folder."""

    UPLOAD = "/gradio_api/upload"

    def __init__(self, gradio_app, keep_s: float = FILES_KEEP_S, clock=time.monotonic):
        self.gradio_app, self.keep_s, self.clock = gradio_app, keep_s, clock
        self.owner: dict[str, tuple[str, float]] = {}  # uploaded path -> (session token, when)
        self.lock = threading.Lock()

    def _forget_old(self, now: float) -> None:
        if len(self.owner) > 1000:
            self.owner = {p: (t, at) for p, (t, at) in self.owner.items() if now - at < self.keep_s}

    async def middleware(self, request: Request, call_next):
        path, now = request.url.path, self.clock()
        token = session_token(self.gradio_app, request)
        if request.method == "POST" and path.startswith("/gradio_api/") and not path.startswith(self.UPLOAD):
            try:
                data = json.loads(await request.body() or b"null")
            except (ValueError, UnicodeDecodeError):
                data = None  # not JSON: Gradio refuses it without reading a file
            with self.lock:
                foreign = [p for p in file_paths(data)
                           if token is None or self.owner.get(p, ("", 0.0))[0] != token]
            if foreign:
                return JSONResponse({"error": bilingual("file_not_yours")}, status_code=403)
        response = await call_next(request)
        if request.method == "POST" and path.startswith(self.UPLOAD) and response.status_code == 200 and token:
            body = b"".join([chunk async for chunk in response.body_iterator])
            try:  # Gradio compresses answers over 400 bytes (brotli, or gzip for clients without it)
                uploaded = [p for p in json.loads(decoded(body, response.headers.get("content-encoding")))
                            if isinstance(p, str)]
            except (ValueError, TypeError, OSError):
                uploaded = []
            with self.lock:
                self._forget_old(now)
                self.owner.update({p: (token, now) for p in uploaded})
            return Response(body, status_code=response.status_code, headers=dict(response.headers))
        return response


class SessionExpiry:
    """Gradio's login sessions never end on their own; these end `max_age_s` after the
    login, or `idle_s` after the session's last request (a restart ends them all: Gradio
    keeps them in memory). The heartbeat stream an open page keeps is not a request of the
    user's: a tab left open on an unattended screen still ends."""

    PASSIVE = ("/gradio_api/heartbeat/",)  # requests that do not show a person is there

    def __init__(self, gradio_app, max_age_s: float, idle_s: float | None = None, clock=time.monotonic):
        self.gradio_app, self.max_age_s, self.idle_s, self.clock = gradio_app, max_age_s, idle_s, clock
        self.started: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}

    async def middleware(self, request: Request, call_next):
        now = self.clock()
        token = session_token(self.gradio_app, request)
        if token and token in self.gradio_app.tokens:
            too_old = now - self.started.setdefault(token, now) > self.max_age_s
            idle = self.idle_s is not None and now - self.last_seen.setdefault(token, now) > self.idle_s
            if too_old or idle:
                self.gradio_app.tokens.pop(token, None)  # Gradio now sees no login: back to the login page
                self.started.pop(token, None)
                self.last_seen.pop(token, None)
            elif not request.url.path.startswith(self.PASSIVE):
                self.last_seen[token] = now
        response = await call_next(request)
        if request.method == "POST" and request.url.path.rstrip("/").endswith("/login") \
                and response.status_code == 200:
            prefix = f"access-token-{self.gradio_app.cookie_id}="
            for name, value in response.raw_headers:
                if name == b"set-cookie" and value.decode("latin-1").startswith(prefix):
                    token = value.decode("latin-1")[len(prefix):].split(";", 1)[0]
                    self.started[token] = self.last_seen[token] = now
        if len(self.started) > 4 * len(self.gradio_app.tokens) + 100:  # forget logged-out sessions
            self.started = {t: at for t, at in self.started.items() if t in self.gradio_app.tokens}
            self.last_seen = {t: at for t, at in self.last_seen.items() if t in self.gradio_app.tokens}
        return response


class BackgroundServer:
    """uvicorn in a thread: for tests and benchmarks that need the real server in-process."""

    def __init__(self, app: FastAPI, host: str, port: int):
        # Gradio's event streams stay open: without a limit, stopping waits for every browser
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")

    def start(self, timeout: float = 60) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        # nobody waits on an in-process server's open event streams: close them at once
        self.server.should_exit = self.server.force_exit = True
        self.thread.join(timeout=30)
