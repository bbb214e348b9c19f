"""Exceptions raised by kalm-rag. Every error the library raises on purpose is a ``KalmError``."""

from __future__ import annotations


class KalmError(Exception):
    """Base class of every error raised on purpose by kalm-rag."""


class InvalidInputError(KalmError, ValueError):
    """A query, passage or option is not acceptable (empty, wrong type, out of range)."""


class ModelLoadError(KalmError):
    """A checkpoint could not be loaded or is not a usable FBNL reranker."""


class NumericalError(KalmError, FloatingPointError):
    """The model produced a non-finite score (usually a dtype that overflows)."""


class StoreError(KalmError):
    """The passage store failed in a way that cannot be recovered by recomputing."""


class MissingDependencyError(KalmError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra to install."""
