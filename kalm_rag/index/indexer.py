"""``index_corpus``: the one entry point of both engines (the command line calls it too)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kalm_rag.errors import InvalidInputError, StoreConfigError, StoreUnavailableError
from kalm_rag.index.local import index_local
from kalm_rag.index.report import IncompleteIndexError, IndexReport
from kalm_rag.models import DEFAULT_MODEL
from kalm_rag.store import PassageStore, check_store_url, open_store, redact_url
from kalm_rag.validation import check_positive_int

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


def index_corpus(
    corpus: str | os.PathLike[str],
    *,
    store: PassageStore | str | os.PathLike[str],
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    engine: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    batch_size: int = 32,
    text_field: str = "text",
    title_field: str | None = None,
    limit: int | None = None,
    storage_dtype: str | None = None,
    base_ratio: int | None = None,
    max_passage_tokens: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    ray_init: dict[str, Any] | None = None,
    show_progress_bar: bool | None = None,
    strict: bool = True,
    storage: str | None = None,
) -> IndexReport:
    """Pre-encode every passage of a corpus into a passage store, skipping those already there.

    The whole corpus is read and checked before anything is written: a bad row (no text field, a line that is
    not JSON, an empty file) raises an error naming its file and line and leaves the store untouched. Then the
    distinct passages missing from the store (same namespace: model and passage-side settings) are encoded and
    written batch by batch, so an interrupted run, rerun with the same arguments, does only the rest. The
    vectors are those ``Reranker.encode`` computes in process (within float rounding of the batch), and a
    reranker with the same model and settings on the same store then scores these passages with no encoder work.

    Args:
        corpus: a BEIR ``corpus.jsonl[.gz]`` or folder, a JSON-lines, CSV/TSV or Parquet file, or a folder of them.
        store: the store: a URL (``sqlite:///passages.db``, ``redis://host:6379/0``), a SQLite path, or (local
            engine only) a ``PassageStore``.
        model: ``"kalm-mini"`` (the embedded default), a checkpoint folder or a hub id; the query side must use
            the same one.
        engine: ``"local"`` (this process, every core) or ``"ray"`` (an actor pool; ``kalm-rag[ray]``).
        workers: actors of the Ray engine (the local engine has one).
        ray_address: ``"auto"`` or an address to join a Ray cluster; ``None`` starts a local Ray.
        batch_size: passages per encoder batch.
        text_field: the field (column) holding the passage text; the passage is that text alone, unchanged.
        title_field: a field holding a title: the passage is then ``passage_text(title, text)``.
        limit: read only the first ``limit`` rows.
        storage_dtype: the older name of ``storage`` (``"float32"`` or ``"bfloat16"``).
        base_ratio: the ratio passages are stored at (1: every ratio is derived exactly; 4: a quarter of the
            store size, call ratios multiples of 4).
        max_passage_tokens: passage length cut.
        storage: how vectors are kept: ``float32``, ``bfloat16``, ``int8``, ``res4``, ``res2`` or ``res1``
            (``resN`` trains the store's codebook from the first 256 passages, docs/store.md).
            ``base_ratio``, ``storage`` and ``max_passage_tokens`` left out are the store's recorded settings
            for the model, else the model's defaults; they are recorded in the store, so a reranker opened on
            it later adopts them.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        dtype: compute dtype, ``"float32"`` or ``"bfloat16"``; default float32 on CPU, bfloat16 on CUDA.
        cpus_per_worker: CPUs each Ray actor reserves (and its torch threads).
        gpus_per_worker: GPUs each Ray actor reserves.
        ray_init: extra ``ray.init`` arguments when a local Ray is started (e.g. ``object_store_memory``).
        show_progress_bar: show progress on stderr; ``None`` follows the logger level (INFO shows it).
        strict: raise :class:`IncompleteIndexError` when passages are missing at the end (else only report it).

    Returns:
        An :class:`IndexReport`: rows read, distinct passages, already present, encoded, failed, time, rate.

    Raises:
        InvalidInputError: a bad option, corpus file or row (the message names the file and line).
        StoreConfigError: a store URL that cannot be used (for Ray: not SQLite or Redis).
        IncompleteIndexError: ``strict`` and some passages are not stored (the store refused them, or a worker
            failed); ``report.failed`` says how many. What was stored stays: rerun to finish.
        MissingDependencyError: ``engine="ray"`` without Ray installed, or a CSV/Parquet corpus without pyarrow.

    Example:
        >>> report = index_corpus("corpus.jsonl.gz", store="sqlite:///passages.db")  # doctest: +SKIP
        >>> report.to_dict()  # doctest: +SKIP
        {'read': 5183, 'unique': 5183, 'already_present': 0, 'encoded': 5183, 'failed': 0, ...}
    """
    if engine not in ENGINES:
        raise InvalidInputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    workers = check_positive_int(workers, "workers")
    batch_size = check_positive_int(batch_size, "batch_size")
    if limit is not None:
        limit = check_positive_int(limit, "limit")
    if engine == "local" and (workers != 1 or ray_address is not None):
        given = "workers" if workers != 1 else "ray_address"
        raise InvalidInputError(f"{given} is an option of the Ray engine: pass engine='ray' (--engine ray) with it")
    for name, value in (("text_field", text_field), ("title_field", title_field)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidInputError(f"{name} must be a non-empty str, got {value!r}")
    corpus = Path(corpus)
    if not corpus.exists():
        raise InvalidInputError(f"corpus {corpus} does not exist")
    if show_progress_bar is None:
        show_progress_bar = logger.getEffectiveLevel() <= logging.INFO
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
    }
    shaping = {
        "storage": storage,
        "storage_dtype": storage_dtype,
        "base_ratio": base_ratio,
        "ratio": base_ratio,  # the call ratio must be a multiple of base_ratio; indexing never scores
        "max_passage_tokens": max_passage_tokens,
    }
    options.update({k: v for k, v in shaping.items() if v is not None})  # left out: the store's, or defaults
    if engine == "local":
        local_store = store if isinstance(store, PassageStore) else os.fspath(store)
        if isinstance(local_store, str):
            check_store_url(local_store)  # a bad URL fails before the corpus is read

        def load() -> Any:
            from kalm_rag.engine import Reranker

            return Reranker.from_pretrained(model, store=local_store, **options)

        report = index_local(
            corpus,
            load,
            text_field=text_field,
            title_field=title_field,
            limit=limit,
            show_progress_bar=show_progress_bar,
        )
    else:
        from kalm_rag.index.ray_engine import index_ray

        shared = refuse_unshared(store)
        check_store_url(shared)  # a bad URL fails before the corpus is read; the store is opened after it
        if dtype is None:  # one namespace for every worker: a GPU worker would default to bfloat16, a CPU one not
            options["dtype"] = "bfloat16" if gpus_per_worker else "float32"
        report = index_ray(
            corpus,
            model=os.fspath(model),
            store_url=lambda: shared_store_url(shared),
            options=options,
            text_field=text_field,
            title_field=title_field,
            limit=limit,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            ray_address=ray_address,
            ray_init=ray_init,
            show_progress_bar=show_progress_bar,
        )
    if strict and report.failed:
        reason = report.errors[-1] if report.errors else "unknown error"
        raise IncompleteIndexError(
            f"{report.failed} of {report.unique} passages were not stored ({report.encoded} encoded and stored, "
            f"{report.already_present} already present): {reason}",
            report,
        )
    return report


def refuse_unshared(store: PassageStore | str | os.PathLike[str]) -> str:
    """The store URL as a string, refusing one the Ray workers cannot share: a store object, or ``memory://``.

    Raises:
        StoreConfigError: a store object, or a ``memory://`` URL (each worker would have its own, lost at the end).
    """
    if isinstance(store, PassageStore):
        raise StoreConfigError(
            "the Ray engine needs a store URL that every worker can open (sqlite:///path.db on one machine, "
            "redis://host:6379/0 for a cluster), not a store object"
        )
    if isinstance(store, str) and store.split(":", 1)[0].lower() == "memory":  # (a path is never memory)
        raise StoreConfigError(
            f"{redact_url(store)!r}: a memory store lives in one process, so the Ray workers' encodings would be "
            "lost; use sqlite:///path.db (one machine) or redis://host:6379/0 (a cluster)"
        )
    return os.fspath(store)


def shared_store_url(store: str) -> str:
    """The URL every Ray worker opens: a SQLite file by absolute path, or the Redis URL as given.

    The store is opened once here (after the corpus is checked), so that an unreachable server or a file that
    cannot be created fails before Ray starts.

    Raises:
        StoreConfigError: a store object, or a ``memory://`` URL.
        StoreUnavailableError: a Redis server that cannot be reached.
    """
    refuse_unshared(store)
    opened = open_store(store)
    try:
        from kalm_rag.store.sqlite import SQLiteStore
        from kalm_rag.store.tiered import TieredStore

        base = opened.back if isinstance(opened, TieredStore) else opened
        if isinstance(base, SQLiteStore):
            return f"sqlite:///{base.path}"  # absolute (the workers' working folder is not ours); no memory tier
        if not opened.healthy():
            raise StoreUnavailableError(f"the store {opened!r} cannot be reached from the driver")
        return store
    finally:
        opened.close()
