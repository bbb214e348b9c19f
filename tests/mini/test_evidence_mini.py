"""kalm-mini's evidence readouts: scores unchanged, the training-free readout and the trained sentence readout's
features recomputed by hand, the readout file, pruning by evidence mass, fitting."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kalm_rag import InvalidInputError, ModelLoadError, Reranker
from kalm_rag.evidence import READOUT_FILE, SentenceReadout, read_sentences
from kalm_rag.models.mini.backend import EMBEDDED_DIR
from kalm_rag.padding import right_pad_vectors
from kalm_rag.pooling import repool
from kalm_rag.train.evidence import FEATURES, SentenceExample, fit_readout, top1

QUERY = "What is the capital of France?"
PASSAGES = [
    "France is in Europe. Paris is the capital of France. It lies on the Seine.",
    "Bananas are yellow. They grow in warm places.",
    "Berlin is the capital of Germany. " * 40,  # past one 256-position encoder window
]


@pytest.fixture(scope="module")
def rr():
    return Reranker.from_pretrained("kalm-mini", device="cpu", dtype="float32", base_ratio=1, storage="float32")


@pytest.mark.parametrize("ratio", [1, 4, 16])
def test_scores_are_identical_with_evidence(rr, ratio):
    plain = rr.rerank(QUERY, PASSAGES, ratio=ratio)
    with_evidence = rr.rerank(QUERY, PASSAGES, ratio=ratio, evidence=True, prune=0.5)
    assert [(p.index, p.score) for p in plain] == [(p.index, p.score) for p in with_evidence]
    for r in with_evidence:
        assert r.evidence and all(0 <= s.start < s.end <= len(r.text) for s in r.evidence)


def test_offsets_follow_the_windowed_framing(rr):
    ids = rr.backend.tokenize_passages(PASSAGES, 300)
    offsets = rr.backend.passage_offsets(PASSAGES, 300)
    tok = rr.backend.tokenizer
    for text, row, offs in zip(PASSAGES, ids, offsets):
        assert len(row) == len(offs)
        for token, off in zip(row, offs):
            if off is None:
                assert token in (tok.cls_token_id, tok.sep_token_id)
            else:  # the (uncased) word piece of the text at that span
                assert tok.decode([token]).removeprefix("##") == text[off[0] : off[1]].lower()


def test_training_free_readout_is_the_relevance_attention_averaged(rr):
    backend = rr.backend
    entries = rr._pooled(PASSAGES[:2])
    vectors, mask = right_pad_vectors([repool(e.vectors, e.counts, 2)[0] for e in entries], torch.float32)
    prompt = backend.prompt_ids(QUERY, instruction=rr.instruction, system_instruction="", max_query_tokens=128)
    _, weights = backend.margins_and_window_weights(prompt, vectors, mask)
    _, query = backend.split_prompt(prompt)
    h_query, _ = backend.encode_segments([query], prefix=[backend.cls_id])  # (1, Tq, d)
    rel = backend.decoder.relevance
    summary = (vectors * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
    keys = F.normalize(rel.key(torch.cat([summary, vectors], 1)), dim=-1)  # (B, 1+W, d)
    q = F.normalize(rel.query(h_query), dim=-1)  # (1, Tq, d)
    logits = rel.temperature * (q @ keys.transpose(1, 2))  # (B, Tq, 1+W)
    logits = logits.masked_fill(~torch.cat([torch.ones_like(mask[:, :1]), mask], 1).bool()[:, None], -torch.inf)
    sink = rel.sink.expand(logits.shape[0], logits.shape[1], 1)
    attn = torch.softmax(torch.cat([sink, logits], -1), -1)[..., 2:]  # sink and summary dropped
    expected = attn.mean(dim=1).masked_fill(~mask.bool(), -torch.inf)
    torch.testing.assert_close(weights, expected.detach(), rtol=1e-5, atol=1e-6)


def test_the_shipped_readout_and_its_idf_are_loaded(rr):
    readout = rr.backend.evidence_readout
    assert readout is not None and readout.features == FEATURES
    assert rr.backend.evidence_idf is not None
    assert readout == SentenceReadout.load(EMBEDDED_DIR)


def test_readout_file_round_trip_and_damage(tmp_path):
    readout = SentenceReadout(("a", "b"), (0.5, -1.25), {"data": "x"})
    readout.save(tmp_path)
    assert SentenceReadout.load(tmp_path) == readout
    assert SentenceReadout.load(tmp_path / "none") is None
    for body in ("{not json", json.dumps({"features": ["a"], "weights": [1.0, 2.0]}), json.dumps({"weights": []})):
        (tmp_path / READOUT_FILE).write_text(body)
        with pytest.raises(ModelLoadError):
            SentenceReadout.load(tmp_path)


def test_readout_logits_standardise_each_feature_within_the_passage():
    readout = SentenceReadout(("a", "b", "c"), (2.0, -1.0, 3.0))
    columns = {"a": [1.0, 2.0, 6.0], "b": [0.0, 4.0, 2.0], "c": [5.0, 5.0, 5.0]}  # c is constant: says nothing
    expected = [0.0, 0.0, 0.0]
    for name, w in (("a", 2.0), ("b", -1.0)):
        xs = columns[name]
        mean = sum(xs) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 3)
        expected = [e + w * (x - mean) / std for e, x in zip(expected, xs)]
    assert readout.logits(columns) == pytest.approx(expected)
    probs = readout.probabilities(columns)
    assert sum(probs) == pytest.approx(1.0)
    assert probs == pytest.approx([math.exp(x) / sum(math.exp(y) for y in expected) for x in expected])
    with pytest.raises(InvalidInputError, match="missing"):
        readout.logits({"a": [1.0], "b": [2.0]})


def test_evidence_scores_are_shares_and_features_match_a_hand_computation(rr):
    ranked = rr.rerank(QUERY, PASSAGES[:2], evidence=True, ratio=4)
    for r in ranked:
        assert sum(s.score for s in r.evidence) == pytest.approx(1.0)
    top = next(r for r in ranked if r.index == 0)
    best = top.evidence[0]
    assert top.text[best.start : best.end] == "Paris is the capital of France."
    # the coverage feature by hand: the share of the query's word-piece IDF found in each sentence
    tok, idf = rr.backend.tokenizer, rr.backend.evidence_idf.idf
    q = set(tok(QUERY, add_special_tokens=False)["input_ids"])
    sentences = ["France is in Europe.", "Paris is the capital of France.", "It lies on the Seine."]
    expected = [
        sum(float(idf[t]) for t in q & set(tok(s, add_special_tokens=False)["input_ids"]))
        / sum(float(idf[t]) for t in q)
        for s in sentences
    ]
    prompt = rr.backend.prompt_ids(QUERY, instruction=rr.instruction, system_instruction="", max_query_tokens=128)
    got = rr.backend.sentence_columns(prompt, sentences, torch.randn(3, rr.backend.hidden_size))
    assert got["coverage"] == pytest.approx(expected, rel=1e-5)
    assert expected[1] > expected[2]  # "capital" and "France" are in the second sentence only


def test_cosine_feature_is_the_encoder_cosine_of_the_query_and_the_sentence_vector(rr):
    backend = rr.backend
    prompt = backend.prompt_ids(QUERY, instruction=rr.instruction, system_instruction="", max_query_tokens=128)
    _, query = backend.split_prompt(prompt)
    h, m = backend.encode_segments([query], prefix=[backend.cls_id])  # (1, Tq, d): computed afresh
    q = (h[0] * m[0, :, None]).sum(0) / m.sum()
    vectors = torch.randn(2, backend.hidden_size)
    got = backend.sentence_columns(prompt, ["a b", "c"], vectors)["cosine"]
    assert got == pytest.approx(F.cosine_similarity(vectors, q[None], dim=-1).tolist(), rel=1e-5, abs=1e-6)


def test_prune_mass_keeps_the_fewest_best_sentences_holding_that_share(rr):
    full = rr.rerank(QUERY, PASSAGES[:1], evidence=True)[0].evidence
    for mass in (0.3, 0.9, 1.0):
        r = rr.rerank(QUERY, PASSAGES[:1], prune_mass=mass)[0]
        n = next(k for k in range(1, len(full) + 1) if sum(s.score for s in full[:k]) >= mass - 1e-9)
        assert [(s.start, s.end) for s in r.evidence] == [(s.start, s.end) for s in full[:n]]
        in_order = sorted(r.evidence, key=lambda s: s.start)
        assert r.pruned_text == " ".join(r.text[s.start : s.end] for s in in_order)
    with pytest.raises(ValueError, match="not both"):
        rr.rerank(QUERY, PASSAGES[:1], prune=0.5, prune_mass=0.5)
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="prune_mass"):
            rr.rerank(QUERY, PASSAGES[:1], prune_mass=bad)


def test_fit_readout_recovers_which_feature_carries_the_label():
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(300):  # the gold sentence is the one with the largest third feature, plus noise elsewhere
        x = torch.randn(5, len(FEATURES), generator=gen, dtype=torch.float64)
        examples.append(SentenceExample(x, [int(x[:, 2].argmax())], 4))
    w = fit_readout(examples)
    assert int(w.abs().argmax()) == 2 and w[2] > 0
    assert top1(examples, w) > 0.95
    assert top1(examples, torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)) < 0.5


def test_kept_passage_layouts_give_the_same_evidence_and_stay_bounded(rr, monkeypatch):
    import kalm_rag.engine as engine

    def spans(results):
        return [(r.index, [(s.start, s.end, s.score) for s in r.evidence]) for r in results]

    rr._layouts.clear()
    cold = spans(rr.rerank(QUERY, PASSAGES, evidence=True, ratio=2))
    monkeypatch.setattr(engine, "LAYOUT_CACHE_SIZE", 2)
    warm = spans(rr.rerank(QUERY, PASSAGES, evidence=True, ratio=2))
    assert warm == cold
    assert len(rr._layouts) == 2  # the least recently used passage was dropped
    layout = next(iter(rr._layouts.values()))
    assert layout.member.shape == (len(layout.sentences), len(layout.windows))
    # what was kept equals what the tokenizer and the splitter give afresh
    text = PASSAGES[1]
    kept = rr._layouts[(engine.passage_key(text), 2)]
    windows = engine.window_spans(rr.backend.passage_offsets([text], rr.max_passage_tokens)[0], 2)
    assert kept.windows == windows
    assert kept.sentences == read_sentences(text, windows)


def test_sentence_pieces_come_from_the_passage_tokenisation(rr):
    found = rr._decode_with_evidence(
        QUERY, rr._pooled(PASSAGES[:1]), instruction=rr.instruction, system_instruction="", ratio=1
    )
    rr._layouts.clear()
    layout = rr._passage_layouts(found, [0], PASSAGES[:1])[0]
    tok = rr.backend.tokenizer
    expected = [tok(PASSAGES[0][s:e], add_special_tokens=False)["input_ids"] for s, e in layout.sentences]
    assert layout.pieces == expected
    texts = [PASSAGES[0][s:e] for s, e in layout.sentences]
    vectors = torch.randn(len(texts), rr.backend.hidden_size)
    from_passage = rr.backend.sentence_columns(found.prompt, texts, vectors, pieces=layout.pieces)
    from_text = rr.backend.sentence_columns(found.prompt, texts, vectors)
    assert from_passage == from_text


def test_evidence_from_many_threads_with_tiny_caches_equals_one_thread(rr, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import kalm_rag.engine as engine

    texts = [f"Sentence {i} is about topic {i}. Paris is the capital of France number {i}." for i in range(12)]

    def evidence(i):
        r = rr.rerank(QUERY, texts[i : i + 3], evidence=True, ratio=2)
        return [(x.index, [(s.start, s.end, round(s.score, 6)) for s in x.evidence]) for x in r]

    expected = [evidence(i) for i in range(10)]
    monkeypatch.setattr(engine, "LAYOUT_CACHE_SIZE", 2)  # entries come and go under every thread
    rr._layouts.clear()
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(evidence, [i % 10 for i in range(60)]))
    assert got == [expected[i % 10] for i in range(60)]
    assert len(rr._layouts) <= 2


def test_training_standardises_features_as_the_shipped_readout_does():
    from kalm_rag.train.evidence import _standardised

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, len(FEATURES), generator=gen, dtype=torch.float64)
    x[:, 3] = 0.25  # a constant feature
    w = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    readout = SentenceReadout(FEATURES, tuple(w.tolist()))
    columns = {name: x[:, k].tolist() for k, name in enumerate(FEATURES)}
    assert readout.logits(columns) == pytest.approx((_standardised(x) @ w).tolist(), abs=1e-9)
