"""kalm-rag eval: resumable runs never mix scores of two models; metrics come from ranx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kalm_rag.eval.data import BeirDataset
from kalm_rag.eval.run import metrics, read_run, rerank_all

DS = BeirDataset("toy", {"d1": "alpha", "d2": "beta", "d3": "gamma"}, {"q1": "alpha?", "q2": "beta?"},
                 {"q1": {"d1": 1}, "q2": {"d2": 1}}, None, ["d1", "d2", "d3"])
CANDS = {"q1": ["d1", "d2", "d3"], "q2": ["d1", "d2", "d3"]}


class CountingScorer:
    """Scores a passage by a fixed table; counts calls."""

    def __init__(self, identity: str, table: dict[str, float]) -> None:
        self.identity, self.table, self.calls = identity, table, 0

    def __call__(self, query: str, passages: list[str]) -> list[float]:
        self.calls += 1
        return [self.table[p] for p in passages]


def test_a_run_resumes_for_the_same_model_and_restarts_for_another(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    first = CountingScorer("model-a", {"alpha": 1.0, "beta": 0.5, "gamma": 0.0})
    run = rerank_all("m", first, DS, CANDS, out)
    assert first.calls == 2 and read_run(out)[0] == "model-a"

    again = CountingScorer("model-a", {"alpha": 9.0, "beta": 9.0, "gamma": 9.0})
    assert rerank_all("m", again, DS, CANDS, out) == run and again.calls == 0  # resumed, nothing rescored

    other = CountingScorer("model-b", {"alpha": 0.0, "beta": 2.0, "gamma": 1.0})
    rerun = rerank_all("m", other, DS, CANDS, out)
    assert other.calls == 2 and rerun["q1"]["d2"] == 2.0 and read_run(out)[0] == "model-b"


def test_a_run_file_without_identity_is_not_trusted(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    out.write_text(json.dumps({"q1": {"d1": 5.0}, "q2": {"d1": 5.0}}))  # the old format: scores only
    scorer = CountingScorer("model-a", {"alpha": 1.0, "beta": 0.5, "gamma": 0.0})
    rerank_all("m", scorer, DS, CANDS, out)
    assert scorer.calls == 2


def test_metrics_rank_the_judged_document() -> None:
    perfect = {"q1": {"d1": 1.0, "d2": 0.0}, "q2": {"d2": 1.0, "d1": 0.0}}
    worst = {"q1": {"d1": 0.0, "d2": 1.0, "d3": 2.0}, "q2": {"d2": 0.0, "d1": 1.0, "d3": 2.0}}
    assert metrics(DS.qrels, perfect)["ndcg@10"] == pytest.approx(1.0)
    assert metrics(DS.qrels, worst)["mrr@10"] == pytest.approx(1 / 3)
