"""kalm-mini's lexical signal: word-piece BM25 with shipped statistics, against an independent bm25s computation."""

from __future__ import annotations

import random

import pytest
import torch

from kalm_rag.errors import ModelLoadError
from kalm_rag.models.mini.lexical import LexicalStats, bm25_scores, max_bm25

bm25s = pytest.importorskip("bm25s")


def random_corpus(seed: int, docs: int = 40, vocab: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))] for _ in range(docs)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bm25_matches_bm25s_lucene(seed: int) -> None:
    corpus = random_corpus(seed)
    stats = LexicalStats.count(corpus, vocab_size=64, k1=1.2, b=0.6)
    query = sorted(set(random.Random(seed + 100).sample(range(3, 70), 6)))  # some ids never seen, some > vocab
    ours = bm25_scores(query, corpus, stats)

    model = bm25s.BM25(method="lucene", k1=1.2, b=0.6)
    model.index([[str(i) for i in doc] for doc in corpus], show_progress=False)
    known = [str(t) for t in query if t < 64 and any(t in doc for doc in corpus)]
    expected = torch.tensor(model.get_scores(known), dtype=torch.float32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_stats_ignore_ids_and_round_trip(tmp_path) -> None:
    corpus = [[0, 5, 6, 1], [0, 5, 1], [0, 7, 1]]
    stats = LexicalStats.count(corpus, vocab_size=10, ignore_ids=[0, 1], sources=["toy"])
    assert stats.num_docs == 3 and stats.avgdl == pytest.approx(4 / 3)
    assert stats.idf[5] < stats.idf[6] < stats.idf[9]  # frequent < rare < never seen
    stats.save(tmp_path)
    back = LexicalStats.load(tmp_path)
    torch.testing.assert_close(back.idf, stats.idf)
    assert (back.num_docs, back.avgdl, back.k1, back.b, back.sources) == (3, stats.avgdl, 1.5, 0.75, ("toy",))


def test_normalised_score_is_a_fraction_of_the_query_mass() -> None:
    corpus = random_corpus(3)
    stats = LexicalStats.count(corpus, vocab_size=64)
    query = [5, 9, 12]
    top = max_bm25(query, stats)
    scores = bm25_scores(query, corpus, stats) / top
    assert float(scores.min()) >= 0.0 and float(scores.max()) < 1.0
    assert max_bm25([], stats) == 0.0 and bm25_scores([], corpus, stats).abs().sum() == 0


def test_missing_statistics_are_a_load_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError):
        LexicalStats.load(tmp_path)
