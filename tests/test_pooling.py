"""MEP pooling against a naive loop, and exact re-pooling against pooling from scratch."""

from __future__ import annotations

import pytest
import torch

from kalm_rag.pooling import mep_pool, repool


def naive_pool(states: torch.Tensor, n_real: int, ratio: int) -> torch.Tensor:
    real = states[:n_real]
    return torch.stack([real[s : s + ratio].mean(dim=0) for s in range(0, n_real, ratio)])


@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 7, 8, 32])
def test_mep_pool_matches_a_naive_loop_with_padding(ratio):
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 5)
    lengths = [37, 20, 1]
    mask = torch.zeros(3, 37, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    pooled, counts = mep_pool(hidden, mask, ratio)
    assert pooled.shape == (3, -(-37 // ratio), 5)
    for row, n in enumerate(lengths):
        want = naive_pool(hidden[row], n, ratio)
        W = want.shape[0]
        assert torch.allclose(pooled[row, :W], want, atol=1e-6)
        assert counts[row, :W].sum().item() == n
        assert (counts[row, W:] == 0).all()  # windows with no real token are marked empty


@pytest.mark.parametrize("base, factor", [(1, 2), (1, 4), (1, 32), (2, 2), (4, 4), (2, 3)])
def test_repool_equals_pooling_from_scratch(base, factor):
    torch.manual_seed(1)
    n = 53
    states = torch.randn(n, 8)
    mask = torch.ones(1, n, dtype=torch.long)
    fine, fine_counts = mep_pool(states.unsqueeze(0), mask, base)
    derived, derived_counts = repool(fine[0], fine_counts[0], factor)
    direct, direct_counts = mep_pool(states.unsqueeze(0), mask, base * factor)
    assert torch.allclose(derived, direct[0], atol=1e-5)
    assert torch.equal(derived_counts, direct_counts[0])


def test_bad_ratio_is_refused():
    with pytest.raises(ValueError):
        mep_pool(torch.zeros(1, 2, 3), torch.ones(1, 2), 0)
