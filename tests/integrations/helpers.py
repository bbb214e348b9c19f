"""Shared data and checks for the framework adapter tests."""

from __future__ import annotations

import threading

import pytest

from kalm_rag import Reranker

QUERY = "What is the capital of France?"

#: (id, text, metadata); the texts are distinct and several mention the query's words.
CORPUS = [
    ("paris", "Paris is the capital and largest city of France.", {"topic": "geo"}),
    ("seine", "The Seine flows through Paris before reaching the English Channel.", {"topic": "geo"}),
    ("banana", "Bananas are yellow when ripe and rich in potassium.", {"topic": "food"}),
    ("python", "Python is a programming language that lets you work quickly.", {"topic": "code"}),
    ("lyon", "Lyon is a French city known for its cuisine; it is not the capital.", {"topic": "geo"}),
    ("everest", "Mount Everest rises 8849 metres above sea level.", {"topic": "geo"}),
    ("mito", "The mitochondria is the powerhouse of the cell. " * 3, {"topic": "bio"}),
    ("berlin", "Berlin is the capital of Germany.", {"topic": "geo"}),
]
TEXTS = [text for _, text, _ in CORPUS]


def forbid_encoder(reranker: Reranker) -> None:
    """Make any encoder call on ``reranker`` fail the test (a cache miss would call it)."""

    def no_encoder(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder ran for a passage that should have been cached")

    reranker.backend.encode = no_encoder


def engine_ranking(
    reranker: Reranker, query: str, texts: list[str], top_k: int | None = None
) -> list[tuple[str, float]]:
    """What the engine says: ``(text, score)`` best first."""
    return [(r.text, r.score) for r in reranker.rerank(query, texts, top_k=top_k)]


def assert_same_ranking(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    """Same passages in the same order, with the same scores (to float32 rounding)."""
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-6)


def record_scoring_threads(reranker: Reranker) -> list[str]:
    """Names of the threads on which the decoder runs from now on (to prove async work leaves the loop)."""
    names: list[str] = []
    margins = reranker.backend.margins

    def spy(*args: object, **kwargs: object) -> object:
        names.append(threading.current_thread().name)
        return margins(*args, **kwargs)

    reranker.backend.margins = spy
    return names
