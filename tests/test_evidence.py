"""Evidence spans and pruning: span validity (properties), window->character mapping, the engine hook and the
T5Gemma 2 readout against transformers' own attention probabilities."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalm_rag import InvalidInputError, Reranker
from kalm_rag.errors import EvidenceUnsupportedError
from kalm_rag.evidence import (
    EvidenceSpan,
    evidence_spans,
    passage_offsets_from_prefixed,
    prune_passage,
    read_extent,
    read_sentences,
    select_sentences,
    sentence_spans,
    sentence_windows,
    window_spans,
)
from kalm_rag.models.base import FBNLBackend
from kalm_rag.padding import right_pad_vectors
from kalm_rag.pooling import repool

QUERY = "What is the capital of France?"
PASSAGES = [
    "France is in Europe. Paris is the capital of France. It lies on the Seine.",
    "Bananas are yellow.",
    "no punctuation here at all just words " * 3,
]

# ----- pure mechanics: properties --------------------------------------------------------------------

texts = st.text(alphabet=st.sampled_from(list("ab c.!?\n\t\u00e9\u65e5 ")), max_size=300)


def word_offsets(text: str) -> list[tuple[int, int]]:
    """A stand-in tokenizer: one token per run of non-space characters."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def check_valid(text: str, spans: list[EvidenceSpan], read_end: int) -> None:
    sentences = sentence_spans(text)
    starts = {s for s, _ in sentences}
    ends = {e for _, e in sentences}
    for span in spans:
        assert 0 <= span.start < span.end <= len(text)
        assert span.end <= read_end  # only what was read
        assert span.start in starts  # on sentence boundaries (the end: the sentence's or the read end)
        assert span.end in ends or span.end == read_end
        assert text[span.start] == text[span.start].strip() and text[span.end - 1] == text[span.end - 1].strip()
    assert [s.score for s in spans] == sorted((s.score for s in spans), reverse=True)  # best first
    by_start = sorted(spans, key=lambda s: s.start)
    assert all(a.end <= b.start for a, b in zip(by_start, by_start[1:]))  # no overlap, each sentence once


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=texts,
    prefix=st.integers(0, 3),
    max_tokens=st.integers(1, 80),
    ratio=st.integers(1, 32),
    data=st.data(),
)
def test_spans_are_valid_for_any_passage(text, prefix, max_tokens, ratio, data):
    offsets = ([None] * prefix + list(word_offsets(text)))[:max_tokens]  # a prefix, then the cut
    windows = window_spans(offsets, ratio)
    weights = data.draw(st.lists(st.floats(-5, 5), min_size=len(windows), max_size=len(windows)))
    spans = evidence_spans(text, windows, weights)
    read_end = read_extent(offsets)
    check_valid(text, spans, read_end)
    # every sentence that starts before the read end is there; none after it
    assert {s.start for s in spans} == {s for s, _ in sentence_spans(text) if s < read_end}


@settings(max_examples=100, deadline=None)
@given(text=texts, keep=st.floats(0.01, 1.0), data=st.data())
def test_prune_keeps_best_sentences_in_order_within_budget(text, keep, data):
    offsets = word_offsets(text)
    windows = window_spans(offsets, 2)
    weights = data.draw(st.lists(st.floats(-5, 5), min_size=len(windows), max_size=len(windows)))
    spans = evidence_spans(text, windows, weights)
    pruned, kept = prune_passage(text, spans, keep=keep)
    if not spans:
        assert (pruned, kept) == ("", [])
        return
    assert kept[0] == spans[0]  # the best sentence is always kept
    total = sum(s.end - s.start for s in spans)
    assert len(kept) == 1 or sum(s.end - s.start for s in kept) <= keep * total + 1e-6
    in_order = sorted(kept, key=lambda s: s.start)
    assert pruned == " ".join(text[s.start : s.end] for s in in_order)
    assert [s.score for s in kept] == sorted((s.score for s in kept), reverse=True)


