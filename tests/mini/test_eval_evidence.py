"""``kalm-rag eval evidence`` on its tiny built-in set, and its metrics on hand-made cases."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kalm_rag.cli import app
from kalm_rag.eval.evidence import EvidenceExample, evidence_metrics, load_wikiqa_evidence


def example(n_sentences: int, gold: set[int], recall: str = "any", size: int = 10) -> EvidenceExample:
    text = " ".join("x" * (size - 1) + "." for _ in range(n_sentences))
    sentences = [(i * (size + 1), i * (size + 1) + size) for i in range(n_sentences)]
    return EvidenceExample("q", "query", text, sentences, gold, recall)


def test_metrics_on_hand_made_cases():
    examples = [example(4, {0}), example(4, {2})]
    scores = [[0.9, 0.1, 0.2, 0.3], [0.9, 0.1, 0.8, 0.3]]  # first: gold is best; second: gold is second
    m = evidence_metrics(examples, scores)
    assert m["top1"] == 0.5
    assert m["recall_at_50"] == 1.0  # two of four equal sentences fit in 50%: both golds kept
    assert m["budget_at_95"] == 0.5 and m["kept_at_95"] == 0.5  # the second needs two sentences
    # "all": recall is the share of gold sentences kept
    m = evidence_metrics([example(4, {0, 3}, "all")], [[0.9, 0.5, 0.4, 0.1]])
    assert m["recall_at_50"] == 0.5 and m["kept_at_95"] == 1.0


def test_eval_evidence_runs_on_the_built_in_set(tmp_path):
    result = CliRunner().invoke(app, ["eval", "evidence", "--out", str(tmp_path), "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "evidence.json").read_text())
    methods = report["results"]["built-in"]
    assert {"first sentence", "BM25 (bm25s)", "MiniLM cosine"} <= set(methods)
    assert any(name.startswith("kalm-mini r=4") for name in methods)
    for metrics in methods.values():
        assert 0.0 <= metrics["top1"] <= 1.0 and 0.0 < metrics["kept_at_95"] <= 1.0
    assert methods["first sentence"]["top1"] == pytest.approx(0.25)  # one of the four golds is a first sentence
    assert "| kalm-mini r=4" in (tmp_path / "evidence.md").read_text()


def test_wikiqa_loader_joins_candidates(tmp_path):
    import gzip

    (tmp_path / "qrels").mkdir()
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt") as f:
        for did, text in [("d0", "Alpha one ."), ("d1", " Beta two."), ("d2", "Gamma.")]:
            f.write(json.dumps({"_id": did, "text": text}) + "\n")
    with gzip.open(tmp_path / "queries.jsonl.gz", "wt") as f:
        f.write(json.dumps({"_id": "q", "text": "beta?"}) + "\n" + json.dumps({"_id": "u", "text": "none"}) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\td0\t0\nq\td1\t1\nu\td2\t0\n")
    (tmp_path / "candidates.tsv").write_text("query-id\tcorpus-id\nq\td0\nq\td1\nu\td2\n")
    [ex] = load_wikiqa_evidence(tmp_path)  # the unanswerable question is left out
    assert [ex.text[s:e] for s, e in ex.sentences] == ["Alpha one .", "Beta two."] and ex.gold == {1}
