"""search_knowledge_base: the model asks for more passages during a turn. The caller's
department comes from the server's user row, never from the model's arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from storage import knowledge as knowledge_store
from webapp.tools.executor import ToolContext

KNOWLEDGE_TOOLS_FILE = Path(__file__).parent.parent / "tools" / "knowledge_tools.toml"


def knowledge_builtins(knowledge) -> dict[str, Callable[[dict[str, Any], ToolContext], Any]]:
    def search_knowledge_base(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        hits = knowledge.search(ctx.user.department_id, args["query"], int(args.get("top_k", 4)))
        if ctx.message_id is not None:
            knowledge_store.log_retrievals(ctx.db, ctx.message_id, "tool", [h.as_dict() for h in hits])
        if not hits:
            return {"passages": [], "note": "No document you may read matches this query."}
        return {"passages": [
            {"n": n, "title": h.title, "location": h.location, "text": h.text, "score": round(h.score, 4)}
            for n, h in enumerate(hits, 1)]}

    return {"search_knowledge_base": search_knowledge_base}