def test_sentences_of_blank_and_unpunctuated_text():
    assert sentence_spans("") == []
    assert sentence_spans("   \n ") == []
    assert sentence_spans("  just words without an end  ") == [(2, 27)]
    assert sentence_spans("One. Two!  Three?") == [(0, 4), (5, 9), (11, 17)]


def test_window_spans_follow_mep_windows_at_the_ratio():
    # "<prefix>" position, then tokens of "ab cd. ef": windows start at position 0, like MEP pooling
    offsets = [None, (0, 2), (3, 6), (7, 9)]
    assert window_spans(offsets, 1) == [None, (0, 2), (3, 6), (7, 9)]
    assert window_spans(offsets, 2) == [(0, 2), (3, 9)]
    assert window_spans(offsets, 4) == [(0, 9)]
    assert window_spans([None, None], 4) == [None]


def test_prefixed_offsets_drop_the_prefix():
    # offsets into "<Document>: " (12 chars) + "Hi there": a prefix token, one straddling, two in the passage
    assert passage_offsets_from_prefixed([(0, 11), (11, 14), (14, 15), (15, 20)], 12, 8) == [
        None,
        (0, 2),
        (2, 3),
        (3, 8),
    ]


def test_sentence_scores_aggregate_overlapping_windows():
    text = "Aa bb. Cc dd."
    windows = [(0, 2), (3, 9), (10, 13)]  # the middle window straddles both sentences
    weights = [0.1, 0.5, 0.9]
    assert [(s.start, s.score) for s in evidence_spans(text, windows, weights)] == [(7, 0.9), (0, 0.5)]
    mean = {s.start: s.score for s in evidence_spans(text, windows, weights, aggregate="mean")}
    assert mean[0] == pytest.approx((2 * 0.1 + 3 * 0.5) / 5)  # "Aa" and "bb." share the first sentence


def test_bad_options_are_refused():
    with pytest.raises(InvalidInputError, match="weights"):
        evidence_spans("a.", [(0, 2)], [])
    for keep in (0, 1.5, True, "half"):
        with pytest.raises(InvalidInputError, match="keep"):
            select_sentences([], keep)  # type: ignore[arg-type]


# ----- the engine on the tiny T5Gemma 2 fixture -------------------------------------------------------


@pytest.fixture(scope="module")
def rr(tiny_checkpoint):
    return Reranker.from_pretrained(tiny_checkpoint, max_passage_tokens=48)


def test_evidence_does_not_change_scores(rr):
    for ratio in (1, 4):
        plain = rr.rerank(QUERY, PASSAGES, ratio=ratio)
        with_evidence = rr.rerank(QUERY, PASSAGES, ratio=ratio, evidence=True)
        assert [(p.index, p.score) for p in plain] == [(p.index, p.score) for p in with_evidence]
        assert all(p.evidence is None and p.pruned_text is None for p in plain)
        assert all(p.evidence for p in with_evidence)


def test_offsets_align_with_the_encoder_tokens(rr):
    tok = rr.backend.tokenizer
    ids = rr.backend.tokenize_passages(PASSAGES, rr.max_passage_tokens)
    offsets = rr.backend.passage_offsets(PASSAGES, rr.max_passage_tokens)
    for text, row, offs in zip(PASSAGES, ids, offsets):
        assert len(row) == len(offs)
        prefix = tok.decode([i for i, o in zip(row, offs) if o is None])
        assert prefix.strip() == "<Document>:"
        for token, off in zip(row, offs):
            if off is not None:
                assert tok.decode([token]).strip() == text[off[0] : off[1]].strip()


