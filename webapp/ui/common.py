"""What every handler does first: find out who is calling."""

from __future__ import annotations

import gradio as gr

from webapp.auth import NotAuthorized
from webapp.i18n import bilingual


def caller(services, request: gr.Request | None, *roles: str):
    """The logged-in user of this request, checked on the server; with roles, one of them."""
    username = getattr(request, "username", None) if request is not None else None
    try:
        if roles:
            return services.auth.require_role(username, *roles)
        return services.auth.current_user(username)
    except NotAuthorized as exc:
        raise gr.Error(f"{bilingual('not_allowed')} ({exc})")
