"""HTTP tools: a company system reached through a URL template, defined in a TOML file."""

from __future__ import annotations

import re
import string
from typing import Any, Callable
from urllib.parse import quote

import httpx

from webapp.tools.executor import ToolUserError, TransientToolError

_BODY_METHODS = ("POST", "PUT", "PATCH")


def make_http_runner(method: str, url_template: str, headers: dict[str, str]) -> Callable[[dict, Any], Any]:
    """A tool runner that fills `{param}` placeholders (URL-encoded, so an argument cannot
    change the path), sends the other arguments as query or JSON body, and maps failures:
    timeouts, connection errors, 429 and 5xx are transient (retried); other 4xx are not."""
    placeholders = {field for _, field, _, _ in string.Formatter().parse(url_template) if field}

    def run(arguments: dict[str, Any], context: Any) -> Any:
        missing = placeholders - set(arguments)
        if missing:
            raise ToolUserError(f"the URL needs {', '.join(sorted(missing))}.")
        url = re.sub(r"\{(\w+)\}", lambda m: quote(str(arguments[m.group(1)]), safe=""), url_template)
        rest = {k: v for k, v in arguments.items() if k not in placeholders}
        request: dict[str, Any] = {"headers": {**headers, "X-Hangjia-User": context.user.username}}
        if method in _BODY_METHODS:
            request["json"] = rest
        else:
            request["params"] = {k: v if isinstance(v, (str, int, float)) else str(v) for k, v in rest.items()}
        try:
            # the executor enforces the tool's timeout; this one only frees the socket
            response = httpx.request(method, url, timeout=60, follow_redirects=False, **request)
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"{method} {url} timed out") from exc
        except httpx.TransportError as exc:
            raise TransientToolError(f"{method} {url} could not be reached: {exc}") from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientToolError(f"{method} {url} answered {response.status_code}")
        if response.status_code >= 400:
            raise ToolUserError(f"{method} {url} answered {response.status_code}: {response.text[:300]}")
        if "json" in response.headers.get("content-type", ""):
            return response.json()
        return response.text

    return run