@pytest.mark.parametrize("ratio", [1, 2, 4, 8, 32])
def test_spans_valid_at_every_ratio_and_cut_at_max_passage_tokens(rr, ratio):
    long = "Paris is the capital of France. " * 30  # far beyond 48 tokens
    results = rr.rerank(QUERY, [*PASSAGES, long], ratio=ratio, evidence=True)
    offsets = rr.backend.passage_offsets([r.text for r in results], rr.max_passage_tokens)
    for result, offs in zip(results, offsets):
        check_valid(result.text, list(result.evidence or ()), read_extent(offs))
    cut = next(r for r in results if r.text == long)
    assert max(s.end for s in cut.evidence or ()) < len(long) // 2  # only what was read


def test_prune_returns_kept_sentences_in_order(rr):
    for result in rr.rerank(QUERY, PASSAGES, prune=0.5, ratio=2):
        spans = sorted(result.evidence or (), key=lambda s: s.start)
        assert result.pruned_text == " ".join(result.text[s.start : s.end] for s in spans)
        assert result.pruned_text
    with pytest.raises(InvalidInputError, match="prune"):
        rr.rerank(QUERY, PASSAGES, prune=0.0)
    with pytest.raises(InvalidInputError, match="evidence"):
        rr.rerank(QUERY, PASSAGES, evidence="yes")


