"""kalm-rag: FBNL reranking (KaLM-Reranker-V1) with a cached-passage store, for RAG pipelines."""

from kalm_rag._version import __version__
from kalm_rag.engine import EncodeReport, RankedPassage, Reranker, ScoreRequest
from kalm_rag.errors import (
    EvidenceUnsupportedError,
    InvalidInputError,
    KalmError,
    MissingDependencyError,
    ModelLoadError,
    NotStoredError,
    NumericalError,
    ReadOnlyOptionError,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
)
from kalm_rag.evidence import EvidenceSpan
from kalm_rag.store import PassageStore, PooledPassage

__all__ = [
    "EncodeReport",
    "EvidenceSpan",
    "EvidenceUnsupportedError",
    "InvalidInputError",
    "KalmError",
    "MissingDependencyError",
    "ModelLoadError",
    "NotStoredError",
    "NumericalError",
    "PassageStore",
    "PooledPassage",
    "RankedPassage",
    "ReadOnlyOptionError",
    "Reranker",
    "ScoreRequest",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
    "__version__",
]
