"""``POST /v1/encode`` must not answer 200 when the store does not keep the passages (in-process app, no server)."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.testclient import TestClient

from kalm_rag import Reranker
from kalm_rag.errors import StoreUnavailableError
from kalm_rag.serve import create_app
from kalm_rag.store.base import PooledPassage
from kalm_rag.store.memory import MemoryStore


class RefusingStore(MemoryStore):
    """Reads work; every write fails the way a down Redis or a full disk does."""

    def put_many(self, namespace: str, entries: Mapping[str, PooledPassage]) -> None:
        raise StoreUnavailableError("the store refuses writes (test)")


def test_encode_answers_503_with_the_reason_when_the_store_does_not_keep_passages(reference: Reranker):
    rr = Reranker(reference.backend, store=RefusingStore())
    with TestClient(create_app(rr)) as client:
        response = client.post("/v1/encode", json={"documents": ["a passage the store will refuse"]})
        assert response.status_code == 503, response.text
        body = response.json()
        assert "NotStoredError" in str(body) and "refuses writes" in str(body)
        assert "Traceback" not in response.text
        # scoring the same passage still works: the query path recomputes and warns
        ok = client.post("/v2/rerank", json={"query": "q", "documents": ["a passage the store will refuse"]})
        assert ok.status_code == 200, ok.text
