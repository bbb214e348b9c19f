"""The report of :meth:`Reranker.encode`, at the bottom of the import graph.

It lives here rather than in the engine so that :mod:`kalm_rag.errors` (whose ``NotStoredError`` carries one)
never imports the engine: the lowest layers know nothing of the layers above them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodeReport:
    """What :meth:`Reranker.encode` did with the passages it was given.

    Attributes:
        passages: distinct passages asked for (a text given twice counts once).
        already_present: distinct passages the store already held (skipped: no encoder work).
        encoded: distinct passages this call ran through the encoder.
        stored: encoded passages the store kept.
        not_stored: passages this call should have stored but did not: the store refused or could not be
            reached (full disk, read-only file, Redis down, hung or full), or, with ``strict=True``, passages
            left unencoded after such a failure.
        errors: the distinct store errors met, as messages (passwords masked).

    ``passages == already_present + stored + not_stored`` always holds, and ``ok`` is ``not_stored == 0``.
    ``int(report)`` is ``encoded``, the number ``encode`` returned in kalm-rag 0.2. Reports add up
    (``total = first + second``), for a bulk indexer that encodes in chunks.

    Example:
        >>> EncodeReport(passages=3, already_present=1, encoded=2, stored=2)
        EncodeReport(passages=3, already_present=1, encoded=2, stored=2, not_stored=0, errors=())
    """

    passages: int = 0
    already_present: int = 0
    encoded: int = 0
    stored: int = 0
    not_stored: int = 0
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every passage asked for is in the store now."""
        return self.not_stored == 0

    def __int__(self) -> int:
        return self.encoded

    def __add__(self, other: EncodeReport) -> EncodeReport:
        if not isinstance(other, EncodeReport):
            return NotImplemented
        return EncodeReport(
            passages=self.passages + other.passages,
            already_present=self.already_present + other.already_present,
            encoded=self.encoded + other.encoded,
            stored=self.stored + other.stored,
            not_stored=self.not_stored + other.not_stored,
            errors=tuple(dict.fromkeys(self.errors + other.errors)),
        )