def test_t5gemma2_readout_is_transformers_attention_averaged(rr, tiny_checkpoint):
    """The readout equals the last position's merged-attention probabilities on the passage part, as plain
    transformers (eager attention) reports them, averaged over heads and layers."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    entries = rr._pooled(PASSAGES)
    vectors, mask = right_pad_vectors([repool(e.vectors, e.counts, 2)[0] for e in entries], torch.float32)
    prompt = rr.backend.prompt_ids(
        QUERY, instruction=rr.instruction, system_instruction=rr.system_instruction, max_query_tokens=512
    )
    margins, weights = rr.backend.margins_and_window_weights(prompt, vectors, mask)
    B, T = vectors.shape[0], len(prompt)
    with torch.no_grad():
        out = model.get_decoder()(
            input_ids=torch.tensor([list(prompt.ids)] * B),
            attention_mask=torch.ones(B, T, dtype=torch.long),
            encoder_hidden_states=vectors,
            encoder_attention_mask=mask,
            output_attentions=True,
            use_cache=False,
        )
    expected = torch.stack([a[:, :, -1, :] for a in out.cross_attentions]).mean(dim=(0, 2))  # (B, W)
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(margins, rr.backend.margins(prompt, vectors, mask), rtol=0, atol=0)


def test_backend_without_readout_says_so(rr):
    class NoEvidence(FBNLBackend):
        family = "none"

        def __init__(self, inner):
            self.__dict__.update({k: getattr(inner, k) for k in ("hidden_size", "device", "dtype", "pad_token_id")})
            self.weights_id, self.inner = "none", inner

        def tokenize_passages(self, passages, max_tokens):
            return self.inner.tokenize_passages(passages, max_tokens)

        def encode(self, input_ids, attention_mask):
            return self.inner.encode(input_ids, attention_mask)

        def prompt_ids(self, query, **kwargs):
            return self.inner.prompt_ids(query, **kwargs)

        def margins(self, prompt_ids, passage_vectors, passage_mask):
            return self.inner.margins(prompt_ids, passage_vectors, passage_mask)

    plain = Reranker(NoEvidence(rr.backend))
    assert plain.rerank(QUERY, PASSAGES)  # scoring works
    with pytest.raises(EvidenceUnsupportedError):
        plain.rerank(QUERY, PASSAGES, evidence=True)


def test_cli_rerank_writes_evidence_and_pruned_text(tiny_checkpoint, tmp_path):
    import json

    from typer.testing import CliRunner

    from kalm_rag.cli import app

    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"query": QUERY, "passages": PASSAGES}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["rerank", "-i", str(requests), "-m", str(tiny_checkpoint), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--evidence"])
    assert result.exit_code == 0, result.output
    want = Reranker.from_pretrained(tiny_checkpoint).rerank(QUERY, PASSAGES, evidence=True)
    rows = json.loads(out.read_text())["results"]
    assert [r["evidence"] for r in rows] == [[s.to_dict() for s in w.evidence or ()] for w in want]
    assert all("pruned_text" not in r for r in rows)
    result = CliRunner().invoke(app, [*args, "--prune", "0.5"])
    assert result.exit_code == 0, result.output
    want = Reranker.from_pretrained(tiny_checkpoint).rerank(QUERY, PASSAGES, prune=0.5)
    assert [r["pruned_text"] for r in json.loads(out.read_text())["results"]] == [w.pruned_text for w in want]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0 and "evidence" not in out.read_text()


def test_cli_rerank_prune_mass(tiny_checkpoint, tmp_path):
    import json

    from typer.testing import CliRunner

    from kalm_rag.cli import app

    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"query": QUERY, "passages": PASSAGES}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["rerank", "-i", str(requests), "-m", str(tiny_checkpoint), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--prune-mass", "0.5"])
    assert result.exit_code == 0, result.output
    want = Reranker.from_pretrained(tiny_checkpoint).rerank(QUERY, PASSAGES, prune_mass=0.5)
    rows = json.loads(out.read_text())["results"]
    assert [r["pruned_text"] for r in rows] == [w.pruned_text for w in want]
    assert [r["evidence"] for r in rows] == [[s.to_dict() for s in w.evidence or ()] for w in want]
    out.unlink()
    both = CliRunner().invoke(app, [*args, "--prune", "0.5", "--prune-mass", "0.5"])
    assert both.exit_code == 1 and not out.exists()
    assert "Error: give --prune" in both.output and "--prune-mass" in both.output and "not both" in both.output
    zero = CliRunner().invoke(app, [*args, "--prune-mass", "0"])
    assert zero.exit_code == 1 and "prune_mass must be" in zero.output
    above = CliRunner().invoke(app, [*args, "--prune-mass", "1.5"])
    assert above.exit_code != 0 and not out.exists()


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab .!?\n", max_size=120),
    cuts=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=40),
    ratio=st.integers(min_value=1, max_value=5),
)
def test_sentence_windows_equal_the_brute_force_overlap(text, cuts, ratio):
    offsets, pos = [], 0
    for n in cuts:  # tokens in text order, some positions without text (a frame's [CLS]/[SEP])
        if pos >= len(text):
            break
        offsets.append(None if n == 6 else (pos, min(pos + n, len(text))))
        pos += n if n != 6 else 0
    windows = window_spans(offsets, ratio)
    sentences = read_sentences(text, windows)
    real = [(i, w) for i, w in enumerate(windows) if w is not None]
    expected = []
    for s, e in sentences:
        hit = [i for i, (ws, we) in real if min(e, we) - max(s, ws) > 0]
        expected.append(hit or [min(real, key=lambda item: min(abs(item[1][0] - e), abs(item[1][1] - s)))[0]])
    assert sentence_windows(sentences, windows) == expected


def test_layouts_made_while_the_decoder_reads_equal_those_made_after(rr, monkeypatch):
    import kalm_rag.engine as engine

    pool, submitted = engine._layout_pool(), []

    class Recording:
        def submit(self, fn, *args):
            submitted.append(len(args[0]))
            return pool.submit(fn, *args)

    monkeypatch.setattr(engine, "_layout_pool", lambda: Recording())
    for ratio in (1, 4):
        rr._layouts.clear()
        during = rr.rerank(QUERY, PASSAGES, ratio=ratio, evidence=True, prune_mass=0.9)  # every passage: ahead
        rr._layouts.clear()
        after = rr.rerank(QUERY, PASSAGES, ratio=ratio, evidence=True, prune_mass=0.9, top_k=2)  # the best two only
        assert during[:2] == after and all(p.evidence for p in during)
    assert submitted == [len(PASSAGES), len(PASSAGES)]  # the top_k=2 calls laid out their two passages after
