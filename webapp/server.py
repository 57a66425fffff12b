"""The HTTP server: the Gradio app mounted at /, the OpenAI-compatible API at /v1 and the
Prometheus endpoint at /metrics, all in one FastAPI app served by uvicorn."""

from __future__ import annotations

import contextlib
import threading
import time

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request

from webapp.app import launch_options
from webapp.openai_api import ApiError, build_openai_router
from webapp.services import Services

# Gradio runs sync handlers on anyio's thread pool; launch() would raise its size to
# max_threads, mounting does not, so the server does it at start.
MAX_THREADS = 64


def build_server(services: Services, blocks: gr.Blocks) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = MAX_THREADS
        yield

    api = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.middleware("http")(services.metrics.middleware())

    @api.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    api.include_router(build_openai_router(services))
    options = {k: v for k, v in launch_options(services).items() if k != "max_threads"}
    return gr.mount_gradio_app(api, blocks.queue(default_concurrency_limit=8), path="/", **options)


class BackgroundServer:
    """uvicorn in a thread: for tests and benchmarks that need the real server in-process."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
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
        self.server.should_exit = True
        self.thread.join(timeout=30)
