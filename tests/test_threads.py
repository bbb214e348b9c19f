"""``KALM_RAG_THREADS`` fixes torch's intra-op threads when a model is loaded (issue 26, threads under contention)."""

from __future__ import annotations

import pytest
import torch

from kalm_rag import InvalidInputError, Reranker
from kalm_rag.threads import THREADS_ENV, configured_threads


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_loading_a_model_applies_the_variable(tiny_checkpoint, monkeypatch, restore_threads) -> None:
    torch.set_num_threads(2)
    monkeypatch.setenv(THREADS_ENV, "1")
    Reranker.from_pretrained(tiny_checkpoint)
    assert torch.get_num_threads() == 1


def test_unset_leaves_torch_alone(tiny_checkpoint, monkeypatch, restore_threads) -> None:
    torch.set_num_threads(2)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    Reranker.from_pretrained(tiny_checkpoint)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_value_is_refused_naming_the_variable(monkeypatch, value) -> None:
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(InvalidInputError, match=THREADS_ENV):
        configured_threads()
