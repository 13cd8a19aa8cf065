"""How a document and a query become token ids: the document is a fixed prefix, the query a suffix.

With a chat template (when the tokenizer has one and it is not turned off), one user turn holds
``document + "\\n\\n" + query``; the rendered text is split right after the document, so the prefix
(template start + document) is the same for every query and is what the pool compresses. Without a
template the prefix is the tokenized document (with the tokenizer's special tokens, e.g. BOS) and
the suffix is ``"\\n\\n" + query + "\\n"``.

Prefix and suffix are tokenized separately; the full-precision baseline uses the very same ids,
so the comparison is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PromptFormat", "SEPARATOR"]

SEPARATOR = "\n\n"
_PLACEHOLDER_QUERY = "?"


@dataclass(frozen=True)
class PromptFormat:
    """The rendered prefix text of one document.

    ``prefix_text[document_start:]`` is the document itself; ``chat`` says whether a chat
    template rendered the text before it.
    """

    prefix_text: str
    document_start: int
    chat: bool

    @classmethod
    def build(cls, tokenizer: Any, document: str, chat_template: bool | None) -> PromptFormat:
        """``chat_template=None`` uses the tokenizer's chat template when it has one."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        use_chat = has_template if chat_template is None else bool(chat_template)
        if use_chat and not has_template:
            raise ValueError(
                f"chat_template=True but tokenizer {type(tokenizer).__name__} has no chat "
                "template: pass chat_template=None (auto) or False."
            )
        if not use_chat:
            return cls(prefix_text=document, document_start=0, chat=False)
        rendered = _render(tokenizer, document, _PLACEHOLDER_QUERY)
        start = rendered.find(document + SEPARATOR + _PLACEHOLDER_QUERY)
        if start < 0:
            raise ValueError(
                "the tokenizer's chat template changed the document text (e.g. stripped "
                "whitespace), so the document cannot be a shared prefix: strip the document "
                "yourself, or pass chat_template=False."
            )
        return cls(prefix_text=rendered[: start + len(document)], document_start=start, chat=True)

    def prefix_ids(self, tokenizer: Any) -> list[int]:
        """Token ids of the prefix (compressed once into the pool)."""
        ids = tokenizer(self.prefix_text, add_special_tokens=not self.chat)["input_ids"]
        return [int(i) for i in ids]

    def suffix_ids(self, tokenizer: Any, query: str) -> list[int]:
        """Token ids of the query part that follows the prefix (at least one token)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}.")
        if self.chat:
            document = self.prefix_text[self.document_start :]
            rendered = _render(tokenizer, document, query)
            if not rendered.startswith(self.prefix_text):
                raise ValueError(
                    "the tokenizer's chat template renders the document differently for query "
                    f"{query[:40]!r} than when the pool was built, so the compressed prefix "
                    "cannot be reused: build the pool with chat_template=False."
                )
            text = rendered[len(self.prefix_text) :]
        else:
            text = SEPARATOR + query + "\n"
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _render(tokenizer: Any, document: str, query: str) -> str:
    messages = [{"role": "user", "content": document + SEPARATOR + query}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected a str.")
    return text
