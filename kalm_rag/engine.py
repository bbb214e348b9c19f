"""The FBNL reranking engine: pre-encode passages into a store, score queries against them.

Passages are encoded once (encoder -> MEP pooling at the store's base ratio) and kept in a
``PassageStore``. A query then costs only the decoder: its prompt attends to the cached passage
vectors, re-pooled exactly to the ratio asked for, and the yes/no margin is read at the last position.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from kalm_rag.errors import InvalidInputError, NumericalError, StoreError
from kalm_rag.models import DEFAULT_MODEL, load_backend
from kalm_rag.models.base import FBNLBackend
from kalm_rag.padding import right_pad, right_pad_vectors
from kalm_rag.pooling import mep_pool, repool
from kalm_rag.prompt import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_INSTRUCTION, PASSAGE_PREFIX
from kalm_rag.store import PassageStore, PooledPassage, open_store, passage_key
from kalm_rag.validation import check_passages, check_positive_int, check_ratio, check_stages, check_text

logger = logging.getLogger(__name__)

T = TypeVar("T")

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: The paper's cascade: rerank the top-100 at ratio 32, then the top-20 of those at ratio 2.
DEFAULT_CASCADE: tuple[tuple[int, int], ...] = ((32, 100), (2, 20))


@dataclass(frozen=True)
class RankedPassage:
    """One reranked passage.

    Attributes:
        index: position of the passage in the caller's input list.
        score: P(yes) (or the raw margin where asked for).
        text: the passage text.
        ratio: the MEP ratio the score was computed at.
    """

    index: int
    score: float
    text: str
    ratio: int | None = None


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


class Reranker:
    """An FBNL reranker: a model backend, a passage store and the options that shape scoring.

    Build one with :meth:`Reranker.from_pretrained`. Every option is keyword-only.

    Example:
        >>> rr = Reranker.from_pretrained("path/to/KaLM-Reranker-V1-Nano")  # doctest: +SKIP
        >>> rr.encode(["Paris is the capital of France.", "Bananas are yellow."])  # doctest: +SKIP
        >>> passages = ["Bananas are yellow.", "Paris is the capital of France."]
        >>> rr.rerank("capital of France?", passages)  # doctest: +SKIP
        [RankedPassage(index=1, score=0.98, text='Paris is ...'), RankedPassage(index=0, score=0.01, ...)]
    """

    def __init__(
        self,
        backend: FBNLBackend,
        *,
        store: PassageStore | str | None = None,
        ratio: int = 4,
        batch_size: int = 32,
        max_query_tokens: int = 512,
        max_passage_tokens: int = 1024,
        instruction: str | None = None,
        system_instruction: str | None = None,
        base_ratio: int = 1,
        storage_dtype: str = "float32",
        show_progress_bar: bool | None = None,
    ) -> None:
        self.backend = backend
        # a store passed in as an object may be shared: only a store opened here is closed by close()
        self._owns_store = not isinstance(store, PassageStore)
        self.store = store if isinstance(store, PassageStore) else open_store(store)
        self.ratio = check_ratio(ratio)
        self.base_ratio = check_ratio(base_ratio, "base_ratio")
        if self.ratio % self.base_ratio:
            raise InvalidInputError(f"ratio {ratio} is not a multiple of base_ratio {base_ratio}")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.max_query_tokens = check_positive_int(max_query_tokens, "max_query_tokens")
        self.max_passage_tokens = check_positive_int(max_passage_tokens, "max_passage_tokens")
        self.instruction = DEFAULT_INSTRUCTION if instruction is None else check_text(instruction, "instruction")
        self.system_instruction = (
            DEFAULT_SYSTEM_INSTRUCTION
            if system_instruction is None
            else check_text(system_instruction, "system_instruction")
        )
        if storage_dtype not in STORAGE_DTYPES:
            raise InvalidInputError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
        self.storage_dtype = storage_dtype
        self.show_progress_bar = show_progress_bar
        #: Work counters: passages run through the encoder, encoder batches, pairs scored, and distinct
        #: passages found in the store (hits) or not (misses) when scoring.
        self.counters = {
            "encoded_passages": 0,
            "encoder_batches": 0,
            "scored_pairs": 0,
            "store_hits": 0,
            "store_misses": 0,
        }
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        store: PassageStore | str | None = None,
        ratio: int = 4,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        max_query_tokens: int = 512,
        max_passage_tokens: int = 1024,
        instruction: str | None = None,
        system_instruction: str | None = None,
        base_ratio: int = 1,
        storage_dtype: str = "float32",
        show_progress_bar: bool | None = None,
    ) -> Reranker:
        """Load a KaLM-Reranker-V1 checkpoint (local folder or hub id) as a reranker.

        Args:
            name_or_path: ``"kalm-mini"`` (the embedded default), a local checkpoint folder, or a hub id
                such as ``KaLM-Embedding/KaLM-Reranker-V1-Nano``.
            store: a ``PassageStore`` or a store URL; ``None`` gives a bounded in-memory store.
            ratio: default MEP ratio (1..32) for scoring calls that give none.
            device: ``cpu``, ``cuda``, ...; default CUDA when available.
            dtype: ``float32`` or ``bfloat16``; default fp32 on CPU, bf16 on CUDA. fp16 is refused.
            batch_size: passages per encoder or decoder batch (shrunk automatically on CUDA out-of-memory).
            max_query_tokens: the query is cut to this many tokens before it is put in the prompt.
            max_passage_tokens: ``"<Document>: " + passage`` is cut to this many tokens.
            instruction: task instruction (default: the official one).
            system_instruction: system instruction, the prompt's first line (default: the official one).
            base_ratio: ratio at which passages are stored; any call ratio must be a multiple of it.
            storage_dtype: dtype of stored vectors, ``float32`` or ``bfloat16``.
            show_progress_bar: show progress on long encodes; ``None`` follows the logger level.
        """
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
            storage_dtype=storage_dtype,
            show_progress_bar=show_progress_bar,
        )

    # ----- identity --------------------------------------------------------------------------------

    @functools.cached_property
    def namespace(self) -> str:
        """The store namespace: model weights identity + every setting that changes passage encodings."""
        import hashlib
        import json

        settings = {
            "family": self.backend.family,
            "weights": self.backend.passage_encoder_id,
            "prefix": PASSAGE_PREFIX,
            "max_passage_tokens": self.max_passage_tokens,
            "base_ratio": self.base_ratio,
            "storage_dtype": self.storage_dtype,
            "compute_dtype": str(self.backend.dtype).removeprefix("torch."),
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
        return f"{self.backend.family}:{digest}"

    # ----- passage side ----------------------------------------------------------------------------

    def encode(self, passages: Sequence[str], *, show_progress_bar: bool | None = None) -> int:
        """Pre-encode passages into the store, skipping those already there.

        Returns:
            How many distinct passages were run through the encoder.
        """
        texts = check_passages(passages)
        keys = [passage_key(t) for t in texts]
        present = self.store.contains_many(self.namespace, keys)
        missing = dict((k, t) for k, t, p in zip(keys, texts, present) if not p)
        if missing:
            self._encode_into_store(missing, show_progress_bar=show_progress_bar)
        return len(missing)

    def _encode_into_store(
        self, texts_by_key: dict[str, str], *, show_progress_bar: bool | None
    ) -> dict[str, PooledPassage]:
        """Run the encoder over ``texts_by_key`` (longest first), pool, store and return the entries."""
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
            pooled = pooled.to(STORAGE_DTYPES[self.storage_dtype]).cpu()
            counts = counts.cpu()
            new = {}
            for row, i in enumerate(batch):
                W = math.ceil(len(token_ids[i]) / self.base_ratio)
                new[keys[i]] = PooledPassage(pooled[row, :W].clone(), counts[row, :W].clone(), self.base_ratio)
            try:
                self.store.put_many(self.namespace, new)  # per batch: a crash loses at most one batch
            except StoreError as exc:  # the vectors are computed: score with them even if they cannot be kept
                logger.warning("could not store %d encoded passages (%s); scoring goes on", len(new), exc)
            entries.update(new)
            self.counters["encoded_passages"] += len(batch)
            self.counters["encoder_batches"] += 1
            bar.update(len(batch))

        self._for_each_batch(order, encode_batch)
        bar.close()
        return entries

    def _pooled(self, texts: list[str]) -> list[PooledPassage]:
        """Stored encodings of ``texts`` (encoding and storing those that are missing or unusable)."""
        keys = [passage_key(t) for t in texts]
        try:
            found = self.store.get_many(self.namespace, keys)
        except StoreError as exc:
            logger.warning("passage store unavailable (%s); encoding %d passages", exc, len(keys))
            found = [None] * len(keys)
        by_key = {k: e for k, e in zip(keys, found) if e is not None and e.ratio == self.base_ratio}
        missing = {k: t for k, t in zip(keys, texts) if k not in by_key}
        self.counters["store_hits"] += len(by_key)
        self.counters["store_misses"] += len(missing)
        if missing:
            by_key.update(self._encode_into_store(missing, show_progress_bar=False))
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
        return margins.tolist() if return_margin else torch.sigmoid(margins).tolist()

    def rerank(
        self,
        query: str,
        passages: Sequence[str],
        *,
        top_k: int | None = None,
        instruction: str | None = None,
        ratio: int | None = None,
    ) -> list[RankedPassage]:
        """Passages sorted best first (ties keep input order), cut to ``top_k``."""
        if top_k is not None:
            top_k = check_positive_int(top_k, "top_k")
        r = self._call_ratio(ratio)
        scores = self.score(query, passages, instruction=instruction, ratio=r)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [RankedPassage(index=i, score=scores[i], text=passages[i], ratio=r) for i in ranked[:top_k]]

    def rerank_cascade(
        self,
        query: str,
        passages: Sequence[str],
        *,
        stages: Sequence[tuple[int, int]] = DEFAULT_CASCADE,
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
            stages: ``(ratio, depth)`` pairs, coarse to fine; default ``((32, 100), (2, 20))``, the
                paper's cascade (top-100 at r=32, then top-20 at r=2).
            top_k: keep the best ``top_k`` of the final ranking.
            instruction: task instruction for this call.
        """
        if top_k is not None:
            top_k = check_positive_int(top_k, "top_k")
        texts = check_passages(passages)
        stages = check_stages(stages)
        for r, _ in stages:
            self._call_ratio(r)
        ordered: list[int] = list(range(len(texts)))  # the first stage reads the retriever's order
        scored: dict[int, RankedPassage] = {}
        for stage, (r, depth) in enumerate(stages):
            head, rest = ordered[:depth], ordered[depth:]
            scores = self.score(query, [texts[i] for i in head], instruction=instruction, ratio=r)
            for i, score in zip(head, scores):
                scored[i] = RankedPassage(index=i, score=score, text=texts[i], ratio=r)
            head = sorted(head, key=lambda i: -scored[i].score)
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
        missing ones encoded together; then requests that share a prompt (query, instructions, ratio) go
        through the decoder together, and the other prompts one after another. Each result equals
        :meth:`score` of its request up to float rounding (batch composition changes the padding).

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
        prompts: dict[tuple[str, str, str, int], list[int]] = {}  # requests sharing one prompt, in order
        for i, (query, texts, instr, system, r) in enumerate(checked):
            if texts:
                prompts.setdefault((query, instr, system, r), []).append(i)
        out: list[list[float]] = [[] for _ in checked]
        for (query, instr, system, r), members in prompts.items():
            texts = [t for i in members for t in checked[i][1]]
            margins = self._decode(
                query, [entries[t] for t in texts], instruction=instr, system_instruction=system, ratio=r
            )
            values = (margins if return_margin else torch.sigmoid(margins)).tolist()
            start = 0
            for i in members:
                out[i] = values[start : start + len(checked[i][1])]
                start += len(checked[i][1])
        return out

    async def ascore(self, query: str, passages: Sequence[str], **kwargs: Any) -> list[float]:
        """:meth:`score` on the reranker's worker thread; the event loop keeps running meanwhile."""
        return await self._run_in_worker(functools.partial(self.score, query, passages, **kwargs))

    async def arerank(self, query: str, passages: Sequence[str], **kwargs: Any) -> list[RankedPassage]:
        """:meth:`rerank` on the reranker's worker thread; the event loop keeps running meanwhile."""
        return await self._run_in_worker(functools.partial(self.rerank, query, passages, **kwargs))

    async def aencode(self, passages: Sequence[str], **kwargs: Any) -> int:
        """:meth:`encode` on the reranker's worker thread."""
        return await self._run_in_worker(functools.partial(self.encode, passages, **kwargs))

    # ----- internals -------------------------------------------------------------------------------

    def _margins(self, query: str, texts: list[str], *, instruction: str, ratio: int) -> torch.Tensor:
        """Margins ``(N,)`` of one query against ``texts``: store lookups, exact re-pooling, decoder."""
        return self._decode(
            query, self._pooled(texts), instruction=instruction, system_instruction=self.system_instruction, ratio=ratio
        )

    def _decode(
        self, query: str, entries: list[PooledPassage], *, instruction: str, system_instruction: str, ratio: int
    ) -> torch.Tensor:
        """Margins ``(N,)`` of one query against stored entries: exact re-pooling, decoder."""
        prompt = self.backend.prompt_ids(
            query,
            instruction=instruction,
            system_instruction=system_instruction,
            max_query_tokens=self.max_query_tokens,
        )
        pooled = [repool(e.vectors, e.counts, ratio // self.base_ratio)[0] for e in entries]
        order = sorted(range(len(pooled)), key=lambda i: -pooled[i].shape[0])
        margins = torch.empty(len(pooled), dtype=torch.float32)

        def score_batch(batch: list[int]) -> None:
            vectors, mask = right_pad_vectors([pooled[i] for i in batch], self.backend.dtype)  # (B, W, d), (B, W)
            margins[batch] = self.backend.margins(prompt, vectors, mask)

        self._for_each_batch(order, score_batch)
        if not torch.isfinite(margins).all():
            raise NumericalError(
                f"non-finite scores in {self.backend.dtype}; the model overflows in this dtype, use float32 or bfloat16"
            )
        self.counters["scored_pairs"] += len(entries)
        return margins

    def _for_each_batch(self, order: list[int], fn: Callable[[list[int]], None]) -> None:
        """Call ``fn`` on consecutive batches of ``order``.

        On CUDA out-of-memory the batch size is halved and the failed batch retried; batches already
        done keep their results.
        """
        start = 0
        while start < len(order):
            batch = order[start : start + self.batch_size]
            try:
                fn(batch)
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                logger.warning("out of memory; batch size reduced to %d", self.batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start += len(batch)

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


# ----- device and dtype ---------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
