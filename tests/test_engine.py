"""Engine behaviour: store use, no encoder work on warm passages, ordering, async, bad input."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest
import torch

from kalm_rag import InvalidInputError, ModelLoadError, NumericalError, RankedPassage, Reranker
from kalm_rag.bench.checkpoints import make_tiny_tokenizer
from kalm_rag.store import MemoryStore

QUERY = "What is the capital of France?"
PASSAGES = ["Paris is the capital of France.", "Bananas are yellow.", "The Seine flows through Paris. " * 4]


@pytest.fixture(scope="module")
def rr(tiny_checkpoint):
    return Reranker.from_pretrained(tiny_checkpoint)


def test_warm_store_scoring_runs_no_encoder(tiny_checkpoint):
    rr = Reranker.from_pretrained(tiny_checkpoint)
    assert rr.encode(PASSAGES).encoded == 3
    assert int(rr.encode(PASSAGES + [PASSAGES[0]])) == 0  # already there: skipped
    before = dict(rr.counters)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran for a cached passage")

    rr.backend.encode = no_encoder
    for ratio in (1, 4, 32):
        rr.score(QUERY, PASSAGES, ratio=ratio)
    assert rr.counters["encoded_passages"] == before["encoded_passages"]
    assert rr.store.stats()["hits"] >= 9


def test_uncached_passages_are_encoded_once_and_stored(tiny_checkpoint):
    rr = Reranker.from_pretrained(tiny_checkpoint)
    rr.score(QUERY, PASSAGES + [PASSAGES[1]])
    assert rr.counters["encoded_passages"] == 3  # the duplicate is encoded once
    assert rr.store.stats()["entries"] == 3
    rr.score("another query", PASSAGES)
    assert rr.counters["encoded_passages"] == 3


def test_shared_store_object_between_rerankers(tiny_checkpoint):
    store = MemoryStore()
    first = Reranker.from_pretrained(tiny_checkpoint, store=store)
    first.encode(PASSAGES)
    second = Reranker.from_pretrained(tiny_checkpoint, store=store)
    assert second.score(QUERY, PASSAGES) == pytest.approx(first.score(QUERY, PASSAGES), abs=1e-6)
    assert second.counters["encoded_passages"] == 0


def test_namespace_separates_models_and_settings(tiny_checkpoint, tiny_checkpoint_b):
    store = MemoryStore()
    a = Reranker.from_pretrained(tiny_checkpoint, store=store)
    b = Reranker.from_pretrained(tiny_checkpoint_b, store=store)
    short = Reranker.from_pretrained(tiny_checkpoint, store=store, max_passage_tokens=8)
    assert len({a.namespace, b.namespace, short.namespace}) == 3
    a.encode(PASSAGES)
    # another model never sees a's vectors: it encodes for itself and scores with its own weights
    b_scores = b.score(QUERY, PASSAGES, return_margin=True)
    assert b.counters["encoded_passages"] == 3
    fresh_b = Reranker.from_pretrained(tiny_checkpoint_b).score(QUERY, PASSAGES, return_margin=True)
    assert b_scores == pytest.approx(fresh_b, abs=1e-6)


def test_rerank_sorts_best_first_and_cuts_to_top_k(rr):
    scores = rr.score(QUERY, PASSAGES)
    ranked = rr.rerank(QUERY, PASSAGES)
    assert [r.index for r in ranked] == sorted(range(3), key=lambda i: -scores[i])
    assert all(isinstance(r, RankedPassage) and r.text == PASSAGES[r.index] for r in ranked)
    assert [r.score for r in ranked] == sorted(scores, reverse=True)
    assert len(rr.rerank(QUERY, PASSAGES, top_k=2)) == 2
    assert len(rr.rerank(QUERY, PASSAGES, top_k=10)) == 3


def test_scores_are_probabilities(rr):
    assert all(0.0 <= s <= 1.0 for s in rr.score(QUERY, PASSAGES))


def test_empty_passage_list_returns_empty_list(rr):
    assert rr.score(QUERY, []) == []
    assert rr.rerank(QUERY, []) == []
    assert rr.score_pairs([]) == []


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda rr: rr.score("", PASSAGES), "query is empty"),
        (lambda rr: rr.score("   ", PASSAGES), "query is empty"),
        (lambda rr: rr.score(None, PASSAGES), "query must be a str"),
        (lambda rr: rr.score(QUERY, ["ok", ""]), r"passages\[1\] is empty"),
        (lambda rr: rr.score(QUERY, ["ok", 3]), r"passages\[1\] must be a str"),
        (lambda rr: rr.score(QUERY, "a single string"), "passages must be a list"),
        (lambda rr: rr.score(QUERY, PASSAGES, ratio=0), "ratio must be an int in 1..32"),
        (lambda rr: rr.score(QUERY, PASSAGES, ratio=33), "ratio must be an int in 1..32"),
        (lambda rr: rr.score(QUERY, PASSAGES, ratio=2.0), "ratio must be an int"),
        (lambda rr: rr.score(QUERY, PASSAGES, ratio=True), "ratio must be an int"),
        (lambda rr: rr.rerank(QUERY, PASSAGES, top_k=0), "top_k must be an int >= 1"),
        (lambda rr: rr.score(QUERY, PASSAGES, instruction=""), "instruction is empty"),
        (lambda rr: rr.score_pairs([(QUERY,)]), r"pairs\[0\] must be a \(query, passage\) pair"),
        (lambda rr: rr.encode([""]), r"passages\[0\] is empty"),
    ],
)
def test_bad_input_raises_a_clear_error(rr, call, message):
    with pytest.raises(InvalidInputError, match=message):
        call(rr)


def test_fp16_is_refused_with_the_reason(tiny_checkpoint):
    with pytest.raises(InvalidInputError, match="overflow"):
        Reranker.from_pretrained(tiny_checkpoint, dtype="float16")
    with pytest.raises(InvalidInputError, match="overflow"):
        Reranker.from_pretrained(tiny_checkpoint, dtype=torch.float16)


def test_bad_options_are_refused(tiny_checkpoint):
    with pytest.raises(InvalidInputError, match="batch_size"):
        Reranker.from_pretrained(tiny_checkpoint, batch_size=0)
    with pytest.raises(InvalidInputError, match="not a multiple of base_ratio"):
        Reranker.from_pretrained(tiny_checkpoint, ratio=4, base_ratio=3)
    rr = Reranker.from_pretrained(tiny_checkpoint, ratio=4, base_ratio=4)
    with pytest.raises(InvalidInputError, match="not a multiple of the store's base_ratio 4"):
        rr.score(QUERY, PASSAGES, ratio=2)


def test_a_checkpoint_that_is_not_t5gemma2_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="'bert' checkpoint"):
        Reranker.from_pretrained(tmp_path)


def test_a_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(ModelLoadError):
        Reranker.from_pretrained(tmp_path / "nothing-here")


def test_a_tokenizer_without_single_token_yes_no_is_refused(tiny_checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    make_tiny_tokenizer(broken, vocab_size=263)  # bytes + specials only: "yes" is three tokens
    with pytest.raises(ModelLoadError, match="'yes' and 'no' to be single tokens"):
        Reranker.from_pretrained(broken)


def test_non_finite_margins_raise_naming_the_dtype(tiny_checkpoint):
    rr = Reranker.from_pretrained(tiny_checkpoint)
    rr.backend.margins = lambda prompt, vectors, mask: torch.full((vectors.shape[0],), float("nan"))
    with pytest.raises(NumericalError, match="float32"):
        rr.score(QUERY, PASSAGES)


def test_default_store_is_a_bounded_memory_store(rr):
    assert isinstance(rr.store, MemoryStore)
    assert 0 < rr.store.stats()["max_bytes"] < float("inf")


async def test_async_scoring_does_not_block_the_event_loop(tiny_checkpoint):
    rr = Reranker.from_pretrained(tiny_checkpoint)
    many = [f"passage number {i} about Paris, the Seine and France. " * 8 for i in range(64)]
    ticks = 0
    done = False

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    scores = await rr.ascore(QUERY, many)
    elapsed = time.perf_counter() - start
    done = True
    await task
    assert len(scores) == 64
    # the loop kept turning while the worker thread scored
    assert ticks >= 3, (ticks, elapsed)
    ranked = await rr.arerank(QUERY, PASSAGES, top_k=1)
    assert ranked[0].index == rr.rerank(QUERY, PASSAGES, top_k=1)[0].index
    rr.close()


def test_cascade_rescores_the_best_at_a_finer_ratio_from_one_encoding(tiny_checkpoint):
    rr = Reranker.from_pretrained(tiny_checkpoint)
    passages = [f"passage {i} about Paris and the river Seine in France. " * (1 + i % 4) for i in range(12)]
    ranked = rr.rerank_cascade(QUERY, passages, stages=[(8, 10), (2, 4)])
    assert rr.counters["encoded_passages"] == 10  # only the first stage's depth, each once
    assert len(ranked) == 10
    coarse = rr.score(QUERY, passages[:10], ratio=8)
    fine_top = sorted(range(10), key=lambda i: -coarse[i])[:4]
    fine = dict(zip(fine_top, rr.score(QUERY, [passages[i] for i in fine_top], ratio=2)))
    want_head = sorted(fine_top, key=lambda i: -fine[i])
    want_tail = [i for i in sorted(range(10), key=lambda i: -coarse[i]) if i not in fine_top]
    assert [r.index for r in ranked] == want_head + want_tail
    assert [r.ratio for r in ranked] == [2] * 4 + [8] * 6
    assert [r.score for r in ranked[:4]] == pytest.approx([fine[i] for i in want_head], abs=1e-6)
    assert rr.counters["encoded_passages"] == 10
    assert len(rr.rerank_cascade(QUERY, passages, stages=[(8, 10), (2, 4)], top_k=3)) == 3


def test_cascade_rejects_bad_stages(rr):
    with pytest.raises(InvalidInputError, match="stages"):
        rr.rerank_cascade(QUERY, PASSAGES, stages=[])
    with pytest.raises(InvalidInputError, match=r"stages\[0\] ratio"):
        rr.rerank_cascade(QUERY, PASSAGES, stages=[(64, 10)])


def test_close_leaves_a_shared_store_open(tiny_checkpoint):
    closed = []

    class TrackingStore(MemoryStore):
        def close(self) -> None:
            closed.append(True)

    shared = TrackingStore()
    Reranker.from_pretrained(tiny_checkpoint, store=shared).close()
    assert closed == []
    own = Reranker.from_pretrained(tiny_checkpoint, store="memory://")
    own.close()


def test_out_of_memory_halves_the_batch_for_that_call_and_keeps_finished_work(tiny_checkpoint):
    rr = Reranker.from_pretrained(tiny_checkpoint, batch_size=8)
    passages = [f"passage {i} on the Seine. " * (1 + i % 3) for i in range(10)]
    want = rr.score(QUERY, passages)
    real_margins = rr.backend.margins
    batch_sizes = []

    def margins_with_small_memory(prompt_ids, passage_vectors, passage_mask):
        batch_sizes.append(passage_vectors.shape[0])
        if passage_vectors.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_margins(prompt_ids, passage_vectors, passage_mask)

    rr.backend.margins = margins_with_small_memory
    assert rr.score(QUERY, passages) == pytest.approx(want, abs=1e-5)
    assert batch_sizes[:3] == [8, 4, 2] and max(batch_sizes[3:]) <= 2  # 8 -> 4 -> 2 within the call
    assert rr.batch_size == 8  # a one-off out-of-memory does not shrink every later call (issue #15, item 14)
    batch_sizes.clear()

    def margins_with_memory(prompt_ids, passage_vectors, passage_mask):
        batch_sizes.append(passage_vectors.shape[0])
        return real_margins(prompt_ids, passage_vectors, passage_mask)

    rr.backend.margins = margins_with_memory
    assert rr.score(QUERY, passages) == pytest.approx(want, abs=1e-5)
    assert batch_sizes == [8, 2]  # the next call starts again at batch_size
