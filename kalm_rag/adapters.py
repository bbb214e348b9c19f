"""What the LangChain, LlamaIndex and Haystack adapters share: stores by URL, models by configuration, one ranking rule.

The three adapters are thin: each turns its framework's documents into passage texts, calls the same
engine (:class:`kalm_rag.Reranker`) through the helpers here, and turns the result back. Keeping the
helpers in one place is what makes the adapters agree with each other and with ``Reranker.rerank``:

- **One store per URL.** :func:`shared_store` hands out one :class:`~kalm_rag.PassageStore` per URL
  per process, so a LangChain encoder and a Haystack ranker configured with the same URL (the default
  is ``memory://``) read and write the same cache. A store *object* is used as given.
- **One model per configuration.** :func:`shared_reranker` loads a checkpoint once per
  ``(model, store, device, batch_size)`` and keeps it while any adapter holds it (a weak registry).
- **One passage text per document.** The text sent to the engine is LangChain ``page_content``,
  LlamaIndex ``node.get_content(MetadataMode.NONE)`` and Haystack ``Document.content``: the same
  document has the same text, hence the same cache key, in every framework (and in ``kalm-rag index``).
  With ``title_key`` set, a document whose metadata has a title under that key is sent as
  :func:`kalm_rag.index.passage_text` of the title and the text (:func:`document_text`), the join
  ``kalm-rag index --title-field`` uses; without it (the default) the text goes alone.
- **One ranking rule.** :func:`rank` / :func:`arank`: documents with text are ranked by the engine
  (best first, ties keep input order); documents without text (``None``, empty, whitespace) score
  ``0.0`` and come after every scored document; ``score_threshold`` keeps scores ``>= threshold``;
  then the list is cut to ``top``.

Option checks come from :mod:`kalm_rag.validation`, the engine's own. This module never imports a framework,
and the engine never imports it: the adapters depend on the engine, not the other way round.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kalm_rag.data import passage_text
from kalm_rag.engine import EncodeReport, RankedPassage, Reranker
from kalm_rag.errors import InvalidInputError, KalmError
from kalm_rag.evidence import EvidenceSpan, check_keep, check_mass
from kalm_rag.models import DEFAULT_MODEL
from kalm_rag.store import PassageStore, check_store_url
from kalm_rag.store.quantize import check_storage
from kalm_rag.validation import check_positive_int

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_STORE_URL",
    "LOAD_FIELDS",
    "Ranked",
    "RerankerHandle",
    "aencode",
    "arank",
    "check_evidence_options",
    "check_title_key",
    "close_shared_stores",
    "document_text",
    "encode",
    "handle_from_fields",
    "has_text",
    "as_kalm_error",
    "kalm_error_in",
    "rank",
    "shared_reranker",
    "shared_store",
    "store_url",
]

#: The store adapters use when none is given: one in-memory LRU shared by every adapter in the process.
DEFAULT_STORE_URL = "memory://"

_lock = threading.RLock()
_stores_by_url: dict[str, PassageStore] = {}  # strong: a URL names a cache that must outlive its users
_rerankers: weakref.WeakValueDictionary[tuple[Any, ...], Reranker] = weakref.WeakValueDictionary()


# ----- stores and models ---------------------------------------------------------------------------


def shared_store(store: PassageStore | str | None = None) -> PassageStore:
    """The process's store for ``store``.

    Args:
        store: a ``PassageStore`` (returned as is), a store URL (``memory://``, ``sqlite:///path``,
            ``redis://host:port/db``; the first call opens it, later calls with the same URL get the same
            object), or ``None`` for :data:`DEFAULT_STORE_URL`.

    Example:
        >>> shared_store("memory://") is shared_store("memory://") is shared_store(None)
        True
    """
    if isinstance(store, PassageStore):
        return store
    if store is None:
        store = DEFAULT_STORE_URL
    if not isinstance(store, str):
        raise InvalidInputError(f"store must be a PassageStore or a store URL, got {type(store).__name__}")
    with _lock:
        opened = _stores_by_url.get(store)
        if opened is None:
            opened = _stores_by_url[store] = PassageStore.open(store)
        return opened


@atexit.register
def close_shared_stores() -> None:
    """Close every store opened by URL through :func:`shared_store` (run at interpreter exit).

    SQLite connections and Redis connection pools are released cleanly; a later :func:`shared_store`
    call with the same URL opens the store again.
    """
    with _lock:
        stores = list(_stores_by_url.values())
        _stores_by_url.clear()
    for store in stores:
        try:
            store.close()
        except Exception as exc:  # at exit: one store failing to close must not stop the others
            logging.getLogger(__name__).warning("could not close the passage store %r: %s", store, exc)


def store_url(store: PassageStore | str | None) -> str | None:
    """The URL of ``store``: the string itself, or the URL a store object was opened from by
    :func:`shared_store`; ``None`` for a store object built some other way (it has no portable form).
    """
    if store is None:
        return DEFAULT_STORE_URL
    if isinstance(store, str):
        return store
    with _lock:
        return next((url for url, s in _stores_by_url.items() if s is store), None)


def shared_reranker(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    store: PassageStore | str | None = None,
    device: str | None = None,
    batch_size: int = 32,
    storage: str | None = None,
) -> Reranker:
    """A :class:`~kalm_rag.Reranker` for this configuration, loaded once and shared while anyone holds it.

    Two adapters asking for the same model, store, device, batch size and storage get the same object, so
    the weights sit in memory once and one worker thread serves both. ``storage`` (``float32``, ``res4``, ...)
    left out is the store's recorded setting for the model, else the model's default.
    """
    source = os.fspath(model)
    if os.path.isdir(source):
        source = os.path.abspath(source)
    resolved_store = shared_store(store)
    # the reranker holds its store, so id(store) cannot be reused while the entry is alive
    key = (source, id(resolved_store), None if device is None else str(device), batch_size, storage)
    with _lock:
        rr = _rerankers.get(key)
        if rr is None:
            rr = Reranker.from_pretrained(
                source, store=resolved_store, device=device, batch_size=batch_size, storage=storage
            )
            _rerankers[key] = rr
        return rr


#: Adapter fields that configure loading; they conflict with a ready ``reranker=``.
LOAD_FIELDS = ("model", "store", "device", "batch_size", "storage")


def handle_from_fields(config: Any, fields_set: set[str]) -> RerankerHandle:
    """The :class:`RerankerHandle` of a pydantic adapter config (fields ``reranker`` + :data:`LOAD_FIELDS`).

    Refuses ``reranker=`` together with any explicitly set load field, naming them.
    """
    given = sorted(set(LOAD_FIELDS) & fields_set)
    if config.reranker is not None and given:
        raise InvalidInputError(
            f"pass either reranker= or {', '.join(f'{f}=' for f in given)}, not both: "
            "a ready reranker already has its model and store"
        )
    return RerankerHandle(
        config.reranker,
        model=config.model,
        store=config.store,
        device=config.device,
        batch_size=config.batch_size,
        storage=getattr(config, "storage", None),
    )


class RerankerHandle:
    """An adapter's reranker: the one it was given, or a shared one loaded on first use.

    Loading is lazy (constructing an adapter never loads weights), idempotent and thread-safe.

    Args:
        reranker: a ready :class:`~kalm_rag.Reranker`; when given, the other arguments are unused.
        model: checkpoint folder, hub id or ``"kalm-mini"``.
        store: store object or URL (see :func:`shared_store`).
        device: torch device string; ``None`` lets the engine choose.
        batch_size: passages per encoder or decoder batch.
        storage: how passage vectors are stored (``float32``, ``bfloat16``, ``int8``, ``res4``, ``res2``,
            ``res1``); ``None``: the store's recorded setting for the model, else the model's default.
    """

    def __init__(
        self,
        reranker: Reranker | None = None,
        *,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        store: PassageStore | str | None = None,
        device: str | None = None,
        batch_size: int = 32,
        storage: str | None = None,
    ) -> None:
        if reranker is not None and not isinstance(reranker, Reranker):
            raise InvalidInputError(f"reranker must be a kalm_rag.Reranker, got {type(reranker).__name__}")
        check_positive_int(batch_size, "batch_size")
        if store is not None and not isinstance(store, (str, PassageStore)):
            raise InvalidInputError(f"store must be a PassageStore or a store URL, got {type(store).__name__}")
        if isinstance(store, str):
            check_store_url(store)  # a misspelt option fails where the pipeline is built, not at first use
        self._reranker = reranker
        self._model = os.fspath(model)
        self._store = store
        self._device = device
        self._batch_size = batch_size
        self._storage = None if storage is None else check_storage(storage)
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the reranker is ready (given, or already loaded)."""
        return self._reranker is not None

    @property
    def model_name(self) -> str:
        """A name for logs and framework events: the model as configured, or the given reranker's weights."""
        if self._reranker is not None and self._reranker.backend.weights_id:
            return f"{self._reranker.backend.family}:{self._reranker.backend.weights_id}"
        return self._model

    def get(self) -> Reranker:
        """The reranker, loading (or fetching the shared) one on the first call."""
        if self._reranker is None:
            with self._lock:
                if self._reranker is None:
                    self._reranker = shared_reranker(
                        self._model,
                        store=self._store,
                        device=self._device,
                        batch_size=self._batch_size,
                        storage=self._storage,
                    )
        return self._reranker

    async def aget(self) -> Reranker:
        """:meth:`get` without blocking the event loop: a first load runs on a worker thread."""
        if self._reranker is not None:
            return self._reranker
        return await asyncio.to_thread(self.get)


