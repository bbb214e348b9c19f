"""Fixtures of the framework adapter tests (here and in each integrations/*/tests): a tiny random checkpoint,
a fresh store and reranker per test. The conftest.py files import them.

Every test that counts encoder work uses its own store object, so that what other tests cached (the
adapters share stores by URL within a process) cannot turn a miss into a hit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# no network from tests: Haystack would otherwise try to send usage telemetry
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

from kalm_rag import Reranker  # noqa: E402
from kalm_rag.bench.checkpoints import make_random_t5gemma2  # noqa: E402
from kalm_rag.store import MemoryStore  # noqa: E402


@pytest.fixture(scope="session")
def kalm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random KaLM-style T5Gemma 2 checkpoint (about 1 MB, built once per session)."""
    return make_random_t5gemma2(tmp_path_factory.mktemp("kalm") / "ckpt", shape="tiny", seed=0)


@pytest.fixture
def store() -> MemoryStore:
    """A store of this test only."""
    return MemoryStore()


@pytest.fixture
def reranker(kalm_checkpoint: Path, store: MemoryStore) -> Iterator[Reranker]:
    """A reranker on the test's store; ``batch_size=64`` so that every call here is one batch."""
    rr = Reranker.from_pretrained(kalm_checkpoint, store=store, batch_size=64)
    yield rr
    rr.close()
