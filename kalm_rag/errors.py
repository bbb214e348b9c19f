"""Exceptions raised by kalm-rag. Every error the library raises on purpose is a ``KalmError``.

The tree (a class is also the built-in exception named after it, so existing ``except`` clauses keep working)::

    KalmError
    ├── InvalidInputError (ValueError)        a query, passage or option is refused
    │   └── StoreConfigError (also StoreError) a store URL or store option is refused, when the store is opened
    ├── ReadOnlyOptionError (AttributeError)  an option that shapes stored vectors was assigned after construction
    ├── ModelLoadError                        a checkpoint cannot be found, read or trusted
    ├── NumericalError (FloatingPointError)   the model produced non-finite values
    ├── StoreError                            the store failed and recomputing cannot help
    │   ├── StoreUnavailableError             the store cannot be reached now (Redis down, hung or skipped)
    │   └── NotStoredError                    Reranker.encode(strict=True): passages were encoded but not stored
    ├── MissingDependencyError (ImportError)  an optional dependency is missing; the message names the extra
    └── EvidenceUnsupportedError (NotImplementedError)  the model cannot say which sentences made a passage relevant
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a leaf module like this one: errors never import the engine
    from kalm_rag.reports import EncodeReport


class KalmError(Exception):
    """Base class of every error raised on purpose by kalm-rag."""


class InvalidInputError(KalmError, ValueError):
    """A query, passage or option is not acceptable (empty, wrong type, out of range)."""


class ReadOnlyOptionError(KalmError, AttributeError):
    """An option that shapes stored vectors was assigned after the reranker was built.

    Such options are part of the store namespace; changing one in place would file differently encoded
    vectors under the old key. Build another :class:`~kalm_rag.Reranker` instead.
    """


class ModelLoadError(KalmError):
    """A checkpoint could not be found or loaded, is not a usable FBNL reranker, or asks to run its own code."""


class NumericalError(KalmError, FloatingPointError):
    """The model produced a non-finite score or passage vector (usually a dtype that overflows)."""


class StoreError(KalmError):
    """The passage store failed in a way that cannot be recovered by recomputing."""


class StoreConfigError(StoreError, InvalidInputError):
    """A store URL, URL parameter or store option is refused (raised when the store is opened, never later).

    It is both a :class:`StoreError` and an :class:`InvalidInputError` (hence a ``ValueError``).
    """


class StoreUnavailableError(StoreError):
    """The store cannot be reached right now: a Redis server that is down, hung, refuses the credentials,
    or is being skipped for a back-off period after such a failure.

    Query-time scoring never lets it through (it recomputes instead); writes raise it, so that indexing
    with :meth:`Reranker.encode` can tell that nothing was stored.
    """


class NotStoredError(StoreError):
    """:meth:`Reranker.encode` (``strict=True``) encoded passages that the store did not keep.

    Attributes:
        report: the :class:`~kalm_rag.EncodeReport` of the call (how many were encoded, stored, not stored).
    """

    def __init__(self, message: str, report: EncodeReport) -> None:
        super().__init__(message)
        self.report = report


class MissingDependencyError(KalmError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra to install."""


class EvidenceUnsupportedError(KalmError, NotImplementedError):
    """The model backend has no evidence readout (``Reranker.rerank(..., evidence=True)`` or ``prune=``)."""
