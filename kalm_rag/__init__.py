"""kalm-rag: FBNL reranking (KaLM-Reranker-V1) with a cached-passage store, for RAG pipelines."""

from kalm_rag._version import __version__
from kalm_rag.engine import RankedPassage, Reranker, ScoreRequest
from kalm_rag.errors import (
    InvalidInputError,
    KalmError,
    MissingDependencyError,
    ModelLoadError,
    NumericalError,
    StoreError,
)
from kalm_rag.store import PassageStore, PooledPassage

__all__ = [
    "InvalidInputError",
    "KalmError",
    "MissingDependencyError",
    "ModelLoadError",
    "NumericalError",
    "PassageStore",
    "PooledPassage",
    "RankedPassage",
    "Reranker",
    "ScoreRequest",
    "StoreError",
    "__version__",
]
