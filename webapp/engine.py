"""The chat of one app, built from its services: the turns it runs (webapp/turn.py) and the
conversations they are stored in (webapp/conversations.py), sharing one database and cache."""

from __future__ import annotations

from storage.db import Database
from webapp.conversations import Conversations
from webapp.models import ModelService
from webapp.tools.executor import ToolExecutor
from webapp.turn import TurnRunner, TurnSettings


class ChatEngine:
    def __init__(self, db: Database, model: ModelService, settings: TurnSettings,
                 executor: ToolExecutor | None = None, knowledge=None, cache=None, metrics=None):
        self.conversations = Conversations(db, model.name, settings.max_message_chars, cache)
        self.turns = TurnRunner(db, model, settings, self.conversations, executor, knowledge, cache, metrics)
