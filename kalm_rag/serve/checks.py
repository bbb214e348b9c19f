"""The request checks that depend on the server's limits (the schemas check types): each refusal names its field.

Text is bounded in characters before anything is tokenised (the tokenizer runs on the only model worker, so an
8 MB query must be refused here, not cut there); a lone surrogate anywhere in a body is refused, because no
tokenizer, store key or JSON answer can carry it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from kalm_rag.engine import Reranker, ScoreRequest
from kalm_rag.errors import InvalidInputError
from kalm_rag.evidence import check_mass
from kalm_rag.serve.errors import ApiError
from kalm_rag.serve.schemas import CohereDocument, Extensions
from kalm_rag.validation import check_ratio, check_unicode


def refuse_surrogates(body: BaseModel) -> None:
    """422 naming the first field (or object key) of ``body`` that holds a lone surrogate."""
    where = _first_surrogate(body.model_dump(exclude_unset=True), "")
    if where is not None:
        field, text = where
        try:
            check_unicode(text, field)
        except InvalidInputError as exc:
            raise ApiError(422, str(exc), field=field) from None


def _first_surrogate(value: Any, path: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        try:
            check_unicode(value, path)
        except InvalidInputError:
            return path, value
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            found = _first_surrogate(key, inner) or _first_surrogate(item, inner)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _first_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


class RequestChecks:
    """The server's limits on a request: document count and length, query and instruction length, ``top_n``."""

    def __init__(self, *, max_documents: int, max_document_chars: int, max_query_chars: int) -> None:
        self.max_documents = max_documents
        self.max_document_chars = max_document_chars
        self.max_query_chars = max_query_chars

    def texts_of(
        self, documents: Sequence[str | CohereDocument], field: str, rank_fields: Sequence[str] | None = None
    ) -> list[str]:
        """The text scored for each document, with the count and length limits checked (``[]`` for no documents)."""
        if len(documents) > self.max_documents:
            raise ApiError(
                413,
                f"{field} has {len(documents)} entries; this server takes at most {self.max_documents}",
                field=field,
                error_type="payload_too_large",
            )
        texts = []
        for i, doc in enumerate(documents):
            text, where = _text_of(doc, f"{field}[{i}]", rank_fields)
            self._bound(text, where, self.max_document_chars)
            if not text.strip():
                raise ApiError(422, f"{where} is empty", field=where)
            texts.append(text)
        return texts

    def top_n(self, value: int | None, field: str = "top_n") -> int | None:
        """``value`` if it is in ``1..max_documents`` (or ``None``: all)."""
        if value is None:
            return None
        if value < 1 or value > self.max_documents:
            raise ApiError(422, f"{field} must be in 1..{self.max_documents}, got {value}", field=field)
        return value

    @staticmethod
    def prune_mass(value: float | None, field: str = "prune_mass") -> float | None:
        """``value`` if it is a share of evidence in (0, 1] (or ``None``: no pruning), else 422 naming ``field``."""
        if value is None:
            return None
        try:
            return check_mass(value, field)
        except InvalidInputError as exc:
            raise ApiError(422, str(exc), field=field) from None

    def prompt(self, query: str, ext: Extensions) -> None:
        """Query and instructions: bounded like documents (413), not empty (422)."""
        self._bound(query, "query", self.max_query_chars)
        if not query.strip():
            raise ApiError(422, "query is empty", field="query")
        for name in ("instruction", "system_instruction"):
            value = getattr(ext, name)
            if value is not None:
                self._bound(value, name, self.max_query_chars)
                if not value.strip():
                    raise ApiError(422, f"{name} is empty", field=name)

    def score_request(self, reranker: Reranker, query: str, texts: list[str], ext: Extensions) -> ScoreRequest:
        """The engine request, every option checked here so that a bad value is named in the answer."""
        self.prompt(query, ext)
        if ext.ratio is not None:
            try:
                check_ratio(ext.ratio)
            except InvalidInputError as exc:
                raise ApiError(422, str(exc), field="ratio") from None
            if ext.ratio % reranker.base_ratio:
                raise ApiError(
                    422,
                    f"ratio must be a multiple of the store's base ratio {reranker.base_ratio}, got {ext.ratio}",
                    field="ratio",
                )
        return ScoreRequest(
            query, texts, instruction=ext.instruction, system_instruction=ext.system_instruction, ratio=ext.ratio
        )

    @staticmethod
    def _bound(text: str, field: str, limit: int) -> None:
        if len(text) > limit:
            raise ApiError(
                413,
                f"{field} has {len(text)} characters; this server takes at most {limit}",
                field=field,
                error_type="payload_too_large",
            )


def _text_of(doc: str | CohereDocument, where: str, rank_fields: Sequence[str] | None) -> tuple[str, str]:
    """The text scored for one document, and the field to name when it is refused."""
    if isinstance(doc, str):
        return doc, where
    if rank_fields:
        values = doc.model_dump()
        missing = [f for f in rank_fields if values.get(f) is None]
        if len(missing) == len(rank_fields):
            raise ApiError(422, f"{where} has none of the rank_fields {list(rank_fields)}", field=where)
        return "\n".join(f"{f}: {values[f]}" for f in rank_fields if values.get(f) is not None), where
    if doc.text is None:
        raise ApiError(422, f"{where}.text is required (or send the document as a string)", field=f"{where}.text")
    return doc.text, f"{where}.text"
