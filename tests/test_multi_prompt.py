"""One decoder call over several prompts (issue 26): each row's margin equals its prompt scored alone (1e-5 in
float32) and the independent reference (T5Gemma 2: plain transformers, one pair at a time), at mixed ratios and
mixed prompt lengths, in both backends; ``Reranker.score_many`` uses it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from kalm_rag import Reranker, ScoreRequest
from tests.reference import SYSTEM, official_margin

TOL = 1e-5
PASSAGES = [
    "Paris is the capital of France.",
    "x",
    "Photosynthesis converts light energy into chemical energy stored in glucose in plants. " * 3,
    "The mitochondria is the powerhouse of the cell.",
    "What is the tallest mountain on Earth? Mount Everest rises 8849 metres above sea level. " * 2,
    "Bananas are yellow.",
]
#: (query, instruction or None, ratio): short and long prompts, two instructions, several ratios
REQUESTS = [
    ("capital?", None, 4),
    ("What is the capital of France and why is Paris on the Seine, the river of the city?", None, 1),
    ("How do plants make glucose?", "Find passages about biology.", 2),
    ("capital?", None, 8),  # the same prompt as the first, at another ratio
    ("tallest mountain", "Find passages about biology.", 32),
]


def _requests(n_passages: list[int]) -> list[ScoreRequest]:
    return [
        ScoreRequest(q, PASSAGES[:n], instruction=i, ratio=r) for (q, i, r), n in zip(REQUESTS, n_passages, strict=True)
    ]


# ----- T5Gemma 2 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("lean", [True, False], ids=["lean-decoder", "transformers-decoder"])
def test_gemma_score_many_equals_each_request_alone_and_the_reference(tiny_checkpoint, reference_model, lean):
    rr = Reranker.from_pretrained(tiny_checkpoint, dtype="float32", batch_size=7)  # batches straddle requests
    rr.backend.lean = lean
    requests = _requests([6, 3, 5, 2, 6])
    calls = rr.counters["decoder_calls"]
    together = rr.score_many(requests, return_margin=True)
    mixed_calls = rr.counters["decoder_calls"] - calls
    alone = [
        rr.score(r.query, r.passages, instruction=r.instruction, ratio=r.ratio, return_margin=True) for r in requests
    ]
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want, abs=TOL)
    model, tok = reference_model
    instruction = rr.instruction
    for got, r in zip(together, requests, strict=True):
        ref = [
            official_margin(
                model, tok, r.query, p, ratio=r.ratio, instruction=r.instruction or instruction, system=SYSTEM
            )
            for p in r.passages
        ]
        assert got == pytest.approx(ref, abs=1e-4)
    assert mixed_calls == -(-sum(len(r.passages) for r in requests) // 7)  # rows of several prompts share calls
    flat = [m for ms in together for m in ms]
    assert max(flat) - min(flat) > 1e-2  # the margins differ, so the comparison says something


def test_gemma_margins_many_mixes_prompts_in_one_call(tiny_checkpoint):
    rr = Reranker.from_pretrained(tiny_checkpoint, dtype="float32")
    backend = rr.backend
    prompts = [
        backend.prompt_ids(q, instruction=rr.instruction, system_instruction=rr.system_instruction, max_query_tokens=64)
        for q in ("a", "a much longer query with many more tokens in it than the first", "third one")
    ]
    assert len({len(p) for p in prompts}) == 3
    entries = rr._pooled(PASSAGES)
    vectors = torch.nn.utils.rnn.pad_sequence([e.vectors for e in entries], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(e.vectors), dtype=torch.long) for e in entries], True)
    index = torch.tensor([2, 0, 1, 1, 0, 2])
    got = backend.margins_many(prompts, index, vectors, mask)
    want = [
        float(backend.margins(prompts[int(p)], vectors[b : b + 1], mask[b : b + 1])[0]) for b, p in enumerate(index)
    ]
    assert got.tolist() == pytest.approx(want, abs=TOL)


# ----- kalm-mini -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini() -> Reranker:
    return Reranker.from_pretrained(
        "kalm-mini", device="cpu", dtype="float32", batch_size=5, base_ratio=1, storage="float32"
    )  # exact store: ratio 1 is read


def test_mini_score_many_equals_each_request_alone(mini: Reranker) -> None:
    requests = _requests([6, 3, 5, 2, 6])
    together = mini.score_many(requests, return_margin=True)
    alone = [
        mini.score(r.query, r.passages, instruction=r.instruction, ratio=r.ratio, return_margin=True) for r in requests
    ]
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want, abs=TOL)
    flat = [m for ms in together for m in ms]
    assert max(flat) - min(flat) > 1.0


def test_mini_margins_many_equals_the_training_path(mini: Reranker) -> None:
    """Rows of different queries and instructions in one call equal the decoder's training path
    (``forward_scores``: each query encoded alone, explicit per-row queries), row by row."""
    backend = mini.backend
    texts = [("capital?", "Given a query, retrieve documents."), ("How do plants make glucose from light?", "Biology.")]
    texts += [("tallest mountain on Earth", "Given a query, retrieve documents.")]
    prompts = [backend.prompt_ids(q, instruction=i, system_instruction="", max_query_tokens=64) for q, i in texts]
    entries = mini._pooled(PASSAGES)
    vectors = torch.nn.utils.rnn.pad_sequence([e.vectors for e in entries], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(e.vectors), dtype=torch.long) for e in entries], True)
    index = torch.tensor([0, 1, 2, 2, 1, 0])
    got = backend.margins_many(prompts, index, vectors, mask)
    with torch.no_grad():
        want = [
            float(
                backend.forward_scores(
                    list(prompts[int(p)].instruction),
                    [list(prompts[int(p)].query)],
                    vectors[b : b + 1],
                    mask[b : b + 1],
                )[0]
            )
            for b, p in enumerate(index)
        ]
    assert got.tolist() == pytest.approx(want, abs=TOL)


def test_a_request_asked_twice_is_scored_once(mini: Reranker) -> None:
    before = mini.counters["scored_pairs"]
    out = mini.score_many([ScoreRequest("capital?", PASSAGES), ScoreRequest("capital?", PASSAGES)], return_margin=True)
    assert out[0] == out[1]
    assert mini.counters["scored_pairs"] - before == len(PASSAGES)


def test_mini_encodes_a_repeated_query_once(mini: Reranker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-call fixed cost: a query scored again (a cascade's next stage, a retry) skips the encoder."""
    calls: list[int] = []
    real = type(mini.backend).encode_segments

    def counted(self, segments, prefix=()):
        calls.append(len(segments))
        return real(self, segments, prefix)

    mini.score("warm the instruction's states and the passages", PASSAGES[:3])
    monkeypatch.setattr(type(mini.backend), "encode_segments", counted)
    query = "Which river flows through Paris? (cache test)"
    first = mini.score(query, PASSAGES[:3], return_margin=True)
    assert len(calls) == 1  # the query, once
    again = mini.score(query, PASSAGES[:3], return_margin=True)
    assert len(calls) == 1 and again == first


def test_mini_instruction_cache_follows_the_decoder_weights(mini: Reranker) -> None:
    """The instruction's decoder keys/values are kept across calls, and recomputed once a weight changes."""
    backend = mini.backend
    query = "Which river flows through Paris?"
    before = mini.score(query, PASSAGES[:3], ratio=1, return_margin=True)
    weight = backend.decoder.layers[0].value.weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)  # an in-place update, as a training step makes
        after = mini.score(query, PASSAGES[:3], ratio=1, return_margin=True)
        prompt = backend.prompt_ids(query, instruction=mini.instruction, system_instruction="", max_query_tokens=64)
        entries = mini._pooled(PASSAGES[:3])
        vectors = torch.nn.utils.rnn.pad_sequence([e.vectors for e in entries], batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(e.vectors), dtype=torch.long) for e in entries], True)
        with torch.no_grad():
            fresh = backend.forward_scores(list(prompt.instruction), [list(prompt.query)] * 3, vectors, mask)
        assert after == pytest.approx(fresh.tolist(), abs=TOL)
        assert max(abs(a - b) for a, b in zip(after, before)) > 1e-3
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert mini.score(query, PASSAGES[:3], ratio=1, return_margin=True) == pytest.approx(before, abs=TOL)
