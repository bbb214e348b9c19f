"""The endpoints: Cohere v1/v2 and TEI rerank, encode, health and metrics, each a thin layer over the service.

Each rerank endpoint checks its body (limits, surrogates, options: :mod:`kalm_rag.serve.checks`), hands one
scoring job to the model worker and shapes the answer. An empty document list is answered with an empty
result list (the query and options are still checked): retrievers that found nothing send one, and failing
them is what Cohere's hosted API does and what every framework client has had to work around.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kalm_rag.errors import EvidenceUnsupportedError
from kalm_rag.scores import rank_order
from kalm_rag.serve.batching import probabilities
from kalm_rag.serve.checks import RequestChecks, refuse_surrogates
from kalm_rag.serve.errors import ERROR_RESPONSES, ApiError
from kalm_rag.serve.metrics import CONTENT_TYPE
from kalm_rag.serve.schemas import (
    CohereRerankRequest,
    CohereRerankResponse,
    EncodeRequest,
    EncodeResponse,
    Extensions,
    Health,
    TEIRerankRequest,
    TEIResult,
)
from kalm_rag.serve.service import Service


def add_routes(app: FastAPI, service: Service, checks: RequestChecks) -> None:
    """Register every endpoint of the service on ``app``."""

    async def ranked(
        http: Request, query: str, texts: list[str], ext: Extensions
    ) -> tuple[list[tuple[int, float, float]], int]:
        """``[(index, P(yes), margin)]`` best first (ties keep input order, as ``Reranker.rerank``) and the ratio."""
        reranker, _ = await service.require()
        request = checks.score_request(reranker, query, texts, ext)
        ratio = reranker.ratio if ext.ratio is None else ext.ratio
        if not texts:
            return [], ratio
        margins = await service.rank(http, request)
        scores = probabilities(margins)
        order = rank_order(margins)  # by margin: P(yes) ties at 1.0 in float32 from a margin of ~17
        return [(i, scores[i], margins[i]) for i in order], ratio

    async def evidence(
        query: str, texts: list[str], ext: Extensions, *, prune_mass: float | None = None
    ) -> list[tuple[list[dict[str, Any]], str | None]]:
        """The evidence spans of each of ``texts`` (the results to return), computed on the model worker; with
        ``prune_mass``, each text's kept spans and pruned text (else ``None``).
        """
        reranker, batcher = await service.require()
        request = checks.score_request(reranker, query, texts, ext)

        def spans() -> list[tuple[list[dict[str, Any]], str | None]]:
            found = reranker.rerank(
                request.query,
                texts,
                instruction=request.instruction,
                ratio=request.ratio,
                evidence=True,
                prune_mass=prune_mass,
            )
            by_index = {r.index: ([s.to_dict() for s in r.evidence or ()], r.pruned_text) for r in found}
            return [by_index[i] for i in range(len(texts))]

        try:
            result: list[tuple[list[dict[str, Any]], str | None]] = await batcher.call(spans)
        except EvidenceUnsupportedError as exc:
            raise ApiError(422, str(exc), field="return_evidence" if prune_mass is None else "prune_mass") from None
        return result

    async def cohere(http: Request, body: CohereRerankRequest, version: str) -> dict[str, Any]:
        refuse_surrogates(body)
        texts = checks.texts_of(body.documents, "documents", body.rank_fields)
        top_n = checks.top_n(body.top_n)
        prune_mass = checks.prune_mass(body.prune_mass)
        await service.require()
        service.check_max_tokens(body.max_tokens_per_doc)
        results = []
        ranking, ratio = await ranked(http, body.query, texts, body)
        spans = (
            await evidence(body.query, [texts[i] for i, _, _ in ranking[:top_n]], body, prune_mass=prune_mass)
            if body.return_evidence or prune_mass is not None
            else None
        )
        for rank_position, (i, score, _) in enumerate(ranking[:top_n]):
            result: dict[str, Any] = {"index": i, "relevance_score": score}
            if body.return_documents:
                doc = body.documents[i]
                result["document"] = {"text": doc} if isinstance(doc, str) else doc.model_dump(exclude_none=True)
            if spans is not None:
                result["evidence"], pruned_text = spans[rank_position]
                if pruned_text is not None:
                    result["pruned_text"] = pruned_text
            results.append(result)
        meta = {"api_version": {"version": version}, "model": service.model_name, "ratio": ratio}
        return {"id": str(uuid.uuid4()), "results": results, "meta": meta}

    @app.post(
        "/v2/rerank",
        response_model=CohereRerankResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        tags=["rerank"],
    )
    async def rerank_v2(http: Request, body: CohereRerankRequest) -> dict[str, Any]:
        """Cohere v2 rerank (what ``cohere.ClientV2.rerank``, LangChain's and LlamaIndex's ``CohereRerank`` send)."""
        return await cohere(http, body, "2")

    @app.post(
        "/v1/rerank",
        response_model=CohereRerankResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        tags=["rerank"],
    )
    async def rerank_v1(http: Request, body: CohereRerankRequest) -> dict[str, Any]:
        """Cohere v1 rerank (``cohere.Client.rerank``; Jina's client sends the same shape)."""
        return await cohere(http, body, "1")

    @app.post(
        "/rerank",
        response_model=list[TEIResult],
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        tags=["rerank"],
    )
    async def rerank_tei(http: Request, body: TEIRerankRequest) -> list[dict[str, Any]]:
        """Hugging Face text-embeddings-inference rerank: a list of ``{index, score, text?}``, best first."""
        refuse_surrogates(body)
        texts = checks.texts_of(body.texts, "texts")
        checks.prompt(body.query, body)
        if body.truncate is False and texts:
            await service.refuse_long_texts(texts, "texts")
        ranking, _ = await ranked(http, body.query, texts, body)
        out = []
        for i, score, margin in ranking:
            item: dict[str, Any] = {"index": i, "score": margin if body.raw_scores else score}
            if body.return_text:
                item["text"] = body.texts[i]
            out.append(item)
        return out

    @app.post("/v1/encode", response_model=EncodeResponse, responses=ERROR_RESPONSES, tags=["indexing"])
    async def encode(body: EncodeRequest) -> EncodeResponse:
        """Pre-encode documents into the shared store (skipping those already there), so that reranking
        them later runs only the decoder.
        """
        refuse_surrogates(body)
        texts = checks.texts_of(body.documents, "documents")
        distinct, encoded = await service.encode(texts)
        reranker, _ = await service.require()
        return EncodeResponse(
            documents=len(texts),
            distinct=distinct,
            encoded=encoded,
            already_present=distinct - encoded,
            namespace=reranker.namespace,
        )

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["service"])
    async def health() -> Any:
        """200 once the model is loaded; 503 ``loading`` before, ``error`` after a failed load (retried).
        Never needs the API key.
        """
        if not service.loaded:
            service.start_loading()
            failed = service.load_failures > 0 and not service.loading
            body = Health(
                status="error" if failed else "loading",
                model=service.model_name or "",
                message=f"loading the model failed {service.load_failures} time(s); retrying" if failed else None,
            )
            return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
        assert service.reranker is not None and service.batcher is not None
        return Health(
            status="ok",
            model=service.model_name or "",
            namespace=service.reranker.namespace,
            max_passage_tokens=service.passage_limit,
            queue_depth=service.batcher.queue_depth,
        )

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format: requests, latency, batch sizes, queue depth, store hits/misses, encoder work."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)
