"""The engine's margins equal the official recipe (plain transformers, one pair at a time) within 1e-4."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from kalm_rag import Reranker
from tests.reference import official_margin

TOL = 1e-4
QUERY = "What is the capital of France and why is Paris on the Seine?"
PASSAGES = [
    "Paris is the capital of France.",
    "x",
    "Photosynthesis converts light energy into chemical energy stored in glucose in plants. " * 3,
    "The mitochondria is the powerhouse of the cell.",
    "What is the tallest mountain on Earth? Mount Everest rises 8849 metres above sea level. " * 2,
]


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


def _reference(reference_model, query, passages, **kw):
    model, tok = reference_model
    return [official_margin(model, tok, query, p, **kw) for p in passages]


@pytest.mark.parametrize("lean", [True, False], ids=["lean-decoder", "transformers-decoder"])
@pytest.mark.parametrize("ratio", [1, 2, 4, 8, 32])
def test_margins_match_official_recipe_at_each_ratio(tiny_checkpoint, reference_model, ratio, lean):
    rr = Reranker.from_pretrained(tiny_checkpoint, dtype="float32")
    assert rr.backend.lean  # the tiny config is one the lean path supports
    rr.backend.lean = lean
    got = rr.score(QUERY, PASSAGES, ratio=ratio, return_margin=True)
    want = _reference(reference_model, QUERY, PASSAGES, ratio=ratio)
    assert got == pytest.approx(want, abs=TOL)
    # the margins are not all alike, so the comparison says something
    assert max(want) - min(want) > 10 * TOL


def test_batch_composition_and_padding_do_not_change_scores(tiny_checkpoint):
    rr = Reranker.from_pretrained(tiny_checkpoint, batch_size=2)
    mixed = rr.score(QUERY, PASSAGES, return_margin=True)
    alone = [rr.score(QUERY, [p], return_margin=True)[0] for p in PASSAGES]
    reversed_batch = rr.score(QUERY, PASSAGES[::-1], return_margin=True)[::-1]
    one_batch = Reranker.from_pretrained(tiny_checkpoint, batch_size=64).score(QUERY, PASSAGES, return_margin=True)
    assert mixed == pytest.approx(alone, abs=TOL)
    assert mixed == pytest.approx(reversed_batch, abs=TOL)
    assert mixed == pytest.approx(one_batch, abs=TOL)


def test_truncated_passages_and_queries_match(tiny_checkpoint, reference_model):
    long_query = "why " * 40 + "is the sky blue over Paris in the evening"
    rr = Reranker.from_pretrained(tiny_checkpoint, max_passage_tokens=12, max_query_tokens=7)
    got = rr.score(long_query, PASSAGES, ratio=4, return_margin=True)
    want = _reference(reference_model, long_query, PASSAGES, ratio=4, max_passage_tokens=12, max_query_tokens=7)
    assert got == pytest.approx(want, abs=TOL)
    # truncation really happened: the untruncated reference differs
    full = _reference(reference_model, long_query, PASSAGES, ratio=4)
    assert max(abs(a - b) for a, b in zip(full, want)) > 10 * TOL


def test_custom_instruction_and_system_instruction(tiny_checkpoint, reference_model):
    system = "Decide if the passage helps. Reply yes or no."
    instruction = "Given a medical question, find passages that answer it."
    rr = Reranker.from_pretrained(tiny_checkpoint, system_instruction=system, instruction=instruction)
    got = rr.score(QUERY, PASSAGES, ratio=2, return_margin=True)
    want = _reference(reference_model, QUERY, PASSAGES, ratio=2, instruction=instruction, system=system)
    assert got == pytest.approx(want, abs=TOL)
    # a per-call instruction overrides the reranker's
    other = "Find passages about geography."
    got_call = rr.score(QUERY, PASSAGES, ratio=2, instruction=other, return_margin=True)
    want_call = _reference(reference_model, QUERY, PASSAGES, ratio=2, instruction=other, system=system)
    assert got_call == pytest.approx(want_call, abs=TOL)


def test_scores_are_sigmoid_of_margins_in_input_order(tiny_checkpoint, reference_model):
    rr = Reranker.from_pretrained(tiny_checkpoint)
    probs = rr.score(QUERY, PASSAGES, ratio=4)
    want = torch.sigmoid(torch.tensor(_reference(reference_model, QUERY, PASSAGES, ratio=4))).tolist()
    assert probs == pytest.approx(want, abs=TOL)


def test_score_pairs_with_several_queries(tiny_checkpoint, reference_model):
    rr = Reranker.from_pretrained(tiny_checkpoint)
    other_query = "How do plants make glucose?"
    pairs = [(QUERY, PASSAGES[0]), (other_query, PASSAGES[2]), (QUERY, PASSAGES[3]), (other_query, PASSAGES[0])]
    got = rr.score_pairs(pairs, ratio=4)
    model, tok = reference_model
    want = [torch.sigmoid(torch.tensor(official_margin(model, tok, q, p, ratio=4))).item() for q, p in pairs]
    assert got == pytest.approx(want, abs=TOL)


def test_bf16_scores_stay_close_to_fp32(tiny_checkpoint):
    fp32 = Reranker.from_pretrained(tiny_checkpoint, dtype="float32").score(QUERY, PASSAGES, return_margin=True)
    bf16 = Reranker.from_pretrained(tiny_checkpoint, dtype="bfloat16").score(QUERY, PASSAGES, return_margin=True)
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.1
