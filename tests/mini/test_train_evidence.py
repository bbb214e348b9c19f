"""`kalm-rag train evidence` end to end on a tiny SQuAD-format folder built here (no ../shared needed)."""

from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

from kalm_rag import Reranker
from kalm_rag.cli import app
from kalm_rag.eval.evidence import builtin_examples
from kalm_rag.evidence import SentenceReadout
from kalm_rag.models.mini.backend import EMBEDDED_DIR
from kalm_rag.models.mini.readout import SentenceMatch
from kalm_rag.train.evidence import FEATURES, squad_questions


def _write_jsonl_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture()
def squad_dir(tmp_path):
    """``squad/train`` in the shared BEIR layout: one paragraph per built-in example, its answer sentence as the
    answer string (four questions per paragraph, so a held-out split by paragraph exists).
    """
    folder = tmp_path / "data" / "squad" / "train"
    folder.mkdir(parents=True)
    corpus, queries = [], []
    for p, ex in enumerate(builtin_examples()):
        pid = f"train-a{p}-p0"
        corpus.append({"_id": pid, "title": "", "text": ex.text})
        gold = sorted(ex.gold)[0]
        s, e = ex.sentences[gold]
        answer = ex.text[s:e].split()[-1].strip(".")
        for k in range(4):
            queries.append({"_id": f"squad-{pid}-{k}", "text": ex.query, "answers": [answer]})
    _write_jsonl_gz(folder / "corpus.jsonl.gz", corpus)
    _write_jsonl_gz(folder / "queries.jsonl.gz", queries)
    return tmp_path / "data"


def test_squad_questions_label_the_sentence_holding_the_answer(squad_dir):
    rows = squad_questions(squad_dir / "squad" / "train", 100, seed=0)
    assert rows, "no question kept"
    by_text = {ex.text: ex for ex in builtin_examples()}
    for _query, text, gold in rows:
        assert gold == sorted(by_text[text].gold)


def test_train_evidence_writes_a_readout_the_backend_loads(squad_dir, tmp_path):
    out = tmp_path / "readout"
    result = CliRunner().invoke(
        app,
        ["train", "evidence", "--data-dir", str(squad_dir), "--out", str(out), "--questions", "10",
         "--held-out", "3", "--ratios", "1,4", "--idf", str(EMBEDDED_DIR), "--epochs", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    readout = SentenceReadout.load(out)
    assert readout is not None and readout.features == FEATURES
    assert (out / "lexical.safetensors").read_bytes() == (EMBEDDED_DIR / "lexical.safetensors").read_bytes()
    report = json.loads((out / "evidence_training.json").read_text())
    assert report["ratios"] == [1, 4] and report["questions"] == 10 and report["examples"] > 0
    assert report["epochs"] == 1
    assert list(report["weights"]) == list(readout.weights)
    # the folder's readout and match load into kalm-mini and give evidence
    rr = Reranker.from_pretrained("kalm-mini", device="cpu")
    try:
        rr.backend.load_evidence(out)
        assert isinstance(rr.backend.evidence_match, SentenceMatch)
        assert rr.backend.evidence_readout == readout
        ex = builtin_examples()[0]
        spans = rr.rerank(ex.query, [ex.text], evidence=True)[0].evidence
        assert sum(s.score for s in spans) == pytest.approx(1.0)
    finally:
        rr.backend.load_evidence(EMBEDDED_DIR)


def test_train_evidence_refuses_bad_ratios(squad_dir, tmp_path):
    result = CliRunner().invoke(
        app, ["train", "evidence", "--data-dir", str(squad_dir), "--out", str(tmp_path / "o"), "--ratios", "1,x"]
    )
    assert result.exit_code != 0 and "ratios" in result.output
