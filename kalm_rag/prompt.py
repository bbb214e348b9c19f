"""The official KaLM-Reranker-V1 text formats: passage prefix and decoder prompt, byte for byte."""

from __future__ import annotations

from typing import Any

PASSAGE_PREFIX = "<Document>: "
DEFAULT_SYSTEM_INSTRUCTION = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a query, retrieve documents that answer the query."

# The last line is "model" followed by four newlines; "<bos>" is tokenised as the BOS token.
_TEMPLATE = (
    "<bos><start_of_turn>user\n"
    "{system}\n\n"
    "<Instruct>: {instruction}\n"
    "<Query>: {query}<end_of_turn>\n"
    "<start_of_turn>model\n\n\n\n"
)


def truncate_query(tokenizer: Any, query: str, max_tokens: int) -> str:
    """Cut ``query`` to its first ``max_tokens`` tokens as the official recipe does.

    The query is encoded without special tokens, cut, and decoded back without cleaning spaces
    (always, so that the text placed in the template is the tokenizer's round trip of the query).
    """
    # verbose=False: a query longer than the model's maximum is cut right here, so transformers' warning
    # about "indexing errors" would be wrong (and it would be printed on every long query)
    ids = tokenizer.encode(query, add_special_tokens=False, verbose=False)[:max_tokens]
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def format_prompt(query: str, *, instruction: str, system_instruction: str) -> str:
    """The decoder text for an (already truncated) query."""
    return _TEMPLATE.format(system=system_instruction, instruction=instruction, query=query)


def format_passage(passage: str) -> str:
    """The encoder text for a passage (before truncation to ``max_passage_tokens`` tokens)."""
    return PASSAGE_PREFIX + passage
