"""The FBNL reranking engine: pre-encode passages into a store, score queries against them.

Passages are encoded once (encoder -> MEP pooling at the store's base ratio) and kept in a
``PassageStore``. A query then costs only the decoder: its prompt attends to the cached passage
vectors, re-pooled exactly to the ratio asked for, and the yes/no margin is read at the last position.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar, overload

import torch
from tqdm.auto import tqdm

from kalm_rag._logs import RateLimitedWarning
from kalm_rag.errors import InvalidInputError, NotStoredError, NumericalError, ReadOnlyOptionError, StoreError
from kalm_rag.evidence import (
    EvidenceSpan,
    SentenceWindows,
    check_keep,
    check_mass,
    evidence_spans,
    prune_passage,
    ranked_spans,
    read_sentences,
    sentence_windows,
    window_spans,
)
from kalm_rag.models import DEFAULT_MODEL, load_backend
from kalm_rag.models.base import FBNLBackend, Prompt
from kalm_rag.padding import right_pad, right_pad_vectors
from kalm_rag.pooling import mep_pool, repool
from kalm_rag.prompt import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_INSTRUCTION, PASSAGE_PREFIX
from kalm_rag.reports import EncodeReport
from kalm_rag.scores import probabilities, rank_order
from kalm_rag.store import PassageStore, PooledPassage, check_store_url, open_store, passage_key
from kalm_rag.store import settings as store_settings
from kalm_rag.store.codebooks import publish_codebook, read_codebook
from kalm_rag.store.codec import decode_entry, encode_entry
from kalm_rag.store.quantize import (
    DEFAULT_TRAIN_PASSAGES,
    Codebook,
    check_storage,
    residual_bits,
    train_codebook,
)
from kalm_rag.store.settings import StoreSettingsError, VectorSettings
from kalm_rag.validation import check_passages, check_positive_int, check_ratio, check_stages, check_text

logger = logging.getLogger(__name__)

T = TypeVar("T")

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Passage layouts (windows, sentences) ``rerank(..., evidence=True)`` keeps (most recently used), per reranker.
LAYOUT_CACHE_SIZE = 4096
#: A codebook is trained from fewer than ``DEFAULT_TRAIN_PASSAGES`` passages only when they give this many vectors.
MIN_TRAIN_VECTORS = 2048
#: The paper's cascade: rerank the top-100 at ratio 32, then the top-20 of those at ratio 2.
DEFAULT_CASCADE: tuple[tuple[int, int], ...] = ((32, 100), (2, 20))


@dataclass(frozen=True)
class _Layout:
    """A passage at one ratio, as evidence reads it: its windows' character spans (``None``: no text), the
    sentences the encoder read, for each the windows overlapping it, and that as a 0/1 matrix ``(S, W)``.
    """

    windows: list[tuple[int, int] | None]
    sentences: list[tuple[int, int]]
    groups: list[list[int]]
    member: torch.Tensor
    #: Each sentence's token ids as the passage was tokenised (``None`` when the backend does not give them).
    pieces: list[list[int]] | None = None


def _sentence_pieces(
    sentences: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int] | None], ids: Sequence[int]
) -> list[list[int]]:
    """The ids of the tokens that start inside each sentence (positions without text hold none)."""
    out: list[list[int]] = [[] for _ in sentences]
    starts = [s for s, _ in sentences]
    j = 0
    for offset, token in zip(offsets, ids):
        if offset is None:
            continue
        while j + 1 < len(sentences) and offset[0] >= starts[j + 1]:
            j += 1
        if sentences and sentences[j][0] <= offset[0] < sentences[j][1]:
            out[j].append(int(token))
    return out


@dataclass(frozen=True)
class _EvidencePass:
    """One decoder pass with evidence: the prompt, the ratio, margins ``(N,)`` and, per passage, its window
    weights ``(W_i,)``, pooled vectors ``(W_i, d)`` and real-token counts ``(W_i,)`` at that ratio.
    """

    prompt: Prompt
    ratio: int
    margins: torch.Tensor
    weights: list[torch.Tensor]
    vectors: list[torch.Tensor]
    counts: list[torch.Tensor]


@dataclass(frozen=True)
class RankedPassage:
    """One reranked passage.

    Attributes:
        index: position of the passage in the caller's input list.
        score: P(yes) (or the raw margin where asked for).
        text: the passage text.
        ratio: the MEP ratio the score was computed at.
        evidence: with ``rerank(..., evidence=True)``, the sentences the model read, best first, as character
            spans into ``text`` with their evidence scores; with ``prune=``, the kept sentences only.
        pruned_text: with ``rerank(..., prune=...)``, ``text`` cut to its kept sentences, in their original
            order, joined by a space.
    """

    index: int
    score: float
    text: str
    ratio: int | None = None
    evidence: tuple[EvidenceSpan, ...] | None = None
    pruned_text: str | None = None


@dataclass(frozen=True)
class ScoreRequest:
    """One query and its passages, for :meth:`Reranker.score_many`; ``None`` options take the reranker's.

    Attributes:
        query: the query text.
        passages: passage texts.
        instruction: task instruction for this query.
        system_instruction: system instruction for this query (the prompt's first line).
        ratio: MEP ratio for this query (1..32, a multiple of ``base_ratio``).
    """

    query: str
    passages: Sequence[str]
    instruction: str | None = None
    system_instruction: str | None = None
    ratio: int | None = None


OptionT = TypeVar("OptionT")


class _Option(Generic[OptionT]):
    """A reranker option kept as ``_<name>``: checked when assigned; with ``fixed``, refused after construction.

    The options that shape stored vectors are fixed: they are part of the store namespace, and changing
    one in place would file differently encoded vectors under the old key.
    """

    def __init__(self, check: Callable[[Any, str], OptionT], *, fixed: bool = False) -> None:
        self.check = check
        self.fixed = fixed
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _Option[OptionT]: ...

    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> OptionT: ...

    def __get__(self, obj: object, objtype: type | None = None) -> OptionT | _Option[OptionT]:
        if obj is None:
            return self
        value: OptionT = obj.__dict__[f"_{self.name}"]
        return value

    def __set__(self, obj: object, value: Any) -> None:
        if self.fixed and f"_{self.name}" in obj.__dict__:
            raise ReadOnlyOptionError(
                f"{self.name} shapes the stored passage vectors (it is part of the store namespace), so it cannot "
                f"change after the Reranker is built; build another one: Reranker.from_pretrained(..., "
                f"{self.name}=...) or Reranker(rr.backend, store=rr.store, {self.name}=...)"
            )
        obj.__dict__[f"_{self.name}"] = self.check(value, self.name)


def _check_backend(value: object, name: str) -> FBNLBackend:
    if not isinstance(value, FBNLBackend):
        raise InvalidInputError(
            f"{name} must be an FBNLBackend (use Reranker.from_pretrained), got {type(value).__name__}"
        )
    return value


def _check_storage_dtype(value: object, name: str) -> str:
    if not isinstance(value, str) or value not in STORAGE_DTYPES:
        raise InvalidInputError(f"{name} must be one of {sorted(STORAGE_DTYPES)}, got {value!r}")
    return value


def _check_optional_storage(value: object, name: str) -> str | None:
    return None if value is None else check_storage(value, name)


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be True or False, got {value!r}")
    return value


def _check_optional_bool(value: object, name: str) -> bool | None:
    return None if value is None else _check_bool(value, name)


class Reranker:
    """An FBNL reranker: a model backend, a passage store and the options that shape scoring.

    Build one with :meth:`Reranker.from_pretrained`. Every option is keyword-only.

    The options that shape stored vectors (``backend``, ``max_passage_tokens``, ``base_ratio``,
    ``storage``) are read-only after construction: assigning one raises
    :class:`~kalm_rag.errors.ReadOnlyOptionError`. The others (``ratio``, ``batch_size``,
    ``max_query_tokens``, ``instruction``, ``system_instruction``, ``show_progress_bar``) may be assigned and
    are checked when they are.

    ``settings_source`` says where ``base_ratio``/``storage``/``max_passage_tokens`` came from: ``"store"``
    (recorded in the store by whoever wrote this model's vectors first), ``"legacy store"`` (a store written
    before settings were recorded) or ``"defaults"`` (given, or the model's defaults; nothing recorded yet).
    ``codebook_passages`` (256) is how many passages train a ``resN`` codebook (docs/store.md).

    Example:
        >>> rr = Reranker.from_pretrained("path/to/KaLM-Reranker-V1-Nano")  # doctest: +SKIP
        >>> rr.encode(["Paris is the capital of France.", "Bananas are yellow."])  # doctest: +SKIP
        >>> passages = ["Bananas are yellow.", "Paris is the capital of France."]
        >>> rr.rerank("capital of France?", passages)  # doctest: +SKIP
        [RankedPassage(index=1, score=0.98, text='Paris is ...'), RankedPassage(index=0, score=0.01, ...)]
    """

    backend = _Option(_check_backend, fixed=True)
    max_passage_tokens = _Option(check_positive_int, fixed=True)
    base_ratio = _Option(check_ratio, fixed=True)
    storage = _Option(check_storage, fixed=True)
    ratio = _Option(check_ratio)
    batch_size = _Option(check_positive_int)
    max_query_tokens = _Option(check_positive_int)
    instruction = _Option(check_text)
    system_instruction = _Option(check_text)
    show_progress_bar = _Option(_check_optional_bool)

    def __init__(
        self,
        backend: FBNLBackend,
        *,
        store: PassageStore | str | None = None,
        ratio: int | None = None,
        batch_size: int = 32,
        max_query_tokens: int = 512,
        max_passage_tokens: int | None = None,
        instruction: str | None = None,
        system_instruction: str | None = None,
        base_ratio: int | None = None,
        storage: str | None = None,
        storage_dtype: str | None = None,
        show_progress_bar: bool | None = None,
    ) -> None:
        self.backend = backend
        given = {
            "base_ratio": None if base_ratio is None else check_ratio(base_ratio, "base_ratio"),
            "storage": _resolve_storage_option(storage, storage_dtype),
            "max_passage_tokens": None
            if max_passage_tokens is None
            else check_positive_int(max_passage_tokens, "max_passage_tokens"),
        }
        self.batch_size = batch_size
        self.max_query_tokens = max_query_tokens
        self.instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        self.system_instruction = DEFAULT_SYSTEM_INSTRUCTION if system_instruction is None else system_instruction
        self.show_progress_bar = show_progress_bar
        if ratio is not None:
            check_ratio(ratio, "ratio")
        if store is not None and not isinstance(store, (PassageStore, str, os.PathLike)):
            raise InvalidInputError(f"store must be a PassageStore, a store URL or None, got {type(store).__name__}")
        # a store passed in as an object may be shared: only a store opened here is closed by close()
        self._owns_store = not isinstance(store, PassageStore)
        self.store = store if isinstance(store, PassageStore) else open_store(store)
        if given["storage"] is None:  # the store URL's ?storage=
            given["storage"] = getattr(self.store, "storage", None)
        try:
            settings, self.settings_source = self._resolve_settings(given)
        except BaseException:
            if self._owns_store:
                self.store.close()
            raise
        self.base_ratio = settings.base_ratio
        self.storage = settings.storage
        self.max_passage_tokens = settings.max_passage_tokens
        if ratio is None:  # the default call ratio 4, or the base ratio when 4 is not a multiple of it
            ratio = 4 if 4 % self.base_ratio == 0 else self.base_ratio
        self.ratio = ratio
        if self.ratio % self.base_ratio:
            raise InvalidInputError(f"ratio {ratio} is not a multiple of base_ratio {self.base_ratio}")
        #: Passages whose vectors train the namespace's codebook when ``storage`` is ``resN`` and it has none.
        self.codebook_passages = DEFAULT_TRAIN_PASSAGES
        self._codebook: Codebook | None = None
        self._sample: list[torch.Tensor] = []
        self._sample_passages = 0
        self._settings_recorded = False
        #: Work counters: passages run through the encoder, encoder batches, pairs scored, decoder calls and
        #: the rows they scored, and distinct passages found in the store (hits) or not (misses) when scoring.
        self.counters = {
            "encoded_passages": 0,
            "encoder_batches": 0,
            "scored_pairs": 0,
            "decoder_calls": 0,
            "decoder_rows": 0,
            "store_hits": 0,
            "store_misses": 0,
        }
        self._executor: ThreadPoolExecutor | None = None
        self._layouts: OrderedDict[tuple[str, int], _Layout] = OrderedDict()  # (passage key, ratio) -> layout
        self._layouts_lock = threading.Lock()
        self._namespace: tuple[tuple[Any, ...], str] | None = None
        self._warnings = RateLimitedWarning(logger)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        store: PassageStore | str | None = None,
        ratio: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        max_query_tokens: int = 512,
        max_passage_tokens: int | None = None,
        instruction: str | None = None,
        system_instruction: str | None = None,
        base_ratio: int | None = None,
        storage: str | None = None,
        storage_dtype: str | None = None,
        show_progress_bar: bool | None = None,
    ) -> Reranker:
        """Load a KaLM-Reranker-V1 checkpoint (local folder or hub id) as a reranker.

        Args:
            name_or_path: ``"kalm-mini"`` (the embedded default), a local checkpoint folder, or a hub id
                such as ``KaLM-Embedding/KaLM-Reranker-V1-Nano``.
            store: a ``PassageStore`` or a store URL; ``None`` gives a bounded in-memory store.
            ratio: default MEP ratio (1..32) for scoring calls that give none (default 4, or the base ratio
                when 4 is not a multiple of it).
            device: ``cpu``, ``cuda``, ...; default CUDA when available.
            dtype: ``float32`` or ``bfloat16``; default fp32 on CPU, bf16 on CUDA. fp16 is refused.
            batch_size: passages per encoder or decoder batch (shrunk automatically on CUDA out-of-memory).
            max_query_tokens: the query is cut to this many tokens before it is put in the prompt.
            max_passage_tokens: ``"<Document>: " + passage`` is cut to this many tokens (default 1024).
            instruction: task instruction (default: the official one).
            system_instruction: system instruction, the prompt's first line (default: the official one).
            base_ratio: ratio at which passages are stored; any call ratio must be a multiple of it.
            storage: how stored vectors are kept: ``float32``, ``bfloat16``, ``int8`` or ``res4``/``res2``/
                ``res1`` (a residual codebook trained on the corpus with faiss). See docs/store.md.
            storage_dtype: the older name of ``storage`` (``float32`` or ``bfloat16``).

        ``base_ratio``, ``storage`` and ``max_passage_tokens`` shape the stored vectors: left out (``None``),
        they are adopted from the store when it records settings for this model, else the model's defaults
        apply (kalm-mini: base ratio 4, ``res4``; the official checkpoints: base ratio 1, ``float32``, so
        their scores match the official recipe exactly). Given, they must agree with the store's record
        (:class:`~kalm_rag.store.settings.StoreSettingsError` otherwise).
            show_progress_bar: show progress on long encodes; ``None`` follows the logger level.
        """
        if not isinstance(store, PassageStore):
            check_store_url(store)  # a misspelt URL fails at once, not after the model has loaded
        torch_device = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, torch_device)
        backend = load_backend(name_or_path, device=torch_device, dtype=torch_dtype)
        return cls(
            backend,
            store=store,
            ratio=ratio,
            batch_size=batch_size,
            max_query_tokens=max_query_tokens,
            max_passage_tokens=max_passage_tokens,
            instruction=instruction,
            system_instruction=system_instruction,
            base_ratio=base_ratio,
            storage=storage,
            storage_dtype=storage_dtype,
            show_progress_bar=show_progress_bar,
        )

    # ----- identity --------------------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        """The store namespace: model weights identity + every setting that changes passage encodings.

        Recomputed from the current settings whenever one of them differs from the last computation (the
        settings are read-only, but the backend's identity is read afresh), so it can never go stale.
        """
        settings = self._namespace_settings(VectorSettings(self.base_ratio, self.storage, self.max_passage_tokens))
        cached = self._namespace
        if cached is not None and cached[0] == settings:
            return cached[1]
        namespace = _namespace_of(settings)
        self._namespace = (settings, namespace)
        return namespace

    def _namespace_settings(self, vector_settings: VectorSettings) -> tuple[Any, ...]:
        # the storage name sits where storage_dtype always did, so float32/bfloat16 namespaces are unchanged
        return (
            self.backend.family,
            self.backend.passage_encoder_id,
            PASSAGE_PREFIX,
            vector_settings.max_passage_tokens,
            vector_settings.base_ratio,
            vector_settings.storage,
            str(self.backend.dtype).removeprefix("torch."),
        )

    @property
    def storage_dtype(self) -> str:
        """The older name of :attr:`storage` (read-only)."""
        return self.storage

    @storage_dtype.setter
    def storage_dtype(self, value: object) -> None:
        raise ReadOnlyOptionError(
            "storage_dtype shapes the stored passage vectors (it is part of the store namespace), so it cannot "
            "change after the Reranker is built; build another one: Reranker.from_pretrained(..., storage=...)"
        )

    @property
    def model_scope(self) -> str:
        """The store scope of this model's records (its settings): the passage encoder's identity."""
        digest = hashlib.sha256(self.backend.passage_encoder_id.encode()).hexdigest()[:32]
        return f"model:{self.backend.family}:{digest}"

    def _resolve_settings(self, given: dict[str, Any]) -> tuple[VectorSettings, str]:
        """The vector settings: the caller's, the store's record, or the defaults (see ``from_pretrained``)."""
        legacy = store_settings.LEGACY_DEFAULTS
        legacy_present = False
        if store_settings.read_settings(self.store, self.model_scope) is None and all(
            v is None or v == getattr(legacy, k) for k, v in given.items()
        ):
            legacy_present = _has_entries(self.store, _namespace_of(self._namespace_settings(legacy)))
        return store_settings.resolve(
            self.store, self.model_scope, family=self.backend.family, given=given, legacy_present=legacy_present
        )

    def _record_settings(self, *, strict: bool) -> None:
        """Record this reranker's vector settings in the store before its first write (once)."""
        if self._settings_recorded:
            return
        try:
            store_settings.record_settings(
                self.store,
                self.model_scope,
                VectorSettings(self.base_ratio, self.storage, self.max_passage_tokens),
            )
        except StoreSettingsError:
            if strict:
                raise
            self._warnings.warn("settings", "%s", "the store records other settings for this model")
        except StoreError as exc:
            self._warnings.warn("settings", "could not record the vector settings in the store (%s)", exc)
            return
        self._settings_recorded = True

    # ----- codebooks ---------------------------------------------------------------------------------

    @property
    def codebook(self) -> Codebook | None:
        """The namespace's residual codebook (``storage="resN"``), read from the store; ``None`` if it has none."""
        if residual_bits(self.storage) and self._codebook is None:
            try:
                self._codebook = read_codebook(self.store, self.namespace)
            except StoreError:
                return None
        return self._codebook

    def train_codebook(self, passages: Sequence[str], *, show_progress_bar: bool | None = None) -> Codebook:
        """Train the namespace's residual codebook on ``passages`` (encoded, not stored) and keep it in the store.

        ``Reranker.encode`` and ``kalm-rag index`` call this themselves with the first ``codebook_passages``
        passages when the store has no codebook yet; call it to train on a sample of your choice first. When
        another process stored a codebook meanwhile, that one is kept and returned (the first writer wins).

        Raises:
            InvalidInputError: ``storage`` is not ``resN``, or no passages.
            StoreError: the codebook cannot be stored.
        """
        if not residual_bits(self.storage):
            raise InvalidInputError(f"storage {self.storage!r} uses no codebook; only res4, res2 and res1 do")
        texts = check_passages(passages)
        unique = {passage_key(t): t for t in texts}
        entries = self._encode_into_store(
            unique, show_progress_bar=show_progress_bar, outcome=_StoreOutcome(), keep=True, write=False
        )
        return self._publish_codebook([e.vectors for e in entries.values()])

    def _publish_codebook(self, vectors: list[torch.Tensor]) -> Codebook:
        sample = torch.cat([v.float() for v in vectors]) if vectors else torch.zeros(0)
        book = train_codebook(sample, bits=residual_bits(self.storage))
        self._record_settings(strict=True)
        self._codebook = publish_codebook(self.store, self.namespace, book)
        self._sample, self._sample_passages = [], 0
        return self._codebook

    def _compact(self, entries: dict[str, PooledPassage], *, final: bool = False) -> dict[str, PooledPassage]:
        """``entries`` marked with the storage they are written in (int8 while a ``resN`` store has no codebook)."""
        if self.storage in STORAGE_DTYPES:
            return entries  # format 1, byte for byte as before
        book = None
        if residual_bits(self.storage):
            book = self.codebook
            if book is None:
                self._sample.extend(e.vectors for e in entries.values())
                self._sample_passages += len(entries)
                vectors = sum(int(v.shape[0]) for v in self._sample)
                if self._sample_passages >= self.codebook_passages or (final and vectors >= MIN_TRAIN_VECTORS):
                    book = self._publish_codebook(self._sample)
        storage = self.storage if book is not None or not residual_bits(self.storage) else "int8"
        return {k: replace(e, storage=storage, codebook=book) for k, e in entries.items()}

    # ----- passage side ----------------------------------------------------------------------------

    def encode(
        self, passages: Sequence[str], *, strict: bool = True, show_progress_bar: bool | None = None
    ) -> EncodeReport:
        """Pre-encode passages into the store, skipping those already there (the indexing side).

        Unlike scoring, which goes on with recomputed vectors when the store fails, indexing must not
        report success with the cache unfilled: with ``strict=True`` (the default) a store that cannot
        keep the passages (full disk, read-only file, Redis down, hung or full) raises
        :class:`~kalm_rag.errors.NotStoredError` at the first failed write, and the work stops there. With
        ``strict=False`` every batch is tried and the returned report says what was not stored.

        Args:
            passages: passage texts (duplicates are encoded once).
            strict: raise on the first passage the store does not keep, instead of reporting it.
            show_progress_bar: show progress (``None``: the reranker's setting).

        Returns:
            An :class:`EncodeReport`: how many passages were already there, encoded, stored, not stored.

        Raises:
            NotStoredError: ``strict`` and some passages were not stored; its ``report`` says how many.
            InvalidInputError: ``passages`` is not a list of non-empty texts.
            NumericalError: the encoder produced non-finite vectors (nothing is stored for them).
        """
        texts = check_passages(passages)
        strict = _check_bool(strict, "strict")
        show_progress_bar = _check_optional_bool(show_progress_bar, "show_progress_bar")
        unique = {passage_key(t): t for t in texts}
        keys = list(unique)
        errors: list[str] = []
        try:
            present = self.store.contains_many(self.namespace, keys)
        except StoreError as exc:
            if strict:
                report = EncodeReport(passages=len(keys), not_stored=len(keys), errors=(str(exc),))
                raise NotStoredError(
                    f"cannot index {len(keys)} passages: the store {self.store!r} cannot be read ({exc})", report
                ) from exc
            errors.append(str(exc))
            present = [False] * len(keys)
        missing = {k: unique[k] for k, p in zip(keys, present) if not p}
        outcome = _StoreOutcome(errors=errors)
        n_missing = len(missing)
        if missing and residual_bits(self.storage) and self.codebook is None:
            # train the namespace's codebook on the first passages, then store them with it
            sample = dict(list(missing.items())[: self.codebook_passages])
            entries = self._encode_into_store(
                sample, show_progress_bar=show_progress_bar, outcome=outcome, keep=True, write=False
            )
            try:
                self._store_batch(entries, outcome, strict=strict, final=True)
            except _StopEncoding:
                pass
            else:
                missing = {k: t for k, t in missing.items() if k not in sample}
        if missing:
            self._encode_into_store(missing, show_progress_bar=show_progress_bar, outcome=outcome, strict=strict)
        report = EncodeReport(
            passages=len(keys),
            already_present=len(keys) - n_missing,
            encoded=outcome.encoded,
            stored=outcome.stored,
            not_stored=n_missing - outcome.stored,
            errors=tuple(dict.fromkeys(outcome.errors)),
        )
        if strict and report.not_stored:
            raise NotStoredError(
                f"{report.not_stored} of {len(keys)} passages were not stored in {self.store!r} "
                f"({report.encoded} encoded, {report.stored} stored): {report.errors[-1] if report.errors else ''}",
                report,
            )
        return report

    def _encode_into_store(
        self,
        texts_by_key: dict[str, str],
        *,
        show_progress_bar: bool | None,
        outcome: _StoreOutcome,
        strict: bool = False,
        keep: bool = False,
        write: bool = True,
    ) -> dict[str, PooledPassage]:
        """Run the encoder over ``texts_by_key`` (longest first), pool and store; return the entries if ``keep``.

        Store failures are recorded in ``outcome``; with ``strict`` the first one stops the work, otherwise
        it is logged (rate-limited) and the computed vectors are used anyway. With ``write=False`` nothing
        is stored and the exact (unquantised) entries are returned (to train a codebook on).
        """
        keys = list(texts_by_key)
        token_ids = self.backend.tokenize_passages([texts_by_key[k] for k in keys], self.max_passage_tokens)
        order = sorted(range(len(keys)), key=lambda i: -len(token_ids[i]))
        entries: dict[str, PooledPassage] = {}
        bar = tqdm(
            total=len(keys),
            desc="Encoding passages",
            unit="passage",
            disable=not self._progress_enabled(show_progress_bar, len(keys)),
        )

        def encode_batch(batch: list[int]) -> None:
            ids, mask = right_pad([token_ids[i] for i in batch], self.backend.pad_token_id)
            hidden = self.backend.encode(ids, mask)  # (B, n, d)
            pooled, counts = mep_pool(hidden, mask.to(hidden.device), self.base_ratio)  # (B, W, d), (B, W)
            pooled = pooled.to(STORAGE_DTYPES.get(self.storage, torch.float32)).cpu()
            if not bool(torch.isfinite(pooled).all()):  # never store (nor score with) vectors that poison scores
                raise NumericalError(
                    f"the encoder produced non-finite passage vectors in {self.backend.dtype} "
                    f"(storage {self.storage_dtype}); use float32"
                )
            counts = counts.cpu()
            new = {}
            for row, i in enumerate(batch):
                W = math.ceil(len(token_ids[i]) / self.base_ratio)
                new[keys[i]] = PooledPassage(pooled[row, :W].clone(), counts[row, :W].clone(), self.base_ratio)
            self.counters["encoded_passages"] += len(batch)
            self.counters["encoder_batches"] += 1
            outcome.encoded += len(batch)
            if write:
                new = self._store_batch(new, outcome, strict=strict)
            if keep:
                entries.update(new)
            bar.update(len(batch))

        try:
            self._for_each_batch(order, encode_batch)
        except _StopEncoding:
            pass
        finally:
            bar.close()
        return entries

    def _store_batch(
        self, new: dict[str, PooledPassage], outcome: _StoreOutcome, *, strict: bool, final: bool = False
    ) -> dict[str, PooledPassage]:
        """Store one batch of exact entries in the reranker's storage; return them as a store read gives them back.

        Scoring with the stored (decoded) vectors makes a passage's score the same whether it was a hit or a miss.
        """
        self._record_settings(strict=strict)
        compact = self._compact(new, final=final)
        try:
            self.store.put_many(self.namespace, compact)  # per batch: a crash loses at most one batch
            outcome.stored += len(compact)
        except StoreError as exc:  # the vectors are computed: score with them even if they cannot be kept
            outcome.errors.append(str(exc))
            if strict:
                raise _StopEncoding from exc
            self._warnings.warn(
                "store-write", "could not store %d encoded passages (%s); scoring goes on", len(new), exc
            )
        if self.storage in STORAGE_DTYPES:
            return compact
        namespace = self.namespace
        return {
            k: decode_entry(encode_entry(namespace, k, e), namespace=namespace, key=k, codebook=e.codebook)
            for k, e in compact.items()
        }

    def _pooled(self, texts: list[str]) -> list[PooledPassage]:
        """Stored encodings of ``texts`` (encoding and storing those that are missing or unusable)."""
        keys = [passage_key(t) for t in texts]
        try:
            found = self.store.get_many(self.namespace, keys)
        except StoreError as exc:
            self._warnings.warn("store-read", "passage store unavailable (%s); encoding %d passages", exc, len(keys))
            found = [None] * len(keys)
        by_key = {k: e for k, e in zip(keys, found) if e is not None and e.ratio == self.base_ratio}
        missing = {k: t for k, t in zip(keys, texts) if k not in by_key}
        self.counters["store_hits"] += len(by_key)
        self.counters["store_misses"] += len(missing)
        if missing:
            by_key.update(self._encode_into_store(missing, show_progress_bar=False, outcome=_StoreOutcome(), keep=True))
        return [by_key[k] for k in keys]

    # ----- query side ------------------------------------------------------------------------------

    def score(
        self,
        query: str,
        passages: Sequence[str],
        *,
        instruction: str | None = None,
        ratio: int | None = None,
        return_margin: bool = False,
    ) -> list[float]:
        """Relevance of each passage to ``query``, in input order.

        Args:
            query: the query text.
            passages: passage texts; those not in the store are encoded (and stored) first.
            instruction: task instruction for this call (default: the reranker's).
            ratio: MEP ratio for this call (1..32, a multiple of ``base_ratio``; default: the reranker's).
            return_margin: return ``z_yes - z_no`` instead of ``P(yes)``.

        Returns:
            One float per passage: P(yes) in [0, 1], or the margin.
        """
        query = check_text(query, "query")
        texts = check_passages(passages)
        r = self._call_ratio(ratio)
        instr = self.instruction if instruction is None else check_text(instruction, "instruction")
        if not texts:
            return []
        margins = self._margins(query, texts, instruction=instr, ratio=r)
        return margins.tolist() if return_margin else probabilities(margins)

    def rerank(
        self,
        query: str,
        passages: Sequence[str],
        *,
        top_k: int | None = None,
        instruction: str | None = None,
        ratio: int | None = None,
        evidence: bool = False,
        prune: float | None = None,
        prune_mass: float | None = None,
    ) -> list[RankedPassage]:
        """Passages sorted best first by margin (ties keep input order), cut to ``top_k``; each with its P(yes).

        The ranking reads the margins, not the probabilities: two margins of 17 and 25 both give P(yes) 1.0
        in float32, yet rank 25 first (:mod:`kalm_rag.scores`).

        With ``evidence=True`` each result carries ``evidence``: its sentences (as far as the model read the
        passage, ``max_passage_tokens``) as ``(start, end, score)`` character spans, best first, read from the
        same decoder pass as the score (no second encoder pass; the scores are unchanged). With ``prune`` (the
        fraction of each passage's characters to keep, in (0, 1]) each result also carries ``pruned_text``: its
        best sentences within that budget (at least one), in their original order; ``evidence`` then lists
        the kept sentences. ``prune_mass`` (in (0, 1]) prunes by evidence instead of length: each passage keeps
        its best sentences until their evidence scores hold that share of the passage's evidence (kalm-mini's
        trained readout scores are shares that sum to 1, so ``prune_mass=0.9`` keeps one sentence where the model
        is sure and more where it is not). At most one of ``prune`` and ``prune_mass``.
        """
        if top_k is not None:
            top_k = check_positive_int(top_k, "top_k")
        r = self._call_ratio(ratio)
        evidence = _check_bool(evidence, "evidence")
        if prune is not None and prune_mass is not None:
            raise InvalidInputError("give prune (a share of characters) or prune_mass (a share of evidence), not both")
        keep = None if prune is None else check_keep(prune)
        mass = None if prune_mass is None else check_mass(prune_mass)
        if evidence or keep is not None or mass is not None:
            return self._rerank_with_evidence(
                query, passages, top_k=top_k, instruction=instruction, ratio=r, keep=keep, mass=mass
            )
        margins = self.score(query, passages, instruction=instruction, ratio=r, return_margin=True)
        scores = probabilities(margins)
        return [RankedPassage(index=i, score=scores[i], text=passages[i], ratio=r) for i in rank_order(margins)[:top_k]]

    def rerank_cascade(
        self,
        query: str,
        passages: Sequence[str],
        *,
        stages: Sequence[tuple[int, int]] | None = None,
        top_k: int | None = None,
        instruction: str | None = None,
    ) -> list[RankedPassage]:
        """Rerank coarse-to-fine: each stage rescores the best ``depth`` passages so far at its ratio.

        The first stage scores the first ``depth`` passages of the input (the retriever's order) at its
        ratio; each later stage rescores the top ``depth`` of the running ranking at a finer ratio. Every
        stage re-pools the same stored encoding exactly, so no passage is encoded twice. The result lists
        the last stage's passages first (by its scores), then the rest of each earlier stage (by that
        stage's scores); each ``RankedPassage.ratio`` says which stage scored it.

        Args:
            query: the query text.
            passages: candidate passages, best first according to the first-stage retriever.
            stages: ``(ratio, depth)`` pairs, coarse to fine; default (``None``) ``((32, 100), (2, 20))``, the
                paper's cascade (top-100 at r=32, then top-20 at r=2), each ratio raised to the next multiple of
                ``base_ratio`` (a compact kalm-mini store at base ratio 4 runs the fine stage at r=4).
            top_k: keep the best ``top_k`` of the final ranking.
            instruction: task instruction for this call.
        """
        if top_k is not None:
            top_k = check_positive_int(top_k, "top_k")
        texts = check_passages(passages)
        stages = check_stages(self._default_cascade() if stages is None else stages)
        for r, _ in stages:
            self._call_ratio(r)
        ordered: list[int] = list(range(len(texts)))  # the first stage reads the retriever's order
        scored: dict[int, RankedPassage] = {}
        for stage, (r, depth) in enumerate(stages):
            head, rest = ordered[:depth], ordered[depth:]
            margins = self.score(query, [texts[i] for i in head], instruction=instruction, ratio=r, return_margin=True)
            for i, score in zip(head, probabilities(margins)):
                scored[i] = RankedPassage(index=i, score=score, text=texts[i], ratio=r)
            head = [head[j] for j in rank_order(margins)]  # by margin, as rerank
            # unscored passages (beyond the first stage's depth) are dropped; earlier stages' leftovers stay
            ordered = head + (rest if stage else [])
        return [scored[i] for i in ordered][:top_k]

    def score_pairs(
        self, pairs: Sequence[tuple[str, str]], *, instruction: str | None = None, ratio: int | None = None
    ) -> list[float]:
        """P(yes) of each ``(query, passage)`` pair, in input order (like ``CrossEncoder.predict``)."""
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise InvalidInputError(f"pairs must be a sequence of (query, passage) tuples, got {type(pairs).__name__}")
        by_query: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidInputError(f"pairs[{i}] must be a (query, passage) pair, got {pair!r:.80}")
            by_query.setdefault(check_text(pair[0], f"pairs[{i}][0] (query)"), []).append(i)
        out = [0.0] * len(pairs)
        for query, idx in by_query.items():
            scores = self.score(query, [pairs[i][1] for i in idx], instruction=instruction, ratio=ratio)
            for i, s in zip(idx, scores):
                out[i] = s
        return out

    def score_many(self, requests: Sequence[ScoreRequest], *, return_margin: bool = False) -> list[list[float]]:
        """Scores of several queries' passages, computed together (a server batching concurrent requests).

        The distinct passages of all requests are read from the store at once (one ``get_many``) and the
        missing ones encoded together; then every (prompt, passage, ratio) row goes through the decoder in
        calls of up to ``batch_size`` rows that mix prompts (``FBNLBackend.margins_many``: one decoder call over
        several queries). Rows are ordered by prompt, then by length, so a request with many passages fills
        whole batches of its own prompt, which take the backend's single-prompt path (for kalm-mini, the
        folded path that computes the query's side once); the rows of small requests share calls. A row asked
        for twice (the same prompt, passage and ratio) is scored once. Each result equals :meth:`score` of
        its request up to float rounding (1e-5 in float32: batch composition changes the padding).

        Args:
            requests: the queries and their passages, with per-request options.
            return_margin: return ``z_yes - z_no`` instead of ``P(yes)``.

        Returns:
            One list per request: one float per passage, in input order.
        """
        checked: list[tuple[str, list[str], str, str, int]] = []
        for i, req in enumerate(requests):
            checked.append(
                (
                    check_text(req.query, f"requests[{i}].query"),
                    check_passages(req.passages),
                    self.instruction
                    if req.instruction is None
                    else check_text(req.instruction, f"requests[{i}].instruction"),
                    self.system_instruction
                    if req.system_instruction is None
                    else check_text(req.system_instruction, f"requests[{i}].system_instruction"),
                    self._call_ratio(req.ratio),
                )
            )
        unique = list(dict.fromkeys(t for _, texts, _, _, _ in checked for t in texts))
        entries = dict(zip(unique, self._pooled(unique))) if unique else {}
        prompt_of: dict[tuple[str, str, str], int] = {}
        prompts: list[Prompt] = []
        row_of: dict[tuple[int, str, int], int] = {}  # (prompt, passage, ratio) -> row
        rows: list[tuple[int, PooledPassage, int]] = []
        spans: list[list[int]] = []
        for query, texts, instr, system, r in checked:
            if texts and (query, instr, system) not in prompt_of:
                prompt_of[(query, instr, system)] = len(prompts)
                prompts.append(self._prompt(query, instruction=instr, system_instruction=system))
            span = []
            for t in texts:
                key = (prompt_of[(query, instr, system)], t, r)
                if key not in row_of:
                    row_of[key] = len(rows)
                    rows.append((key[0], entries[t], r))
                span.append(row_of[key])
            spans.append(span)
        if len(prompts) > 1:
            self.backend.prepare_prompts(prompts)  # e.g. kalm-mini: every new query in one encoder call
        margins = self._decode_rows(prompts, rows) if rows else torch.empty(0)
        out: list[list[float]] = []
        for span, (query, texts, _, _, _) in zip(spans, checked):
            values = self._with_lexical(query, texts, margins[span])
            out.append(values.tolist() if return_margin else probabilities(values))
        return out

    async def ascore(self, query: str, passages: Sequence[str], **kwargs: Any) -> list[float]:
        """:meth:`score` on the reranker's worker thread; the event loop keeps running meanwhile."""
        return await self._run_in_worker(functools.partial(self.score, query, passages, **kwargs))

    async def arerank(self, query: str, passages: Sequence[str], **kwargs: Any) -> list[RankedPassage]:
        """:meth:`rerank` on the reranker's worker thread; the event loop keeps running meanwhile."""
        return await self._run_in_worker(functools.partial(self.rerank, query, passages, **kwargs))

    async def aencode(self, passages: Sequence[str], **kwargs: Any) -> EncodeReport:
        """:meth:`encode` on the reranker's worker thread (same options, same report and errors)."""
        return await self._run_in_worker(functools.partial(self.encode, passages, **kwargs))

    # ----- internals -------------------------------------------------------------------------------

    def _margins(self, query: str, texts: list[str], *, instruction: str, ratio: int) -> torch.Tensor:
        """Margins ``(N,)`` of one query against ``texts``: store lookups, exact re-pooling, decoder."""
        margins = self._decode(
            query, self._pooled(texts), instruction=instruction, system_instruction=self.system_instruction, ratio=ratio
        )
        return self._with_lexical(query, texts, margins)

    def _with_lexical(self, query: str, texts: list[str], margins: torch.Tensor) -> torch.Tensor:
        """``margins`` plus the backend's lexical term of ``texts``, for a backend that has one (kalm-mini 2.0
        candidates: ``MiniBackend.lexical_margins``); unchanged otherwise.
        """
        lexical = getattr(self.backend, "lexical_margins", None)
        if lexical is None:
            return margins
        limits = {"max_query_tokens": self.max_query_tokens, "max_passage_tokens": self.max_passage_tokens}
        extra = lexical(query, texts, **limits)
        return margins if extra is None else margins + extra.to(margins.dtype)

    def _decode(
        self, query: str, entries: list[PooledPassage], *, instruction: str, system_instruction: str, ratio: int
    ) -> torch.Tensor:
        """Margins ``(N,)`` of one query against stored entries: exact re-pooling, decoder."""
        prompt = self._prompt(query, instruction=instruction, system_instruction=system_instruction)
        return self._decode_rows([prompt], [(0, e, ratio) for e in entries])

    def _check_finite(self, margins: torch.Tensor) -> None:
        if not torch.isfinite(margins).all():
            raise NumericalError(
                f"non-finite scores in {self.backend.dtype}; the model overflows in this dtype, use float32 or bfloat16"
            )

    def _prompt(self, query: str, *, instruction: str, system_instruction: str) -> Prompt:
        prompt = self.backend.prompt_ids(
            query,
            instruction=instruction,
            system_instruction=system_instruction,
            max_query_tokens=self.max_query_tokens,
        )
        self._warn_if_cut(prompt)
        return prompt

    def _decode_rows(self, prompts: list[Prompt], rows: list[tuple[int, PooledPassage, int]]) -> torch.Tensor:
        """Margins ``(N,)`` of rows ``(prompt index, stored entry, ratio)``: exact re-pooling, decoder calls.

        Rows are ordered by prompt, then longest first (less padding), and scored ``batch_size`` at a time;
        a batch holding one prompt takes the backend's single-prompt path, one holding several its
        multi-prompt path.
        """
        pooled = [repool(e.vectors, e.counts, r // self.base_ratio)[0] for _, e, r in rows]
        order = sorted(range(len(rows)), key=lambda i: (rows[i][0], -pooled[i].shape[0]))
        margins = torch.empty(len(rows), dtype=torch.float32)

        def score_batch(batch: list[int]) -> None:
            vectors, mask = right_pad_vectors([pooled[i] for i in batch], self.backend.dtype)  # (B, W, d), (B, W)
            used = list(dict.fromkeys(rows[i][0] for i in batch))  # the batch's prompts, in order
            if len(used) == 1:
                margins[batch] = self.backend.margins(prompts[used[0]], vectors, mask)
            else:
                local = {p: j for j, p in enumerate(used)}
                index = torch.tensor([local[rows[i][0]] for i in batch], dtype=torch.long)  # (B,)
                margins[batch] = self.backend.margins_many([prompts[p] for p in used], index, vectors, mask)
            self.counters["decoder_calls"] += 1
            self.counters["decoder_rows"] += len(batch)

        self._for_each_batch(order, score_batch)
        self._check_finite(margins)
        self.counters["scored_pairs"] += len(rows)
        return margins

    def _rerank_with_evidence(
        self,
        query: str,
        passages: Sequence[str],
        *,
        top_k: int | None,
        instruction: str | None,
        ratio: int,
        keep: float | None,
        mass: float | None = None,
    ) -> list[RankedPassage]:
        """:meth:`rerank` with evidence spans (and pruning): one decoder pass gives scores and window weights."""
        query = check_text(query, "query")
        texts = check_passages(passages)
        instr = self.instruction if instruction is None else check_text(instruction, "instruction")
        if not texts:
            return []
        ahead = None
        if top_k is None or top_k >= len(texts):  # every passage gets evidence: lay them out while the model reads
            ahead = _layout_pool().submit(self._layouts_for, texts, ratio)
        try:
            found = self._decode_with_evidence(
                query, self._pooled(texts), instruction=instr, system_instruction=self.system_instruction, ratio=ratio
            )
        finally:
            if ahead is not None:
                wait([ahead])
        laid = None if ahead is None else ahead.result()
        margins = self._with_lexical(query, texts, found.margins)
        scores = probabilities(margins.tolist())
        ranked = rank_order(margins.tolist())[:top_k]
        layouts = None if laid is None else [laid[i] for i in ranked]
        evidence = self._passages_evidence(found, ranked, [texts[i] for i in ranked], layouts=layouts)
        out = []
        for i, spans in zip(ranked, evidence):
            pruned = None
            if keep is not None or mass is not None:
                pruned, spans = prune_passage(texts[i], spans, keep=keep, mass=mass)
            out.append(
                RankedPassage(
                    index=i, score=scores[i], text=texts[i], ratio=ratio, evidence=tuple(spans), pruned_text=pruned
                )
            )
        return out

    def _passages_evidence(
        self,
        found: _EvidencePass,
        indices: Sequence[int],
        texts: Sequence[str],
        *,
        sentences: Sequence[Sequence[tuple[int, int]]] | None = None,
        layouts: Sequence[_Layout] | None = None,
    ) -> list[list[EvidenceSpan]]:
        """The sentences of passages ``indices`` of ``found`` (their ``texts``; default sentences: their
        :func:`~kalm_rag.evidence.sentence_spans`), best first: the backend's trained sentence readout when it has
        one (scores are shares of the passage's evidence), else the window weights' training-free readout (a
        sentence scores its best window). ``layouts``: the passages' layouts when already made (:meth:`_layouts_for`).
        """
        layouts = self._passage_layouts(found, indices, texts, sentences=sentences, layouts=layouts)
        readout = self.backend.evidence_readout
        if readout is None:
            return [
                evidence_spans(t, layout.windows, found.weights[i].tolist(), sentences=layout.sentences)
                for i, t, layout in zip(indices, texts, layouts)
            ]
        columns = self._sentence_columns(found, indices, texts, layouts)
        return [
            ranked_spans(layout.sentences, readout.probabilities(c)) if layout.sentences else []
            for layout, c in zip(layouts, columns)
        ]

    def _passage_layouts(
        self,
        found: _EvidencePass,
        indices: Sequence[int],
        texts: Sequence[str],
        *,
        sentences: Sequence[Sequence[tuple[int, int]]] | None = None,
        layouts: Sequence[_Layout] | None = None,
    ) -> list[_Layout]:
        """Each passage's layout at the pass's ratio (:meth:`_layouts_for`, unless given), checked against the
        windows it was scored with.
        """
        if layouts is None:
            layouts = self._layouts_for(texts, found.ratio, sentences=sentences)
        for i, layout in zip(indices, layouts, strict=True):
            if len(layout.windows) != found.weights[i].shape[0]:
                raise NumericalError(
                    f"passage {i}: {found.weights[i].shape[0]} stored windows but its text tokenises into "
                    f"{len(layout.windows)} at ratio {found.ratio}; the store holds vectors of another tokenisation"
                )
        return list(layouts)

    def _layouts_for(
        self, texts: Sequence[str], ratio: int, *, sentences: Sequence[Sequence[tuple[int, int]]] | None = None
    ) -> list[_Layout]:
        """Each passage's windows at ``ratio``, read sentences and which windows each overlaps. Kept for the most
        recent passages and ratios (a RAG corpus's passages come back, as their stored vectors do, and the
        tokenizer and the sentence splitter are most of what evidence costs); layouts over given ``sentences``
        are not kept. Needs only the texts, so a call can make them while the decoder reads the passages.
        """
        keys = [(passage_key(t), ratio) for t in texts]
        known: dict[tuple[str, int], _Layout] = {}
        if sentences is None:
            with self._layouts_lock:
                known = {k: self._layouts[k] for k in keys if k in self._layouts}
        missing = [j for j, k in enumerate(keys) if k not in known]
        if missing:
            offsets, ids = self.backend.passage_offsets_and_ids([texts[j] for j in missing], self.max_passage_tokens)
            for n, (j, row) in enumerate(zip(missing, offsets)):
                windows = window_spans(row, ratio)
                read = read_sentences(texts[j], windows, None if sentences is None else sentences[j])
                groups = sentence_windows(read, windows)
                member = torch.zeros((len(read), len(windows)), dtype=torch.float32)  # (S, W)
                for sentence, group in enumerate(groups):
                    member[sentence, group] = 1.0
                pieces = None if ids is None else _sentence_pieces(read, row, ids[n])
                known[keys[j]] = _Layout(windows, read, groups, member, pieces)
        if sentences is None:
            with self._layouts_lock:
                for k in keys:
                    self._layouts[k] = known[k]
                    self._layouts.move_to_end(k)
                while len(self._layouts) > LAYOUT_CACHE_SIZE:
                    self._layouts.popitem(last=False)
        return [known[k] for k in keys]

    def _sentence_columns(
        self, found: _EvidencePass, indices: Sequence[int], texts: Sequence[str], layouts: Sequence[_Layout]
    ) -> list[dict[str, list[float]]]:
        """Each passage's readout features (feature name -> one value per read sentence): the attention ones from
        the window weights, the backend's own (``sentence_columns``, one call for every sentence) from each
        sentence's vector (its windows' count-weighted mean, as the encoder's own mean pooling) and text.
        """
        read = [(i, text, layout) for i, text, layout in zip(indices, texts, layouts, strict=True) if layout.sentences]
        if not read:
            return [{} for _ in layouts]
        # every read sentence of the call and every window of its passage, numbered across the passages
        vectors = torch.cat([found.vectors[i] for i, _, _ in read]).to(torch.float32)  # (N, d)
        counts = torch.cat([found.counts[i] for i, _, _ in read]).to(torch.float32)  # (N,)
        weights = torch.cat([found.weights[i] for i, _, _ in read]).to(torch.float64)  # (N,)
        groups: list[list[int]] = []  # each sentence's windows, as rows of vectors
        first = 0
        for i, _, layout in read:
            groups += [[first + w for w in group] for group in layout.groups]
            first += found.vectors[i].shape[0]
        pairs = SentenceWindows.from_groups(vectors, groups)  # (P,) sentence-window pairs, built once per call
        sentence, window, S = pairs.sentence, pairs.window, pairs.num_sentences
        # attention features: the log of the best and of the mean weight of the sentence's windows
        best = torch.full((S,), -torch.inf, dtype=torch.float64).scatter_reduce(0, sentence, weights[window], "amax")
        size = torch.zeros(S, dtype=torch.float64).index_add_(0, sentence, torch.ones_like(weights[window]))
        mean = torch.zeros(S, dtype=torch.float64).index_add_(0, sentence, weights[window]) / size
        # each sentence's vector: its windows' count-weighted mean (as the encoder's own mean pooling)
        weighted = counts[window, None] * vectors[window]  # (P, d)
        total = torch.zeros(S, dtype=torch.float32).index_add_(0, sentence, counts[window]).clamp(min=1.0)
        sentence_vectors = torch.zeros(S, vectors.shape[1]).index_add_(0, sentence, weighted) / total[:, None]
        pieces = None
        if all(layout.pieces is not None for _, _, layout in read):
            pieces = [p for _, _, layout in read for p in layout.pieces or []]
        columns_all = {
            "attention_max": best.clamp(min=1e-9).log().tolist(),
            "attention_mean": mean.clamp(min=1e-9).log().tolist(),
            **self.backend.sentence_columns(
                found.prompt,
                [text[s:e] for _, text, layout in read for s, e in layout.sentences],
                sentence_vectors,
                pieces=pieces,
                windows=pairs,
            ),
        }  # name -> one value per sentence of every passage
        by_passage: dict[int, dict[str, list[float]]] = {}
        start = 0
        for i, _, layout in read:
            n = len(layout.sentences)
            by_passage[i] = {name: list(values[start : start + n]) for name, values in columns_all.items()}
            start += n
        return [by_passage.get(i, {}) for i in indices]

    def _decode_with_evidence(
        self, query: str, entries: list[PooledPassage], *, instruction: str, system_instruction: str, ratio: int
    ) -> _EvidencePass:
        """:meth:`_decode` that also keeps each passage's window weights ``(W_i,)`` (from the same pass) and its
        pooled vectors at ``ratio`` (what a trained sentence readout reads).
        """
        prompt = self._prompt(query, instruction=instruction, system_instruction=system_instruction)
        pooled = [repool(e.vectors, e.counts, ratio // self.base_ratio) for e in entries]  # [((W, d), (W,))]
        order = sorted(range(len(pooled)), key=lambda i: -pooled[i][0].shape[0])
        margins = torch.empty(len(pooled), dtype=torch.float32)
        weights: list[torch.Tensor] = [torch.empty(0)] * len(pooled)

        def score_batch(batch: list[int]) -> None:
            vectors, mask = right_pad_vectors([pooled[i][0] for i in batch], self.backend.dtype)  # (B, W, d), (B, W)
            batch_margins, batch_weights = self.backend.margins_and_window_weights(prompt, vectors, mask)
            margins[batch] = batch_margins
            for row, i in enumerate(batch):
                weights[i] = batch_weights[row, : pooled[i][0].shape[0]].float()

        self._for_each_batch(order, score_batch)
        self._check_finite(margins)
        self.counters["scored_pairs"] += len(entries)
        return _EvidencePass(prompt, ratio, margins, weights, [p[0] for p in pooled], [p[1] for p in pooled])

    def _warn_if_cut(self, prompt: Prompt) -> None:
        if prompt.query_cut:  # rate-limited: a client sending long queries would otherwise log every call
            self._warnings.warn(
                "query-cut",
                "a query longer than max_query_tokens=%d was cut (the model reads its first tokens only; the "
                "kalm-mini limit is its config's max_query_tokens)",
                self.max_query_tokens,
            )

    def _for_each_batch(self, order: list[int], fn: Callable[[list[int]], None]) -> None:
        """Call ``fn`` on consecutive batches of ``order``.

        On CUDA out-of-memory the batch size is halved for the rest of this call (the next call starts
        again at ``batch_size``: one large request must not slow every later one) and the failed batch is
        retried; batches already done keep their results.
        """
        size = self.batch_size
        start = 0
        while start < len(order):
            batch = order[start : start + size]
            try:
                fn(batch)
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                size = max(1, size // 2)
                self._warnings.warn("oom", "out of memory; batch size reduced to %d for this call", size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start += len(batch)

    def _default_cascade(self) -> list[tuple[int, int]]:
        """:data:`DEFAULT_CASCADE` with each ratio raised to the next multiple of ``base_ratio`` (stored windows)."""
        b = self.base_ratio
        return [(-(-r // b) * b, depth) for r, depth in DEFAULT_CASCADE]

    def _call_ratio(self, ratio: int | None) -> int:
        r = self.ratio if ratio is None else check_ratio(ratio)
        if r % self.base_ratio:
            raise InvalidInputError(
                f"ratio {r} is not a multiple of the store's base_ratio {self.base_ratio}; "
                f"load the reranker with base_ratio=1 (or a divisor of {r}) to score at this ratio"
            )
        return r

    def _progress_enabled(self, show: bool | None, total: int) -> bool:
        if show is None:
            show = self.show_progress_bar
        if show is None:
            return total > 1 and logger.getEffectiveLevel() <= logging.INFO
        return bool(show)

    async def _run_in_worker(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kalm-rag")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        """Stop the async worker thread, and close the store if this reranker opened it (from a URL)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._owns_store:
            self.store.close()


_LAYOUT_POOL: ThreadPoolExecutor | None = None
_LAYOUT_POOL_LOCK = threading.Lock()


def _forget_layout_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there (a task given to it would never run)."""
    global _LAYOUT_POOL, _LAYOUT_POOL_LOCK
    _LAYOUT_POOL, _LAYOUT_POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_layout_pool)


def _layout_pool() -> ThreadPoolExecutor:
    """Threads that lay out a call's passages (tokenizer offsets, sentences) while its decoder pass runs; shared
    by every reranker of the process (the work is short and mostly waits for the GIL the decoder releases).
    """
    global _LAYOUT_POOL
    with _LAYOUT_POOL_LOCK:
        if _LAYOUT_POOL is None:
            _LAYOUT_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kalm-rag-layouts")
        return _LAYOUT_POOL


def _resolve_storage_option(storage: object, storage_dtype: object) -> str | None:
    """``storage``, or its older name ``storage_dtype``; both given must agree."""
    storage = _check_optional_storage(storage, "storage")
    if storage_dtype is not None:
        old = _check_storage_dtype(storage_dtype, "storage_dtype")
        if storage is not None and storage != old:
            raise InvalidInputError(f"storage={storage!r} and storage_dtype={old!r} disagree; give storage alone")
        storage = old
    return storage


def _namespace_of(settings: tuple[Any, ...]) -> str:
    names = ("family", "weights", "prefix", "max_passage_tokens", "base_ratio", "storage_dtype", "compute_dtype")
    payload = json.dumps(dict(zip(names, settings)), sort_keys=True).encode()
    return f"{settings[0]}:{hashlib.sha256(payload).hexdigest()[:32]}"


def _has_entries(store: PassageStore, namespace: str) -> bool:
    """Whether ``store`` holds any entry of ``namespace`` (False for stores where asking would walk every key)."""
    from kalm_rag.store.tiered import TieredStore

    back = store.back if isinstance(store, TieredStore) else store
    if type(back).__name__ == "RedisStore":  # SCAN over the whole key space: not at every open
        return False
    try:
        return next(iter(back.iter_keys(namespace)), None) is not None
    except StoreError:
        return False


@dataclass
class _StoreOutcome:
    """What happened to the passages an encoding pass computed (filled in by ``_encode_into_store``)."""

    encoded: int = 0
    stored: int = 0
    errors: list[str] = field(default_factory=list)


class _StopEncoding(Exception):
    """Raised inside a strict encoding pass at the first failed store write, to stop it."""


# ----- device and dtype ---------------------------------------------------------------------------

_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` that exists here (default CUDA when available), else ``InvalidInputError``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise InvalidInputError(f"device must be a str such as 'cpu' or 'cuda:0', or None, got {device!r:.80}")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"device {device!r:.80} is not a torch device ({exc})") from None
    if resolved.type not in _DEVICE_TYPES:
        raise InvalidInputError(f"device type must be one of {', '.join(_DEVICE_TYPES)}, got {device!r:.80}")
    if resolved.type != "cpu":
        backend = getattr(torch, resolved.type, None)
        if backend is None or not backend.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"torch {torch.__version__}"
            raise InvalidInputError(
                f"device {str(device)!r} was asked for but {resolved.type} is not available here ({build}); "
                "use device='cpu', or None to pick CUDA only when it is available"
            )
        count = int(backend.device_count()) if hasattr(backend, "device_count") else 1
        if resolved.index is not None and resolved.index >= count:
            raise InvalidInputError(f"device {str(device)!r}: only {count} {resolved.type} device(s) here")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if resolved == torch.float16:
        raise InvalidInputError(
            "float16 is not supported: KaLM-Reranker-V1 activations overflow in fp16; use bfloat16 or float32"
        )
    if resolved not in (torch.float32, torch.bfloat16):
        raise InvalidInputError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return resolved
