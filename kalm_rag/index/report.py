"""What an indexing run did: :class:`IndexReport`, and :class:`IncompleteIndexError` when it did not finish."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kalm_rag.errors import StoreError

#: The keys of :meth:`IndexReport.to_dict`, in order (what ``kalm-rag index`` prints as JSON).
REPORT_KEYS = (
    "read",
    "unique",
    "already_present",
    "encoded",
    "failed",
    "seconds",
    "passages_per_s",
    "engine",
    "workers",
    "storage",
    "bytes_per_passage",
)


@dataclass(frozen=True)
class IndexReport:
    """What :func:`~kalm_rag.index.index_corpus` did.

    Attributes:
        read: passages read from the corpus (rows, after ``limit``).
        unique: distinct passage texts among them (a text repeated in the corpus is encoded once).
        already_present: distinct passages found in the store before their encoding (skipped: no encoder work),
            at the start or, after an interruption or next to another indexer, when their turn came.
        encoded: distinct passages this run encoded and stored.
        failed: distinct passages that should be in the store and are not (a store that refused or could not be
            reached, or work stopped by that failure).
        seconds: wall time of the run, reading included.
        passages_per_s: ``encoded / seconds``.
        engine: ``"local"`` or ``"ray"``.
        workers: encoder processes (1 for the local engine).
        storage: how the vectors were stored (``float32``, ``res4``, ...; ``None`` when not known).
        bytes_per_passage: mean bytes per stored passage of the whole store after the run (``None`` when not
            known, e.g. with the Ray engine).
        errors: the distinct store or worker errors met (not part of :meth:`to_dict`).

    ``unique == already_present + encoded + failed`` always holds.
    """

    read: int
    unique: int
    already_present: int
    encoded: int
    failed: int
    seconds: float
    passages_per_s: float
    engine: str
    workers: int
    errors: tuple[str, ...] = field(default=(), compare=False)
    storage: str | None = None
    bytes_per_passage: int | None = None

    @property
    def ok(self) -> bool:
        """Whether every passage of the corpus is in the store now."""
        return self.failed == 0

    def to_dict(self) -> dict[str, Any]:
        """The report as a dict with exactly the keys of :data:`REPORT_KEYS` (what the command prints)."""
        return {key: getattr(self, key) for key in REPORT_KEYS}


class IncompleteIndexError(StoreError):
    """An indexing run ended with passages not stored (``report.failed > 0``): the store refused them or a worker
    failed. Passages stored before the failure stay; rerunning the same command does only the rest.

    Attributes:
        report: the :class:`IndexReport` of the run.
    """

    def __init__(self, message: str, report: IndexReport) -> None:
        super().__init__(message)
        self.report = report


def build_report(
    *,
    read: int,
    unique: int,
    already_present: int,
    encoded: int,
    seconds: float,
    engine: str,
    workers: int,
    errors: tuple[str, ...] = (),
    storage: str | None = None,
    bytes_per_passage: int | None = None,
) -> IndexReport:
    """An :class:`IndexReport` whose ``failed`` is what the other counts leave (``unique - present - encoded``)."""
    return IndexReport(
        read=read,
        unique=unique,
        already_present=already_present,
        encoded=encoded,
        failed=max(0, unique - already_present - encoded),
        seconds=round(seconds, 3),
        passages_per_s=round(encoded / seconds, 2) if seconds > 0 else 0.0,
        engine=engine,
        workers=workers,
        errors=tuple(dict.fromkeys(errors)),
        storage=storage,
        bytes_per_passage=bytes_per_passage,
    )
