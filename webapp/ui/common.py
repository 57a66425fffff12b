"""What every handler does first: find out who is calling; and where the files a user
uploads or downloads go, and for how long."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

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


# Uploads and downloads are for the request at hand: the bytes go into the database or the
# knowledge base, and a download link is used within minutes. Gradio keeps its copies in its
# temp folder until told otherwise; this is how long they stay, and how often that is checked.
FILES_KEEP_S = 3600
FILES_CHECK_S = 600


def download_path(filename: str, keep_s: float = FILES_KEEP_S) -> Path:
    """A new path, in a folder only this OS user can read, for a file a user is about to
    download (exported conversations, training samples). Gradio serves its own copy; the
    files written here go once older than `keep_s`, so exports do not pile up in /tmp."""
    folder = Path(tempfile.gettempdir()) / f"hangjia-downloads-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    cutoff = time.time() - keep_s
    for old in folder.iterdir():
        try:
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # another export pruned it first
            pass
    return Path(tempfile.mkdtemp(dir=folder)) / filename
