"""kalm-rag eval: resumable runs never mix scores of two models; metrics follow trec_eval (pytrec_eval)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kalm_rag.data import BeirDataset
from kalm_rag.eval.run import metrics, read_run, rerank_all

DS = BeirDataset(
    "toy",
    {"d1": "alpha", "d2": "beta", "d3": "gamma"},
    {"q1": "alpha?", "q2": "beta?"},
    {"q1": {"d1": 1}, "q2": {"d2": 1}},
    None,
    ["d1", "d2", "d3"],
)
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


def test_metrics_equal_a_hand_computed_reference() -> None:
    # q1: grades d1=2, d2=1; ranked d3 > d1 > d2 (d3 unjudged)
    #     DCG = 2/log2(3) + 1/log2(4); IDCG = 2/log2(2) + 1/log2(3); RR = 1/2
    # q2: grade d5=1, ranked 11th behind ten unjudged documents: nDCG@10 = 0 and RR@10 = 0 (RR would be 1/11)
    # q3: judged, absent from the run: counts as 0; q4: no positive judgement: left out of the mean
    qrels = {"q1": {"d1": 2, "d2": 1, "d9": 0}, "q2": {"d5": 1}, "q3": {"d1": 1}, "q4": {"d1": 0}}
    run = {
        "q1": {"d3": 3.0, "d1": 2.0, "d2": 1.0},
        "q2": {**{f"x{i:02d}": 10.0 - i / 100 for i in range(10)}, "d5": 0.5},
    }
    ndcg_q1 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3))
    got = metrics(qrels, run)
    assert got["ndcg@10"] == pytest.approx(ndcg_q1 / 3, abs=1e-6)
    assert got["mrr@10"] == pytest.approx(0.5 / 3, abs=1e-6)


def test_metrics_break_score_ties_like_trec_eval() -> None:
    # equal scores: trec_eval ranks by document id, descending ("b" before "a")
    assert metrics({"q": {"a": 1}}, {"q": {"a": 1.0, "b": 1.0}})["mrr@10"] == pytest.approx(0.5)
    assert metrics({"q": {"b": 1}}, {"q": {"a": 1.0, "b": 1.0}})["mrr@10"] == pytest.approx(1.0)
