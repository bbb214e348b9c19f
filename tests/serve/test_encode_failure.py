"""``POST /v1/encode`` must not answer 200 when the store does not keep the passages, and the answer must not
leak the store's internals (in-process app, no server).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest
from fastapi.testclient import TestClient

from kalm_rag import Reranker
from kalm_rag.errors import StoreUnavailableError
from kalm_rag.serve import create_app
from kalm_rag.store.base import PooledPassage
from kalm_rag.store.memory import MemoryStore

SECRET_PATH = "/srv/private/kalm/passages.db"


class RefusingStore(MemoryStore):
    """Reads work; every write fails the way a read-only SQLite file does (its path in the message)."""

    def put_many(self, namespace: str, entries: Mapping[str, PooledPassage]) -> None:
        raise StoreUnavailableError(f"attempt to write a readonly database: {SECRET_PATH}")


def test_encode_answers_503_with_a_request_id_and_logs_the_reason(
    reference: Reranker, caplog: pytest.LogCaptureFixture
):
    rr = Reranker(reference.backend, store=RefusingStore())
    with TestClient(create_app(rr)) as client, caplog.at_level(logging.ERROR, logger="kalm_rag.serve"):
        response = client.post("/v1/encode", json={"documents": ["a passage the store will refuse"]})
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["error_type"] == "store_unavailable" and body["message"]
        # internals stay in the log: no path, no exception name or text in the answer
        assert SECRET_PATH not in response.text and "readonly" not in response.text
        assert "NotStoredError" not in response.text and "Traceback" not in response.text
        rid = body["request_id"]
        assert response.headers["x-request-id"] == rid
        logged = [r.getMessage() for r in caplog.records if rid in r.getMessage()]
        assert logged and SECRET_PATH in logged[0], caplog.text
        # a client's own request id (a short token) is kept, so that its logs and ours meet
        again = client.post("/v1/encode", json={"documents": ["x y z"]}, headers={"X-Request-ID": "client-42"})
        assert again.json()["request_id"] == "client-42" == again.headers["x-request-id"]
        # scoring the same passage still works: the query path recomputes and warns
        ok = client.post("/v2/rerank", json={"query": "q", "documents": ["a passage the store will refuse"]})
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-request-id"]
