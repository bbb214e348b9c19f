"""kalm-rag: FBNL reranking (KaLM-Reranker-V1) with a cached-passage store, for RAG pipelines.

The public names are imported on first use (PEP 562), so that ``import kalm_rag.cli`` or ``kalm-rag --help``
does not load torch; ``from kalm_rag import Reranker`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kalm_rag._version import __version__
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
from kalm_rag.reports import EncodeReport

if TYPE_CHECKING:
    from kalm_rag.engine import RankedPassage, Reranker, ScoreRequest
    from kalm_rag.evidence import EvidenceSpan
    from kalm_rag.store import PassageStore, PooledPassage

#: Public names whose modules import torch: loaded when first asked for.
_LAZY = {
    "EvidenceSpan": "kalm_rag.evidence",
    "RankedPassage": "kalm_rag.engine",
    "Reranker": "kalm_rag.engine",
    "ScoreRequest": "kalm_rag.engine",
    "PassageStore": "kalm_rag.store",
    "PooledPassage": "kalm_rag.store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'kalm_rag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
