"""Data and checks shared by the service tests."""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kalm_rag import Reranker

QUERIES = [
    "What is the capital of France?",
    "How do plants make their food?",
    "Which river flows through Paris?",
    "How tall is Mount Everest?",
    "What does the mitochondria do?",
    "Which language lets you work quickly?",
    "What colour are ripe bananas?",
    "What is the capital of Germany?",
]

_SUBJECTS = [
    "Paris",
    "The Seine",
    "Photosynthesis",
    "Mount Everest",
    "The mitochondria",
    "Python",
    "A ripe banana",
    "Berlin",
    "Lyon",
    "The Rhine",
    "Chlorophyll",
    "K2",
]
_FACTS = [
    "is the capital and largest city of France",
    "flows through the middle of a large European city",
    "turns light, water and carbon dioxide into sugar",
    "rises far above sea level in the Himalaya",
    "is the powerhouse of the cell",
    "is a programming language that lets you work quickly",
    "is yellow and rich in potassium",
    "is the capital of Germany",
    "is known for its cuisine",
]

#: 60 distinct passages of 10 to 40 words
CORPUS = [
    f"{_SUBJECTS[i % len(_SUBJECTS)]} {_FACTS[(i * 5) % len(_FACTS)]}; note {i}: " + " ".join(["detail"] * (i % 30))
    for i in range(60)
]


def request_set(n: int, passages: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` (query, passages) requests drawn from ``QUERIES`` and ``CORPUS`` (queries repeat, passages overlap)."""
    rng = random.Random(seed)
    return [(QUERIES[i % len(QUERIES)], rng.sample(CORPUS, passages)) for i in range(n)]


def expected(reference: Reranker, query: str, texts: list[str], top: int | None = None) -> list[tuple[int, float]]:
    """The in-process ranking: ``(index, P(yes))`` best first."""
    return [(r.index, r.score) for r in reference.rerank(query, texts, top_k=top)]


def assert_ranking(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """Same indices in the same order, scores within 1e-5."""
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition: ``{(name, sorted labels): value}``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """One sample's value (0.0 when absent: a labelled counter appears on its first increment)."""
    return values.get((name, tuple(sorted(labels.items()))), 0.0)
