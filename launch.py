"""Start hangjia: settings -> storage -> model -> app. The only place that launches.

    python launch.py --demo                 # embedded model, demo company, http://127.0.0.1:7860
    python launch.py --model Qwen/Qwen3-14B --load-in-4bit --host 0.0.0.0
    python launch.py --help                 # every setting; also HANGJIA_* env vars and --config FILE
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    # Company data stays in the company: no usage analytics sent to Gradio's servers.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from webapp.settings import (
        SettingsError,
        build_parser,
        load_settings,
        settings_markdown_table,
    )

    argv = sys.argv[1:] if argv is None else argv
    if "--settings-table" in argv:
        print(settings_markdown_table())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        build_parser().print_usage(sys.stderr)
        print(exc, file=sys.stderr)
        return 2

    from storage import StorageError
    from webapp.app import build_app
    from webapp.models import ModelLoadError
    from webapp.server import build_server
    from webapp.services import open_services
    from webapp.tools.registry import ToolConfigError

    try:
        services = open_services(settings)
    except (StorageError, ModelLoadError, ToolConfigError) as exc:
        print(f"hangjia cannot start: {exc}", file=sys.stderr)
        return 1
    if services.first_admin_password:
        print(
            "\n  First start: created user 'admin' with password "
            f"{services.first_admin_password}\n  It is shown only this once; change it after logging in.\n",
            flush=True,
        )
    if settings.scheduler:
        services.nightly.start()
    import uvicorn

    server = build_server(services, build_app(services))
    print(f"\n  hangjia: http://{settings.host}:{settings.port}/  ·  OpenAI-compatible API: "
          f"http://{settings.host}:{settings.port}/v1\n", flush=True)
    try:
        # open event streams (browsers, clients) must not hold a stop forever
        uvicorn.run(server, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5,
                    proxy_headers=bool(settings.forwarded_allow_ips), forwarded_allow_ips=settings.forwarded_allow_ips or None)
    finally:
        services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
