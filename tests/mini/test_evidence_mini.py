"""kalm-mini's evidence readouts: scores unchanged, the training-free readout recomputed by hand, the head file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kalm_rag import ModelLoadError, Reranker
from kalm_rag.models.mini.backend import EMBEDDED_DIR
from kalm_rag.models.mini.evidence_head import HEAD_FILE, EvidenceHead, load_evidence_head
from kalm_rag.padding import right_pad_vectors
from kalm_rag.pooling import repool

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
    head, backend.evidence_head = backend.evidence_head, None
    try:
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
    finally:
        backend.evidence_head = head


def test_head_file_round_trip_and_damage(tmp_path):
    head = EvidenceHead(hidden_size=384, rank=8, mlp_hidden=4, token_rank=4)
    head.save(tmp_path)
    loaded = load_evidence_head(tmp_path)
    assert loaded is not None
    for key, value in head.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert load_evidence_head(tmp_path / "none") is None
    (tmp_path / HEAD_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="evidence head"):
        load_evidence_head(tmp_path)


def test_shipped_head_is_loaded_when_present(rr):
    assert (rr.backend.evidence_head is not None) == (EMBEDDED_DIR / HEAD_FILE).is_file()


def test_untrained_head_ranks_windows_as_the_training_free_readout():
    """The head starts at the readout: log(readout) + a zero MLP correction + small bilinear terms."""
    from kalm_rag.models.mini.evidence_head import relevance_readout, window_features

    torch.manual_seed(0)
    B, T, W, d = 2, 5, 7, 384
    attn = torch.softmax(torch.randn(B, T, 1 + W + 1), dim=-1)[..., 1:]  # a sink dropped: rows sum below 1
    probe = {"relevance_logits": torch.randn(B, T, 1 + W), "relevance_attention": attn}
    mask = torch.ones(B, T)
    head = EvidenceHead(hidden_size=d, token_rank=8)
    with torch.no_grad():
        logits = head(window_features(probe, mask), torch.randn(B, T, d), mask, torch.randn(B, W, d))
    torch.testing.assert_close(logits, torch.log(relevance_readout(probe, mask)))
