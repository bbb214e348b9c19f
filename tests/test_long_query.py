"""A very long query is cut before its whole text is tokenised, with a (rate-limited) warning, and a cut query
scores as its first ``max_query_tokens`` tokens do (issue 23 item 7, issue 24 item 12).
"""

from __future__ import annotations

import logging
import random

import pytest

from kalm_rag import Reranker

QUESTION = "What is the capital of France?"
PASSAGES = ["Paris is the capital of France, on the Seine.", "Bananas are yellow fruit.", "Mount Everest is tall."]
_WORDS = ["the", "of", "and", "river", "city", "country", "history", "people", "world", "music", "table", "green"]


def long_query(words: int = 50_000) -> str:
    rng = random.Random(0)
    return QUESTION + " " + " ".join(rng.choice(_WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def mini() -> Reranker:
    return Reranker.from_pretrained("kalm-mini", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def gemma(tiny_checkpoint) -> Reranker:
    return Reranker.from_pretrained(tiny_checkpoint, dtype="float32", max_query_tokens=32)


def _record_tokenised_lengths(backend, monkeypatch) -> list[int]:
    lengths: list[int] = []
    tok = backend.tokenizer
    real_call, real_encode = type(tok).__call__, type(tok).encode

    def call(self, text, *args, **kwargs):
        lengths.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real_call(self, text, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        lengths.append(len(text))
        return real_encode(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", call)
    monkeypatch.setattr(type(tok), "encode", encode)
    return lengths


@pytest.mark.parametrize("name", ["mini", "gemma"])
def test_the_whole_query_is_never_tokenised(name, request, monkeypatch) -> None:
    rr: Reranker = request.getfixturevalue(name)
    query = long_query()
    assert len(query) > 250_000
    lengths = _record_tokenised_lengths(rr.backend, monkeypatch)
    prompt = rr.backend.prompt_ids(
        query, instruction=rr.instruction, system_instruction=rr.system_instruction, max_query_tokens=32
    )
    assert prompt.query_cut
    assert lengths and max(lengths) < 40 * 1024  # a bound in characters, far below the query's length


@pytest.mark.parametrize("name", ["mini", "gemma"])
def test_a_cut_query_scores_as_its_first_tokens(name, request) -> None:
    rr: Reranker = request.getfixturevalue(name)
    query = long_query()
    limit = rr.max_query_tokens if name == "gemma" else rr.backend.config.max_query_tokens
    # the query's first ``limit`` tokens, as text (tokenising the whole query here: the test may be slow, not the
    # engine)
    ids = rr.backend.tokenizer(query, add_special_tokens=False)["input_ids"][:limit]
    head = rr.backend.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    got = rr.score(query, PASSAGES, return_margin=True)
    want = rr.score(head, PASSAGES, return_margin=True)
    assert got == pytest.approx(want, abs=1e-5)


def test_a_cut_query_still_ranks_the_answer_first(mini: Reranker) -> None:
    ranked = mini.rerank(long_query(), PASSAGES)
    assert ranked[0].index == 0
    assert ranked[0].score > 10 * ranked[1].score


def test_a_cut_query_is_warned_about_once(mini: Reranker, caplog: pytest.LogCaptureFixture) -> None:
    mini._warnings.reset("query-cut")
    with caplog.at_level(logging.WARNING, logger="kalm_rag.engine"):
        mini.score(long_query(2_000), PASSAGES)
        mini.score(long_query(3_000), PASSAGES)
        mini.score(QUESTION, PASSAGES)
    warnings = [r for r in caplog.records if "max_query_tokens" in r.getMessage()]
    assert len(warnings) == 1
    assert "was cut" in warnings[0].getMessage()


def test_a_short_query_is_not_warned_about(mini: Reranker, caplog: pytest.LogCaptureFixture) -> None:
    mini._warnings.reset("query-cut")
    with caplog.at_level(logging.WARNING, logger="kalm_rag.engine"):
        mini.score(QUESTION, PASSAGES)
    assert not [r for r in caplog.records if "max_query_tokens" in r.getMessage()]
