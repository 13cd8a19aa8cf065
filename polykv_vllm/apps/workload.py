"""The multi-agent workload the demo, the tests and the benchmarks share: real documents, one
question per agent, and the prompt that puts the document first (so it is a shared prefix).

Documents are Python's own ``pydoc_data.topics`` (English documentation not written by this
project), topics in sorted order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = [
    "DOC_HEADER",
    "QUESTIONS",
    "agent_question",
    "corpus_text",
    "make_prompt",
    "split_documents",
    "token_documents",
]

QUESTIONS = (
    "Summarize the document above in one sentence.",
    "List three technical terms defined in the document above.",
    "What is the main topic of the document above? Answer in a few words.",
    "Give one example of Python code related to the document above.",
    "Which Python keyword is discussed first in the document above?",
    "Name one common mistake the document above warns about.",
    "Explain the document above to a beginner in two sentences.",
    "What question would a student ask after reading the document above?",
)
DOC_HEADER = "Read the following Python documentation.\n\n"


def agent_question(agent: int) -> str:
    """A distinct question for every agent index (cycles the list with a numbered variant)."""
    base = QUESTIONS[agent % len(QUESTIONS)]
    cycle = agent // len(QUESTIONS)
    return base if cycle == 0 else f"(Variant {cycle + 1}) {base}"


def make_prompt(document: str, question: str) -> str:
    """The user message: the shared document first, the agent's question last."""
    return f"{DOC_HEADER}{document}\n\nQuestion: {question}"


def corpus_text() -> str:
    """Real English text: Python's ``pydoc_data.topics``, topics in sorted order (~465K chars)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def split_documents(token_ids: Sequence[int], documents: int, tokens: int) -> list[list[int]]:
    """Cut ``documents`` consecutive, disjoint windows of ``tokens`` ids out of ``token_ids``."""
    need = documents * tokens
    if len(token_ids) < need:
        raise ValueError(
            f"corpus has {len(token_ids)} tokens, {documents} documents x {tokens} tokens need "
            f"{need}; lower --documents or --doc-tokens"
        )
    return [list(token_ids[i * tokens : (i + 1) * tokens]) for i in range(documents)]


def token_documents(
    tokenize: Callable[[str], list[int]], n: int, tokens: int, skip: int = 0
) -> list[list[int]]:
    """``n`` distinct documents of exactly ``tokens`` token ids each: topics (after the first
    ``skip``) tokenized one by one with ``tokenize`` and concatenated until long enough."""
    from pydoc_data.topics import topics

    out: list[list[int]] = []
    buf: list[int] = []
    for name in sorted(topics)[skip:]:
        buf += tokenize(topics[name])
        if len(buf) >= tokens:
            out.append(buf[:tokens])
            buf = []
            if len(out) == n:
                return out
    raise ValueError(f"not enough text for {n} documents of {tokens} tokens; lower one of them")
