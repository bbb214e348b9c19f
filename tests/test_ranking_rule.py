"""One ranking rule (by margin) and one probability (float32 sigmoid) for every surface (issue 24 item 3)."""

from __future__ import annotations

import pytest
import torch

from kalm_rag import Reranker
from kalm_rag.scores import probabilities, rank_order
from kalm_rag.serve import batching

MARGINS = [17.0, 25.0, -3.0, 25.0]  # sigmoid(17) == sigmoid(25) == 1.0 in float32


def test_float32_sigmoid_ties_the_large_margins() -> None:
    probs = probabilities(MARGINS)
    assert probs[0] == probs[1] == 1.0  # the reason the rule exists
    assert rank_order(MARGINS) == [1, 3, 0, 2]  # by margin; the equal margins keep input order


def test_the_batcher_reports_the_same_probability() -> None:
    assert batching.probabilities is probabilities


@pytest.fixture()
def fixed_margins(tiny_checkpoint, monkeypatch):
    rr = Reranker.from_pretrained(tiny_checkpoint)
    table = {f"p{i}": m for i, m in enumerate(MARGINS)}

    def margins(self, query, texts, *, instruction, ratio):
        return torch.tensor([table[t] for t in texts], dtype=torch.float32)

    monkeypatch.setattr(Reranker, "_margins", margins)
    return rr


def test_rerank_orders_by_margin_and_reports_the_probability(fixed_margins: Reranker) -> None:
    ranked = fixed_margins.rerank("q", list(map("p{}".format, range(4))))
    assert [r.index for r in ranked] == [1, 3, 0, 2]
    assert [r.score for r in ranked] == [1.0, 1.0, 1.0, pytest.approx(float(torch.sigmoid(torch.tensor(-3.0))))]


def test_cascade_orders_each_stage_by_margin(fixed_margins: Reranker) -> None:
    ranked = fixed_margins.rerank_cascade("q", list(map("p{}".format, range(4))), stages=((4, 4), (2, 2)))
    assert [r.index for r in ranked] == [1, 3, 0, 2]
