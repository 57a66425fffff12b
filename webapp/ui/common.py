"""What every handler does first: find out who is calling; and where the files a user
uploads or downloads go, and for how long."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr

from storage import accounts
from webapp.auth import NotAuthorized, check_department
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


log = logging.getLogger(__name__)


def user_error(fn_name: str, exc: Exception) -> gr.Error:
    """What a user sees of an unexpected error: what happened and a reference; the details
    (the Python error and its traceback) go to the server's log under that reference."""
    reference = secrets.token_hex(3)
    log.error("handler %s failed (ref %s)", fn_name, reference, exc_info=exc)
    code = "input_invalid" if isinstance(exc, (ValueError, TypeError, KeyError, IndexError)) else "server_error"
    return gr.Error(bilingual(code, ref=reference))


def guarded(fn):
    """`fn` with every error but gr.Error turned into a clear message (see user_error);
    generators stay generators, so Gradio streams them as before."""
    name = getattr(fn, "__qualname__", repr(fn))
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise user_error(name, exc) from None
        return stream
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return fn  # the app registers none; Gradio's own wrappers would need their own guard

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise user_error(name, exc) from None
    return call


def guard_handlers(blocks: gr.Blocks) -> None:
    """Every server function of the app, guarded: users never see a Python error."""
    for block_fn in blocks.fns.values():
        if block_fn.fn is not None:
            block_fn.fn = guarded(block_fn.fn)


def department_scope(services, user, action: str) -> str | None:
    """The department whose data a staff user's screen shows: their own; for the owner every
    department (None), and that look is audited."""
    if not user.owner:
        return user.department_id
    check_department(services.db, user, None, action)
    return None


def in_department(services, user, department_id: str | None, action: str) -> str:
    """`department_id` if the user may act on it (their own; the owner any, audited)."""
    if not department_id:
        raise gr.Error("Choose a department. 请选择部门。")
    try:
        check_department(services.db, user, department_id, action)
    except NotAuthorized as exc:
        raise gr.Error(f"{bilingual('not_allowed')} ({exc})")
    return department_id


def department_choices(services, user) -> list[str]:
    """The departments a staff user may pick: their own; the owner all."""
    return [d.id for d in accounts.list_departments(services.db)] if user.owner else [user.department_id]


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


def on_open(tab, button, fn, inputs, outputs):
    """`fn` fills `outputs` when the tab is opened and again when `button` is pressed: a
    screen shows its data without a click. Returns the event, for what follows it (.then)."""
    import gradio as gr

    triggers = [button.click] + ([tab.select] if tab is not None else [])
    return gr.on(triggers, fn, inputs, outputs, api_visibility="private")
