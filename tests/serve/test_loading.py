"""Loading the model in the app (in-process, no server): a failed load is reported and retried; the app's own
start-up probe logs nothing (the "passages were cut" warning is for user input only).
"""

from __future__ import annotations

import logging
import time

import pytest
from fastapi.testclient import TestClient

from kalm_rag import Reranker
from kalm_rag.errors import StoreUnavailableError
from kalm_rag.serve import create_app
from kalm_rag.serve import service as service_module

CUT = "were cut"


def test_a_failed_load_is_retried_and_start_up_warns_of_nothing(reference, monkeypatch, caplog):
    monkeypatch.setattr(service_module, "LOAD_RETRY_S", 0.5)
    monkeypatch.setattr(reference.backend, "passages_cut", 0)  # as freshly loaded
    attempts: list[int] = []

    def load() -> Reranker:
        attempts.append(1)
        if len(attempts) == 1:
            raise StoreUnavailableError("unable to open database file /srv/secret/passages.db")
        return Reranker(reference.backend)  # closed by the app, which leaves the shared backend alone

    with caplog.at_level(logging.WARNING), TestClient(create_app(load, model_name="m")) as client:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = client.get("/health")
            seen.append((r.status_code, r.json()["status"]))
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert (503, "error") in seen and seen[-1] == (200, "ok"), seen
        assert len(attempts) == 2
        assert "/srv/secret" not in str(client.get("/health").json())
        assert CUT not in caplog.text  # nothing from the app's own probe
        long_doc = "long " * 1200
        r = client.post("/v2/rerank", json={"query": "q", "documents": ["short", long_doc]})
        assert r.status_code == 200, r.text
        assert caplog.text.count(CUT) == 1  # the user's passage was cut: that is worth a warning


def test_requests_while_the_load_keeps_failing_answer_503_json(reference, monkeypatch):
    monkeypatch.setattr(service_module, "LOAD_RETRY_S", 30.0)

    def load() -> Reranker:
        raise StoreUnavailableError("unable to open database file /srv/secret/passages.db")

    with TestClient(create_app(load)) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").json()["status"] != "error" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.post("/v2/rerank", json={"query": "q", "documents": ["a"]})
        assert r.status_code == 503 and r.json()["error_type"] == "model_unavailable", r.text
        assert "/srv/secret" not in r.text and r.headers["retry-after"] == "1"


@pytest.mark.parametrize("bad", [0, -1.0, "1", True])
def test_timeouts_must_be_positive_seconds(reference, bad):
    from kalm_rag import InvalidInputError

    with pytest.raises(InvalidInputError, match="request_timeout_s"):
        create_app(reference, request_timeout_s=bad)


def test_kalm_rag_serve_settings_reach_each_worker_app(monkeypatch):
    from kalm_rag.serve.app import CONFIG_ENV, ServeConfig, app_from_env

    config = ServeConfig(model="/nowhere", max_query_chars=10, max_document_chars=20)
    assert ServeConfig.from_json(config.to_json()) == config
    monkeypatch.setenv(CONFIG_ENV, config.to_json())
    client = TestClient(app_from_env())  # no lifespan: nothing loads, the checks answer first
    r = client.post("/rerank", json={"query": "q" * 11, "texts": ["a"]})
    assert r.status_code == 413 and r.json()["field"] == "query", r.text
    r = client.post("/rerank", json={"query": "q", "texts": ["d" * 21]})
    assert r.status_code == 413 and r.json()["field"] == "texts[0]", r.text
