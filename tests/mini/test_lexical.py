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


# ----- the lexical term inside kalm-mini (a 2.0 candidate option, off in the shipped config) ---------------

PASSAGES = [
    "Photosynthesis lets plants turn light, water and carbon dioxide into glucose and oxygen.",
    "Plants in a garden need water and food to grow well.",
    "Many animals eat plants as their main food.",
    "The Seine flows through Paris.",
]
QUERY = "How do plants make their food from light?"


def candidate_checkpoint(tmp_path, weight: float, *, with_stats: bool = True, unit: str = "piece"):
    """A copy of the shipped checkpoint with ``lexical_weight`` set and statistics counted over PASSAGES
    (word pieces, or whole words hashed into buckets); returns the folder, the tokenizer and the counted ids.
    """
    import json
    import shutil

    from kalm_rag.models.mini import EMBEDDED_DIR, MiniConfig
    from kalm_rag.models.mini.backend import load_encoder
    from kalm_rag.models.mini.lexical import WORD_BUCKETS, continuation_mask, word_buckets

    folder = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    config["lexical_weight"] = weight
    (folder / "config.json").write_text(json.dumps(config))
    _, tok = load_encoder(MiniConfig(), device=torch.device("cpu"), dtype=torch.float32)
    docs = tok(PASSAGES, add_special_tokens=False)["input_ids"]
    vocab = tok.vocab_size
    if unit == "word":
        docs, vocab = [word_buckets(d, continuation_mask(tok)) for d in docs], WORD_BUCKETS
    if with_stats:
        LexicalStats.count(docs, vocab_size=vocab, ignore_ids=tok.all_special_ids, unit=unit).save(folder)
    else:  # the shipped folder holds the evidence readout's statistics: take them away
        (folder / "lexical.safetensors").unlink()
    return folder, tok, docs


@pytest.mark.parametrize("unit", ["piece", "word"])
def test_the_lexical_term_adds_bm25s_scores_to_the_logit(tmp_path, unit: str) -> None:
    import math

    from kalm_rag import Reranker
    from kalm_rag.models.mini.lexical import continuation_mask, word_buckets

    folder, tok, docs = candidate_checkpoint(tmp_path, 2.0, unit=unit)
    off = Reranker.from_pretrained(device="cpu", dtype="float32")
    on = Reranker.from_pretrained(str(folder), device="cpu", dtype="float32")
    assert on.backend.weights_id != off.backend.weights_id
    added = torch.tensor(on.score(QUERY, PASSAGES, return_margin=True)) - torch.tensor(
        off.score(QUERY, PASSAGES, return_margin=True)
    )

    model = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    model.index([[str(i) for i in d] for d in docs], show_progress=False)
    every = tok(QUERY, add_special_tokens=False)["input_ids"]
    every = set(word_buckets(every, continuation_mask(tok)) if unit == "word" else every)
    query = sorted(i for i in every if any(i in d for d in docs))
    bm25 = torch.tensor(model.get_scores([str(i) for i in query]), dtype=torch.float32)
    n = len(docs)  # every query id counts in the bound, unseen ones too
    bound = sum(math.log1p((n - sum(i in d for d in docs) + 0.5) / (sum(i in d for d in docs) + 0.5)) for i in every)
    expected = on.backend.config.score_scale * 2.0 * bm25 / bound
    torch.testing.assert_close(added, expected, rtol=1e-4, atol=1e-4)
    assert float(added[3]) == 0.0 and bool((added[:3] > 0).all())  # no query word in the Seine passage


def test_lexical_weight_off_keeps_the_1x_config_and_identity() -> None:
    from kalm_rag.models.mini import MiniConfig

    assert "lexical_weight" not in MiniConfig().to_dict()
    assert MiniConfig(lexical_weight=0.5).to_dict()["lexical_weight"] == 0.5
    with pytest.raises(ValueError):
        MiniConfig(lexical_weight=-1.0)


def test_a_lexical_checkpoint_without_statistics_is_refused(tmp_path) -> None:
    from kalm_rag import Reranker

    folder, _, _ = candidate_checkpoint(tmp_path, 1.0, with_stats=False)
    with pytest.raises(ModelLoadError):
        Reranker.from_pretrained(str(folder), device="cpu", dtype="float32")


def test_word_buckets_join_pieces_into_words() -> None:
    from kalm_rag.models.mini import MiniConfig
    from kalm_rag.models.mini.backend import load_encoder
    from kalm_rag.models.mini.lexical import continuation_mask, word_buckets

    _, tok = load_encoder(MiniConfig(), device=torch.device("cpu"), dtype=torch.float32)
    text = "Photosynthesis converts light; photosynthesis again."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    words = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text.lower())  # the tokenizer's own words
    buckets = word_buckets(ids, continuation_mask(tok))
    assert len(ids) > len(words) == len(buckets)  # "photosynthesis" is several pieces, one word
    assert buckets[0] == buckets[4] != buckets[1]  # the same word, the same bucket
    assert buckets[2] == tok.convert_tokens_to_ids("light") + 1  # a one-piece word is its id + 1


def test_passages_are_tokenised_once_for_the_lexical_term(tmp_path) -> None:
    from kalm_rag.models.mini import MiniBackend

    folder, _, _ = candidate_checkpoint(tmp_path, 1.0, unit="word")
    backend = MiniBackend.from_pretrained(folder)
    first = backend.lexical_margins(QUERY, PASSAGES, max_query_tokens=512, max_passage_tokens=1024)
    seen: list[int] = []
    tokenizer = backend.tokenizer

    class Counting:  # the real tokenizer, counting the texts it is given as a list (passages)
        def __getattr__(self, name: str):
            return getattr(tokenizer, name)

        def __call__(self, texts, **kwargs):
            if isinstance(texts, list):
                seen.append(len(texts))
            return tokenizer(texts, **kwargs)

    backend.tokenizer = Counting()
    again = backend.lexical_margins("plants and light", PASSAGES[::-1], max_query_tokens=512, max_passage_tokens=1024)
    assert seen == []  # every passage came from the cache
    fresh = MiniBackend.from_pretrained(folder)
    expected = fresh.lexical_margins("plants and light", PASSAGES[::-1], max_query_tokens=512, max_passage_tokens=1024)
    assert first is not None and again is not None and expected is not None
    torch.testing.assert_close(again, expected)
    backend.lexical_margins(QUERY, PASSAGES, max_query_tokens=512, max_passage_tokens=200)
    assert seen == [len(PASSAGES)]  # another token limit is another entry
