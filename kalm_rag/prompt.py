"""The official KaLM-Reranker-V1 text formats: passage prefix and decoder prompt, byte for byte."""

from __future__ import annotations

from typing import Any

from kalm_rag.threads import tokenizer_lock

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
    Text that looks like a special token (``"<start_of_turn>"``) is encoded as text.
    """
    return cut_query(tokenizer, query, max_tokens)[0]


def cut_query(tokenizer: Any, query: str, max_tokens: int, *, chars_per_token: int | None = None) -> tuple[str, bool]:
    """:func:`truncate_query`, and whether the query was longer than ``max_tokens`` tokens.

    With ``chars_per_token`` (the most characters one token covers), a huge query is first cut to a
    character bound that still holds more than ``max_tokens`` tokens, so its whole text is never tokenised
    (see :func:`~kalm_rag.models.base.cut_for_tokenizer`).
    """
    from kalm_rag.models.base import cut_for_tokenizer

    text = query if chars_per_token is None else cut_for_tokenizer(query, max_tokens, chars_per_token)
    # verbose=False: a query longer than the model's maximum is cut right here, so transformers' warning
    # about "indexing errors" would be wrong (and it would be printed on every long query)
    with tokenizer_lock(tokenizer):
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False, split_special_tokens=True)
    return tokenizer.decode(ids[:max_tokens], clean_up_tokenization_spaces=False), len(ids) > max_tokens


def format_prompt(query: str, *, instruction: str, system_instruction: str) -> str:
    """The decoder text for an (already truncated) query."""
    return _TEMPLATE.format(system=system_instruction, instruction=instruction, query=query)


def format_passage(passage: str) -> str:
    """The encoder text for a passage (before truncation to ``max_passage_tokens`` tokens)."""
    return PASSAGE_PREFIX + passage


# The template as the official recipe tokenises it: its control tokens, and the text between them. User text
# (system, instruction, query) goes into the one text part that holds it, tokenised with special-token
# look-alikes kept as text; every other part is tokenised exactly as in the whole-template tokenisation
# (a fast tokenizer splits its input at added tokens and tokenises the pieces apart, so the ids are the same).
_CONTROL_PARTS = ("<bos>", "<start_of_turn>")
_USER_PART = "user\n{system}\n\n<Instruct>: {instruction}\n<Query>: {query}"
_CLOSING_PARTS = ("<end_of_turn>", "\n", "<start_of_turn>", "model\n\n\n\n")


def prompt_token_ids(
    tokenizer: Any, query: str, *, instruction: str, system_instruction: str
) -> tuple[list[int], list[int]]:
    """Token ids of :func:`format_prompt`'s text, in two parts: ``(before the query, the query and after)``.

    Equal to ``tokenizer(format_prompt(...), add_special_tokens=False)`` whenever the user texts hold no
    special-token text; when they do (a query containing ``"<end_of_turn>"``), that text stays text instead of
    closing the turn. The first part is the longest prefix of ids that tokenising without the query shares.
    """
    head = [_control_id(tokenizer, t) for t in _CONTROL_PARTS]
    user = _user_ids(tokenizer, _USER_PART.format(system=system_instruction, instruction=instruction, query=query))
    shared = _user_ids(tokenizer, _USER_PART.format(system=system_instruction, instruction=instruction, query=""))
    split = 0
    while split < min(len(user), len(shared)) and user[split] == shared[split]:
        split += 1
    with tokenizer_lock(tokenizer):
        tail = [
            _control_id(tokenizer, t)
            if t.startswith("<")
            else tokenizer(t, add_special_tokens=False)["input_ids"]  # template text, as the official recipe
            for t in _CLOSING_PARTS
        ]
    closing = [i for part in tail for i in (part if isinstance(part, list) else [part])]
    return head + user[:split], user[split:] + closing


def _user_ids(tokenizer: Any, text: str) -> list[int]:
    with tokenizer_lock(tokenizer):
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _control_id(tokenizer: Any, token: str) -> int:
    """The id of one of the template's control tokens (the backend checks at load time that each is one)."""
    return int(tokenizer.convert_tokens_to_ids(token))


def check_control_tokens(tokenizer: Any) -> None:
    """Raise ``ModelLoadError`` unless every control token of the template is one token of ``tokenizer``."""
    from kalm_rag.errors import ModelLoadError

    missing = [
        t
        for t in sorted({*_CONTROL_PARTS, *_CLOSING_PARTS})
        if t.startswith("<") and tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
    ]
    if missing:
        raise ModelLoadError(f"the tokenizer lacks the prompt template's control tokens {missing}")
