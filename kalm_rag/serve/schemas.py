"""Request and response bodies of the service: the Cohere v1/v2 (also Jina's) and TEI rerank shapes, encode.

Field names and meanings follow the APIs the clients were written for; kalm-rag's own options
(``instruction``, ``ratio``, ``system_instruction``) are extra fields that those clients never send.
Unknown fields are ignored, as the hosted APIs do. Limits that depend on the server's settings (document
count, document length, ``top_n``) are checked by the app, which names the field in its 4xx answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Extensions(_Request):
    """kalm-rag's own per-request options (every shape accepts them)."""

    instruction: str | None = Field(default=None, description="Task instruction (default: the server's).")
    system_instruction: str | None = Field(
        default=None, description="System instruction, the prompt's first line (default: the server's)."
    )
    ratio: int | None = Field(
        default=None, description="MEP pooling ratio 1..32, a multiple of the store's base ratio (default: --ratio)."
    )


class CohereDocument(BaseModel):
    """A document object: ``text`` is what is scored (v1: the fields named by ``rank_fields``); other fields
    are returned as given when ``return_documents`` is true.
    """

    model_config = ConfigDict(extra="allow")

    text: str | None = None


class CohereRerankRequest(Extensions):
    """``POST /v1/rerank`` and ``POST /v2/rerank`` (Cohere; Jina's client sends the same)."""

    model: str | None = Field(default=None, description="Accepted and ignored: the server serves one model.")
    query: str
    documents: list[str | CohereDocument] = Field(description="Strings, or objects with a text field.")
    top_n: int | None = Field(default=None, description="Return the best N (default: all).")
    return_documents: bool | None = Field(
        default=None, description="Include each document in the results (default: false)."
    )
    max_tokens_per_doc: int | None = Field(
        default=None,
        description="Accepted when >= the server's passage token limit (documents are cut at that limit); "
        "smaller values are refused: stored passage encodings are made at the server's limit.",
    )
    rank_fields: list[str] | None = Field(
        default=None, description="v1: score these fields of document objects, one 'field: value' line each."
    )
    return_evidence: bool | None = Field(
        default=None,
        description="kalm-rag extension: add to each result the sentences that made the document relevant "
        "(character spans into its text, best first).",
    )
    prune_mass: float | None = Field(
        default=None,
        description="kalm-rag extension, in (0, 1]: add to each result pruned_text, the document's text cut to its "
        "best sentences holding this share of its evidence (in their original order), and evidence, the kept "
        "sentences as spans into its text, best first.",
    )


class CohereDocumentOut(BaseModel):
    """The document of a result, as it was sent (``{"text": ...}`` for a string)."""

    model_config = ConfigDict(extra="allow")

    text: str | None = None


class EvidenceSpanOut(BaseModel):
    """One sentence of a document: ``text[start:end]``, and how much it made the document relevant."""

    start: int
    end: int
    score: float


class CohereResult(BaseModel):
    """One ranked document."""

    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="P(yes) in [0, 1].")
    document: CohereDocumentOut | None = None
    evidence: list[EvidenceSpanOut] | None = Field(
        default=None,
        description="With return_evidence: the document's sentences as spans, best first; with prune_mass: the "
        "kept sentences.",
    )
    pruned_text: str | None = Field(
        default=None, description="With prune_mass: the document's best sentences, in their original order."
    )


class ApiVersion(BaseModel):
    """Which API shape answered."""

    version: str


class CohereMeta(BaseModel):
    """Response metadata (Cohere's ``meta``, plus the model and ratio that scored)."""

    api_version: ApiVersion
    model: str
    ratio: int


class CohereRerankResponse(BaseModel):
    """Results best first, cut to ``top_n``."""

    id: str
    results: list[CohereResult]
    meta: CohereMeta


class TEIRerankRequest(Extensions):
    """``POST /rerank`` (Hugging Face text-embeddings-inference)."""

    query: str
    texts: list[str]
    raw_scores: bool = Field(default=False, description="Scores are margins z_yes - z_no instead of P(yes).")
    return_text: bool = Field(default=False, description="Include each text in the results.")
    truncate: bool | None = Field(
        default=None,
        description="true or absent: texts longer than the server's passage limit are cut to it; false: such "
        "texts are refused (422).",
    )
    truncation_direction: Literal["right", "Right"] = Field(
        default="Right", description="Only right truncation (the end of a text is cut)."
    )


class TEIResult(BaseModel):
    """One ranked text."""

    index: int
    score: float
    text: str | None = None


class EncodeRequest(_Request):
    """``POST /v1/encode``: pre-encode documents into the shared store (the indexing side)."""

    model: str | None = Field(default=None, description="Accepted and ignored.")
    documents: list[str | CohereDocument] = Field(description="Strings, or objects with a text field.")


class EncodeResponse(BaseModel):
    """What was encoded."""

    documents: int = Field(description="Documents in the request.")
    distinct: int = Field(description="Distinct texts among them.")
    encoded: int = Field(description="Texts run through the encoder and stored now.")
    already_present: int = Field(description="Texts that were already in the store.")
    namespace: str = Field(description="The store namespace the encodings live under (model + settings).")


class Health(BaseModel):
    """``GET /health``."""

    status: Literal["ok", "loading", "error"] = Field(
        description="ok: serving; loading: the model is loading; error: loading failed and is retried."
    )
    model: str
    namespace: str | None = None
    max_passage_tokens: int | None = None
    queue_depth: int | None = Field(default=None, description="Model work waiting for the worker now.")
    message: str | None = Field(default=None, description="With status error: what failed, in general terms.")


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a message, the request field it concerns (when there is one) and a kind."""

    message: str
    field: str | None = None
    error_type: str
    request_id: str | None = Field(default=None, description="Also in the X-Request-ID header and the server log.")
    errors: list[dict[str, Any]] | None = None