def kalm_error_in(exc: Exception) -> KalmError | None:
    """The :class:`~kalm_rag.errors.KalmError` a pydantic ``ValidationError`` wraps, if any.

    Pydantic wraps a ``ValueError`` raised while a model is built (``InvalidInputError`` and
    ``StoreConfigError`` are ``ValueError``s) into its own ``ValidationError``; the LangChain and LlamaIndex
    adapters re-raise the original, so that every error kalm-rag raises on purpose stays a ``KalmError``.
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return None
    for error in errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, KalmError):
            return cause
    return None


def as_kalm_error(exc: Exception) -> KalmError:
    """A pydantic ``ValidationError`` as a :class:`~kalm_rag.errors.KalmError`, for the adapters' fields.

    The :class:`~kalm_rag.errors.KalmError` it wraps (:func:`kalm_error_in`), else an
    :class:`~kalm_rag.errors.InvalidInputError` (also a ``ValueError``, as pydantic's error is) with pydantic's
    own message, which names each refused field (the adapters raise it ``from`` pydantic's error).
    """
    cause = kalm_error_in(exc)
    return cause if cause is not None else InvalidInputError(str(exc))


# ----- ranking and encoding ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranked:
    """One ranked document: its position in the caller's list and its score (P(yes)).

    With ``evidence=True`` (or ``prune=`` / ``prune_mass=``) in :func:`rank`, ``evidence`` holds the engine's
    sentence spans into the passage text sent (``passage``), best first, and with ``prune=`` or ``prune_mass=``
    ``pruned_text`` the kept sentences.
    """

    index: int
    score: float
    evidence: tuple[EvidenceSpan, ...] | None = None
    pruned_text: str | None = None
    passage: str | None = None

    def evidence_in(self, text: str) -> list[dict[str, float | int]]:
        """The evidence spans as ``{"start", "end", "score"}`` dicts indexing ``text``, the document's own text.

        ``text`` is what the framework document holds (``page_content``, node content, ``content``); when a
        title was put in front of it (``title_key``), spans are shifted onto ``text`` and a span inside the
        title is left out.
        """
        if not self.evidence or self.passage is None:
            return []
        core = text.strip()
        base = self.passage.rfind(core) if core else -1
        if base < 0:  # not found: the spans index the passage sent
            return [s.to_dict() for s in self.evidence]
        shift = text.find(core) - base
        return [
            {"start": max(s.start, base) + shift, "end": s.end + shift, "score": s.score}
            for s in self.evidence
            if s.end > base
        ]


def has_text(text: object) -> bool:
    """Whether ``text`` is something the engine can score (a str with a non-space character)."""
    return isinstance(text, str) and bool(text.strip())


def check_title_key(title_key: object) -> str | None:
    """``title_key`` as given, checked: ``None`` (no title: the text alone) or a non-empty metadata key."""
    if title_key is not None and (not isinstance(title_key, str) or not title_key):
        raise InvalidInputError(f"title_key must be None or a non-empty str, got {title_key!r}")
    return title_key


def document_text(text: str | None, metadata: Mapping[str, Any] | None, title_key: str | None) -> str | None:
    """The passage text of a framework document: its text, with its title in front when ``title_key`` finds one.

    Args:
        text: the document's text (``page_content``, node content, ``Document.content``).
        metadata: the document's metadata (``metadata``, node ``metadata``, ``Document.meta``).
        title_key: the metadata key of the title, or ``None`` (the default of every adapter: the text alone).

    Returns:
        ``text`` unchanged when ``title_key`` is ``None``, the document has no text, or its metadata has no
        non-blank string under ``title_key``; else ``passage_text(title, text)``, exactly what
        ``kalm-rag index --title-field`` stores for the same row.

    Example:
        >>> document_text("is the capital.", {"title": "Paris"}, "title")
        'Paris is the capital.'
        >>> document_text("is the capital.", {"title": "Paris"}, None)
        'is the capital.'
    """
    if title_key is None or not has_text(text) or not metadata:
        return text
    title = metadata.get(title_key)
    if not isinstance(title, str) or not title.strip():
        return text
    return passage_text(title, text)


def _split(texts: Sequence[str | None]) -> tuple[list[int], list[str]]:
    positions = [i for i, t in enumerate(texts) if has_text(t)]
    return positions, [texts[i] for i in positions]  # type: ignore[misc]


def _finish(
    positions: list[int],
    ranked: list[RankedPassage],
    n: int,
    *,
    top: int | None,
    score_threshold: float | None,
) -> list[Ranked]:
    scored = {positions[r.index] for r in ranked}
    out = [
        Ranked(
            positions[r.index], float(r.score), r.evidence, r.pruned_text, r.text if r.evidence is not None else None
        )
        for r in ranked
    ]
    out += [Ranked(i, 0.0) for i in range(n) if i not in scored]  # no text: nothing to judge, last
    if score_threshold is not None:
        out = [r for r in out if r.score >= score_threshold]
    return out[:top]


def rank(
    reranker: Reranker,
    query: str,
    texts: Sequence[str | None],
    *,
    top: int | None = None,
    score_threshold: float | None = None,
    instruction: str | None = None,
    ratio: int | None = None,
    evidence: bool = False,
    prune: float | None = None,
    prune_mass: float | None = None,
) -> list[Ranked]:
    """Rank ``texts`` against ``query`` best first (see the module docstring for the rule).

    ``evidence``, ``prune`` and ``prune_mass`` are :meth:`Reranker.rerank`'s: sentence spans (and pruned texts)
    per document; ``prune`` keeps a share of each passage's characters, ``prune_mass`` a share of its evidence
    (at most one of the two).
    """
    positions, scorable = _split(texts)
    ranked = reranker.rerank(
        query, scorable, instruction=instruction, ratio=ratio, **_evidence_options(evidence, prune, prune_mass)
    )
    return _finish(positions, ranked, len(texts), top=top, score_threshold=score_threshold)


async def arank(
    reranker: Reranker,
    query: str,
    texts: Sequence[str | None],
    *,
    top: int | None = None,
    score_threshold: float | None = None,
    instruction: str | None = None,
    ratio: int | None = None,
    evidence: bool = False,
    prune: float | None = None,
    prune_mass: float | None = None,
) -> list[Ranked]:
    """:func:`rank` on the reranker's worker thread; the event loop keeps running meanwhile."""
    positions, scorable = _split(texts)
    ranked = await reranker.arerank(
        query, scorable, instruction=instruction, ratio=ratio, **_evidence_options(evidence, prune, prune_mass)
    )
    return _finish(positions, ranked, len(texts), top=top, score_threshold=score_threshold)


def _evidence_options(evidence: bool, prune: float | None, prune_mass: float | None = None) -> dict[str, Any]:
    """Only the evidence options that are on: a plain rank stays the exact call it was."""
    options: dict[str, Any] = {}
    if evidence:
        options["evidence"] = evidence
    if prune is not None:
        options["prune"] = prune
    if prune_mass is not None:
        options["prune_mass"] = prune_mass
    return options


def check_evidence_options(
    evidence: object, prune: object, prune_mass: object = None
) -> tuple[bool, float | None, float | None]:
    """An adapter's ``evidence``, ``prune`` and ``prune_mass`` options, checked where the pipeline is built.

    Returns:
        ``(evidence, prune, prune_mass)``; ``prune`` is a share of each passage's characters, ``prune_mass`` a
        share of its evidence, both in (0, 1] or ``None``. Setting both raises ``InvalidInputError``.
    """
    if not isinstance(evidence, bool):
        raise InvalidInputError(f"evidence must be True or False, got {evidence!r}")
    if prune is not None and prune_mass is not None:
        raise InvalidInputError(
            "give prune (a share of characters) or prune_mass (a share of evidence), not both: "
            f"got prune={prune!r} and prune_mass={prune_mass!r}"
        )
    keep = None if prune is None else check_keep(prune)
    mass = None if prune_mass is None else check_mass(prune_mass)
    return evidence, keep, mass


def encode(reranker: Reranker, texts: Sequence[str | None], *, strict: bool = True) -> EncodeReport:
    """Pre-encode the texts that have text into the reranker's store (documents without text are skipped).

    Args:
        reranker: the engine.
        texts: the documents' texts (``None``, empty and whitespace texts are skipped).
        strict: raise :class:`~kalm_rag.errors.NotStoredError` when the store does not keep them (an indexing
            pipeline must not report success with the cache unfilled); ``False`` only reports it.

    Returns:
        The engine's :class:`~kalm_rag.EncodeReport` (an empty one when no document has text).
    """
    _, scorable = _split(texts)
    return reranker.encode(scorable, strict=strict) if scorable else EncodeReport()


async def aencode(reranker: Reranker, texts: Sequence[str | None], *, strict: bool = True) -> EncodeReport:
    """:func:`encode` on the reranker's worker thread."""
    _, scorable = _split(texts)
    return await reranker.aencode(scorable, strict=strict) if scorable else EncodeReport()
