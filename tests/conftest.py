"""Shared fixtures: tiny random T5Gemma 2 checkpoints built once per test session (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kalm_rag.bench.checkpoints import make_random_t5gemma2


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random T5Gemma2ForConditionalGeneration with a tiny Gemma-like tokenizer."""
    return make_random_t5gemma2(tmp_path_factory.mktemp("tiny") / "ckpt", shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny checkpoint with other random weights (same shape and tokenizer)."""
    return make_random_t5gemma2(tmp_path_factory.mktemp("tiny_b") / "ckpt", shape="tiny", seed=1)
