"""kalm-mini's evidence readouts: scores unchanged, the training-free readout and the trained sentence readout's
features recomputed by hand, the readout file, pruning by evidence mass, fitting."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kalm_rag import InvalidInputError, ModelLoadError, Reranker
from kalm_rag.evidence import READOUT_FILE, SentenceReadout, SentenceWindows, read_sentences
from kalm_rag.models.mini.backend import EMBEDDED_DIR
from kalm_rag.models.mini.readout import MATCH_FILE, SentenceMatch
from kalm_rag.padding import right_pad_vectors
from kalm_rag.pooling import repool
from kalm_rag.train.evidence import (
    BASE_FEATURES,
    FEATURES,
    MatchInputs,
    SentenceExample,
    _padded,
    batch_match,
    fit_match,
    fit_readout,
    top1,
    top1_with_match,
)

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
        x = torch.randn(5, len(BASE_FEATURES), generator=gen, dtype=torch.float64)
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
    x = torch.randn(6, len(BASE_FEATURES), generator=gen, dtype=torch.float64)
    x[:, 3] = 0.25  # a constant feature
    w = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    readout = SentenceReadout(BASE_FEATURES, tuple(w.tolist()))
    columns = {name: x[:, k].tolist() for k, name in enumerate(BASE_FEATURES)}
    assert readout.logits(columns) == pytest.approx((_standardised(x) @ w).tolist(), abs=1e-9)


# ----- the trained sentence match ---------------------------------------------------------------------


def _match_by_hand(match, query_states, idf, real, windows, groups):
    """The match's formula with plain loops: IDF-weighted mean over query tokens of the best cosine between the
    mapped token state and a window of the sentence."""
    P = match.proj.weight.detach().double()
    a, b = float(match.idf_scale.detach()), float(match.idf_bias.detach())
    weights = [math.log1p(math.exp(a * float(i) + b)) * float(r) for i, r in zip(idf, real)]
    total = sum(weights)
    out = []
    for group in groups:
        value = 0.0
        for t, w in enumerate(weights):
            q = P @ query_states[t].double()
            best = max(float(F.cosine_similarity(q, windows[k].double(), dim=0)) for k in group)
            value += w / total * best
        out.append(value)
    return out


def test_sentence_match_is_the_idf_weighted_best_window_cosine():
    gen = torch.Generator().manual_seed(3)
    match = SentenceMatch(8)
    with torch.no_grad():
        match.proj.weight.add_(0.3 * torch.randn(8, 8, generator=gen))
        match.idf_scale.fill_(0.7)
        match.idf_bias.fill_(-0.2)
    q, windows = torch.randn(5, 8, generator=gen), torch.randn(7, 8, generator=gen)
    idf, real = torch.tensor([0.0, 2.0, 5.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    groups = [[0, 1], [1, 2, 3], [6], [4, 5, 6]]
    got = match(q, idf, real, SentenceWindows.from_groups(windows, groups))
    assert got.tolist() == pytest.approx(_match_by_hand(match, q, idf, real, windows, groups), abs=1e-5)
    # at the identity map a sentence holding a window equal to every real token's state matches perfectly
    ident = SentenceMatch(8)
    windows[6] = q[1]
    windows[5] = q[2]
    windows[4] = q[3]
    assert float(ident(q, idf, real, SentenceWindows.from_groups(windows, groups))[3].detach()) == pytest.approx(
        1.0, abs=1e-5
    )


def test_training_batches_compute_the_match_as_inference_does():
    gen = torch.Generator().manual_seed(4)
    match = SentenceMatch(8)
    with torch.no_grad():
        match.proj.weight.add_(0.3 * torch.randn(8, 8, generator=gen))
    examples = []
    for n_tokens, n_windows, groups in ((3, 5, [[0, 1], [2, 3, 4]]), (6, 2, [[0], [0, 1], [1]])):
        inputs = MatchInputs(
            torch.randn(n_tokens, 8, generator=gen), torch.rand(n_tokens, generator=gen) * 5,
            torch.ones(n_tokens), torch.randn(n_windows, 8, generator=gen), groups,
        )  # fmt: skip
        examples.append(SentenceExample(torch.randn(len(groups), 4, dtype=torch.float64), [0], 4, inputs))
    batched = batch_match(match, _padded(examples))  # (B, S) padded
    for row, ex in zip(batched, examples):
        m = ex.match
        one = match(m.query_states, m.idf, m.real, SentenceWindows.from_groups(m.windows, m.groups))
        torch.testing.assert_close(row[: len(m.groups)], one.detach(), rtol=1e-5, atol=1e-6)


def test_fit_match_learns_a_map_that_finds_the_gold_sentence():
    gen = torch.Generator().manual_seed(5)
    d = 8

    def window(q, gold):  # a gold window shares the query token's first half, any other window its second half
        out = q.clone()
        noise = torch.randn(q.shape, generator=gen)
        part = slice(4, None) if gold else slice(0, 4)
        out[..., part] = noise[..., part]
        return out

    examples = []
    for _ in range(256):
        q = torch.randn(3, d, generator=gen)
        gold = int(torch.randint(0, 3, (1,), generator=gen))
        windows = torch.cat([window(q[:2], s == gold) for s in range(3)])  # sentence s holds windows 2s, 2s + 1
        inputs = MatchInputs(q, torch.ones(3), torch.tensor([1.0, 1.0, 0.0]), windows, [[0, 1], [2, 3], [4, 5]])
        features = torch.zeros(3, 4, dtype=torch.float64)  # the base features say nothing
        examples.append(SentenceExample(features, [gold], 4, inputs))
    untrained = top1_with_match(examples, SentenceMatch(d), torch.tensor([0, 0, 0, 0, 1.0]))
    match, weights = fit_match(examples, d, epochs=20, lr=3e-2, batch_size=64)
    assert weights.shape == (5,)
    assert top1_with_match(examples, match, weights) > 0.95 > untrained + 0.3  # the identity map sees no difference


def test_the_shipped_match_feeds_the_readout(rr):
    backend = rr.backend
    assert backend.evidence_readout.features == FEATURES and isinstance(backend.evidence_match, SentenceMatch)
    found = rr._decode_with_evidence(
        QUERY, rr._pooled(PASSAGES[:2]), instruction=rr.instruction, system_instruction="", ratio=2
    )
    layouts = rr._passage_layouts(found, [0, 1], PASSAGES[:2])
    columns = rr._sentence_columns(found, [0, 1], PASSAGES[:2], layouts)
    _, query = backend.split_prompt(found.prompt)
    h, _ = backend.encode_segments([query], prefix=[backend.cls_id])  # (1, Tq, d): afresh
    idf_table = backend.evidence_idf.idf
    special = set(backend.tokenizer.all_special_ids)
    idf = torch.tensor([0.0 if t in special else float(idf_table[t]) for t in query])
    real = torch.tensor([0.0 if t in special else 1.0 for t in query])
    for i, (layout, column) in enumerate(zip(layouts, columns)):
        expected = _match_by_hand(backend.evidence_match, h[0], idf, real, found.vectors[i], layout.groups)
        assert column["match"] == pytest.approx(expected, abs=1e-4)
    best = rr.rerank(QUERY, PASSAGES[:1], evidence=True)[0].evidence[0]
    assert PASSAGES[0][best.start : best.end] == "Paris is the capital of France."


def test_a_readout_weighing_match_without_its_file_is_refused(rr, tmp_path):
    import shutil

    for name in (READOUT_FILE, "lexical.safetensors"):
        shutil.copyfile(EMBEDDED_DIR / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="match"):
        rr.backend.load_evidence(tmp_path)
    torch.manual_seed(0)
    SentenceMatch(4).save(tmp_path)  # the wrong width
    with pytest.raises(ModelLoadError, match="sentence match"):
        rr.backend.load_evidence(tmp_path)
    shutil.copyfile(EMBEDDED_DIR / MATCH_FILE, tmp_path / MATCH_FILE)
    rr.backend.load_evidence(tmp_path)
    assert rr.backend.evidence_match is not None
    rr.backend.load_evidence(EMBEDDED_DIR)


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_engine_sentence_features_match_a_hand_computation(rr, ratio):
    texts = [PASSAGES[0], PASSAGES[2], PASSAGES[1]]
    found = rr._decode_with_evidence(
        QUERY, rr._pooled(texts), instruction=rr.instruction, system_instruction="", ratio=ratio
    )
    layouts = rr._passage_layouts(found, [0, 1, 2], texts)
    columns = rr._sentence_columns(found, [0, 1, 2], texts, layouts)
    _, query = rr.backend.split_prompt(found.prompt)
    h, m = rr.backend.encode_segments([query], prefix=[rr.backend.cls_id])
    q = (h[0] * m[0, :, None]).sum(0) / m.sum()
    for i, (layout, column) in enumerate(zip(layouts, columns)):
        weights = found.weights[i].tolist()
        counts = found.counts[i].tolist()
        assert column["attention_max"] == pytest.approx([math.log(max(weights[w] for w in g)) for g in layout.groups])
        assert column["attention_mean"] == pytest.approx(
            [math.log(sum(weights[w] for w in g) / len(g)) for g in layout.groups]
        )
        for g, cosine in zip(layout.groups, column["cosine"]):
            vector = sum(counts[w] * found.vectors[i][w] for w in g) / sum(counts[w] for w in g)
            assert cosine == pytest.approx(float(F.cosine_similarity(vector, q, dim=0)), abs=1e-5)
        assert len(column["match"]) == len(column["coverage"]) == len(layout.sentences)


def test_fit_match_refuses_to_go_on_from_a_diverged_loss():
    from kalm_rag import NumericalError

    nan_states = torch.full((2, 8), float("nan"))
    inputs = MatchInputs(nan_states, torch.ones(2), torch.ones(2), torch.randn(3, 8), [[0], [1, 2]])
    example = SentenceExample(torch.zeros(2, 4, dtype=torch.float64), [0], 4, inputs)
    with pytest.raises(NumericalError, match="lower the lr"):
        fit_match([example], 8, epochs=1)


def test_a_passage_whose_sentences_share_their_only_window_trains_without_nan():
    # at r=4 two short sentences can lie in one window: their match is equal, its variance 0
    gen = torch.Generator().manual_seed(6)
    inputs = MatchInputs(torch.randn(3, 8, generator=gen), torch.ones(3), torch.ones(3), torch.randn(1, 8), [[0], [0]])
    example = SentenceExample(torch.randn(2, 4, generator=gen, dtype=torch.float64), [1], 4, inputs)
    match, weights = fit_match([example] * 4, 8, epochs=3, batch_size=2)
    assert all(torch.isfinite(p).all() for p in match.parameters())
    assert torch.isfinite(weights).all()
