"""What one turn's prompt holds within the model's context window: the system message, the
passages and attachments with the question, and as much recent history as fits. Oldest
exchanges drop first; an attachment is cut to its passages only when it cannot fit whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.chat_format import with_passages
from webapp.conversations import UserInputError
from webapp.i18n import bilingual
from webapp.knowledge.attachments import select_passages, whole_block
from webapp.knowledge.parsing import DocumentError, parse_bytes


def drop_oldest_exchange(messages: list[dict]) -> list[dict]:
    """Messages without the oldest user message and everything up to the next one."""
    for index in range(1, len(messages)):
        if messages[index]["role"] == "user":
            return messages[index:]
    return messages[1:] if len(messages) > 1 else []


@dataclass(frozen=True)
class ContextWindow:
    """The window of `model` with the turn's settings (webapp.turn.TurnSettings): what is
    left for the prompt once the answer's tokens are set aside."""

    model: Any  # webapp.models.ModelService or webapp.remote_model.RemoteModel
    settings: Any

    @property
    def budget(self) -> int:
        return self.model.max_context - self.settings.generation.max_new_tokens

    def render(self, messages: list[dict], tools: list[dict]) -> str:
        return self.model.render_prompt(messages, tools, self.settings.thinking)

    def passages_that_fit(self, system: dict[str, str], text: str, tools: list[dict],
                          passages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The retrieved passages, weakest dropped first, that fit three quarters of what the
        system prompt and the question leave of the window: the rest stays for the tool
        rounds (history and attachments give way first, fit and attachments)."""
        def tokens(chosen: list[dict[str, Any]]) -> int:
            return self.model.count_tokens(self.render(
                [system, *with_passages([{"role": "user", "content": text}], chosen)], tools))

        fixed = tokens([])
        kept = list(passages)
        while kept and tokens(kept) > fixed + 3 * (self.budget - fixed) // 4:
            kept.pop()
        return kept

    def fit(self, system: dict[str, str], history: list[dict], text: str, tools: list[dict],
            passages: list[dict[str, Any]]) -> str:
        """System + as much recent history as fits + the new message with its passages;
        UserInputError when the message alone does not fit."""
        user_message = with_passages([{"role": "user", "content": text}], passages)[0]
        past = list(history)
        while True:
            prompt = self.render([system, *past, user_message], tools)
            tokens = self.model.count_tokens(prompt)
            if tokens <= self.budget:
                return prompt
            if not past:
                raise UserInputError(
                    "context_overflow",
                    f"The message is about {tokens:,} tokens; this model reads at most {self.budget:,} per turn "
                    f"(context {self.model.max_context:,} minus {self.settings.generation.max_new_tokens:,} "
                    "for the answer). Shorten it.",
                    tokens=tokens, budget=self.budget,
                )
            past = drop_oldest_exchange(past)

    def trim(self, system: dict[str, str], history: list[dict], tools: list[dict]) -> list[dict]:
        """Drop the oldest exchanges until the prompt fits (tool rounds make it grow)."""
        past = list(history)
        # never drop the exchange in progress (its user message and tool results)
        while sum(m["role"] == "user" for m in past) > 1:
            if self.model.count_tokens(self.render([system, *past], tools)) <= self.budget:
                break
            past = drop_oldest_exchange(past)
        return past

    def attachments(self, attachments: list[tuple[str, bytes]], text: str, tools: list[dict],
                    system: dict[str, str], passages: list[dict[str, Any]], embedder=None) -> list[dict[str, Any]]:
        """Each attachment (name, bytes) as the model will get it: whole, or passages within what
        is left of the window after the question (history is dropped before an attachment is cut);
        `embedder` is the knowledge base's, or None when it is turned off."""
        if not attachments:
            return []
        question = self.render([system, *with_passages([{"role": "user", "content": text}], passages)], tools)
        left = self.budget - self.model.count_tokens(question) - 8  # the blank lines joining the blocks
        prepared = []
        for name, data in attachments:
            try:
                parsed = parse_bytes(data, name)
            except DocumentError as exc:
                raise UserInputError("attachment_unreadable", str(exc), reason=str(exc)) from exc
            block = whole_block(parsed.source_name, parsed.text)
            tokens = self.model.count_tokens(block)
            if tokens <= left:
                mode, prompt_text = "whole", block
                notice = bilingual("attachment_whole", name=parsed.source_name, tokens=tokens)
            else:
                selection = select_passages(parsed.source_name, parsed.text, text, embedder,
                                            self.model.count_tokens, max(left, 0))
                mode, prompt_text = "passages", selection.prompt_text
                notice = bilingual("attachment_" + selection.mode, name=parsed.source_name, tokens=tokens,
                                   budget=max(left, 0), passages=selection.passages, total=selection.total_passages)
                tokens = self.model.count_tokens(prompt_text)
            left -= tokens
            prepared.append({"filename": parsed.source_name, "chars": parsed.chars, "tokens": tokens,
                             "mode": mode, "prompt_text": prompt_text, "notice": notice})
        return prepared
