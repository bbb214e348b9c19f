"""``--engine ray``: an actor pool of encoders on a local Ray or a Ray cluster, each writing into the store.

The driver reads and checks the whole corpus first (an error names its file and line before anything is
written), drops repeated texts, and puts the passages into Ray's object store as Arrow blocks. Ray Data then
streams the blocks through ``map_batches`` into an actor pool of ``workers`` :class:`_Encoder` actors: each loads
the model once and runs ``Reranker.encode(strict=True)`` on its batches, which skips the passages already in the
store and writes each encoder batch straight into it (SQLite for workers on one machine, Redis for a cluster).

An actor that dies (killed, out of memory, its node lost) is restarted by Ray and its batch retried: the
entries it wrote before dying are found in the store and skipped, the rest encoded; entries are addressed by
(namespace, sha256 of the text), so a retry can neither duplicate nor lose one. ``ray`` is imported here only
(``pip install "kalm-rag[ray]"``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kalm_rag.errors import InvalidInputError, KalmError, MissingDependencyError
from kalm_rag.index.corpus import Counts, unique_passages
from kalm_rag.index.report import IncompleteIndexError, IndexReport, build_report

logger = logging.getLogger(__name__)

#: Encoder batches per ``map_batches`` call: an actor sorts its batch by length (less padding) and writes each
#: encoder batch as soon as it is done, so a killed actor loses at most one encoder batch of work.
BATCHES_PER_CALL = 4
#: Restarts of a dead actor, and retries of the batch it was running, before the run fails.
MAX_RESTARTS = 3


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data ships in the ray[data] extra)
    except ModuleNotFoundError as exc:
        raise MissingDependencyError('--engine ray needs Ray Data: pip install "kalm-rag[ray]"') from exc
    return ray


class _Encoder:
    """A Ray Data actor: one reranker (the model loaded once), fed batches of passage texts.

    Args:
        model: the checkpoint (as for ``Reranker.from_pretrained``).
        store: the store URL (SQLite with an absolute path, or Redis).
        options: ``Reranker.from_pretrained`` keyword arguments (batch size, dtypes, device).
        threads: torch threads of this actor (its CPU share).
    """

    def __init__(self, model: str, store: str, options: dict[str, Any], threads: int) -> None:
        import torch

        from kalm_rag.engine import Reranker

        torch.set_num_threads(max(1, threads))
        self.reranker = Reranker.from_pretrained(model, store=store, **options)

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        """Encode one batch (a ``pyarrow.Table`` with a ``text`` column); one row of counts comes out."""
        from kalm_rag.errors import NotStoredError

        texts = batch.column("text").to_pylist()
        error = ""
        try:
            report = self.reranker.encode(texts, strict=True, show_progress_bar=False)
        except NotStoredError as exc:
            report = exc.report
            error = report.errors[-1] if report.errors else str(exc)
        return {
            "passages": [len(texts)],
            "already_present": [report.already_present],
            "encoded": [report.stored],
            "failed": [report.not_stored],
            "error": [error],
            "namespace": [self.reranker.namespace],
        }


def _kalm_cause(exc: BaseException) -> BaseException:
    """The KalmError a Ray exception wraps (Ray wraps a worker's exception in its own), else ``exc``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KalmError):
            return current
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__
    return exc


def index_ray(
    corpus: str | Path,
    *,
    model: str,
    store_url: str | Callable[[], str],
    options: dict[str, Any],
    text_field: str,
    title_field: str | None,
    limit: int | None,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    ray_address: str | None,
    ray_init: dict[str, Any] | None,
    show_progress_bar: bool,
) -> IndexReport:
    """Index ``corpus`` with an actor pool of ``workers`` encoders on Ray (see the module docstring).

    Args:
        corpus: a corpus file or folder (read by the driver).
        model: the checkpoint every actor loads.
        store_url: a SQLite URL with an absolute path, or a Redis URL: every actor opens it; or a function giving
            it, called once the corpus is read and checked (so that a bad corpus leaves no store file behind).
        options: ``Reranker.from_pretrained`` keyword arguments for the actors.
        text_field: the field holding the text.
        title_field: a field holding a title to put before the text, or ``None``.
        limit: read only the first ``limit`` rows.
        workers: actors in the pool.
        cpus_per_worker: CPUs each actor reserves (and its torch threads).
        gpus_per_worker: GPUs each actor reserves (0: none).
        ray_address: ``"auto"`` or a cluster address to join; ``None`` starts a local Ray (unless this process
            is already connected to one, which is then used as it is).
        ray_init: extra ``ray.init`` arguments for a local Ray (``num_cpus``, ``object_store_memory``, ...).
        show_progress_bar: show our progress bar and Ray Data's.

    Returns:
        The :class:`IndexReport` (``engine="ray"``).

    Raises:
        IncompleteIndexError: a worker failed in a way Ray's retries did not mend (a model that cannot load, an
            actor that keeps dying, workers whose settings differ); ``report`` says what was stored.
    """
    ray = _import_ray()
    import pyarrow as pa

    start = time.monotonic()
    counts = Counts()
    batch_rows = max(1, int(options.get("batch_size", 32))) * BATCHES_PER_CALL
    tables = [  # the whole corpus read and checked before Ray starts or the store is opened
        pa.table({"text": [text for _, text in chunk]})
        for chunk in unique_passages(
            corpus, text_field=text_field, title_field=title_field, limit=limit, chunk_size=batch_rows, counts=counts
        )
    ]
    url = store_url() if callable(store_url) else store_url
    started_here = False
    if not ray.is_initialized():
        if ray_address is not None:
            ray.init(address=ray_address, logging_level=logging.WARNING)
        else:
            init = {"num_cpus": max(1, int(round(workers * cpus_per_worker))), "include_dashboard": False}
            ray.init(**{**init, "logging_level": logging.WARNING, **(ray_init or {})})
        started_here = True
    context = ray.data.DataContext.get_current()
    progress_before = context.enable_progress_bars
    context.enable_progress_bars = show_progress_bar
    refs: list[Any] = []
    try:
        while tables:  # into the object store, released here as they go
            refs.append(ray.put(tables.pop(0)))
        present = encoded = 0
        errors: list[str] = []
        namespaces: set[str] = set()

        def report() -> IndexReport:
            return build_report(
                read=counts.read,
                unique=counts.unique,
                already_present=present,
                encoded=encoded,
                seconds=time.monotonic() - start,
                engine="ray",
                workers=workers,
                errors=tuple(errors),
            )

        if not refs:
            return report()
        remote_args: dict[str, Any] = {"max_restarts": MAX_RESTARTS, "max_task_retries": MAX_RESTARTS}
        if gpus_per_worker:
            remote_args["num_gpus"] = gpus_per_worker
        dataset = ray.data.from_arrow_refs(refs).map_batches(
            _Encoder,
            fn_constructor_kwargs={
                "model": model,
                "store": url,
                "options": options,
                "threads": max(1, int(cpus_per_worker)),
            },
            batch_size=batch_rows,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
            **remote_args,
        )
        bar = tqdm(total=counts.unique, desc="Indexing", unit="passage", disable=not show_progress_bar)
        try:
            for row in dataset.iter_rows():
                present += int(row["already_present"])
                encoded += int(row["encoded"])
                namespaces.add(str(row["namespace"]))
                bar.update(int(row["passages"]))
                if int(row["failed"]):  # the store refused a batch: stop, and say how many are missing
                    errors.append(str(row["error"]))
                    break
        except Exception as exc:  # a worker failed beyond Ray's retries: what was stored stays, and is counted
            cause = _kalm_cause(exc)
            message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            errors.append(message)
            raise IncompleteIndexError(f"the Ray workers failed: {message}", report()) from exc
        finally:
            bar.close()
        if len(namespaces) > 1:
            errors.append(f"workers wrote under {len(namespaces)} namespaces: {sorted(namespaces)}")
            raise InvalidInputError(
                "the Ray workers encoded with different settings (a GPU worker defaults to bfloat16, a CPU one to "
                "float32): pass dtype= (--dtype) so that every worker files its passages under one namespace"
            )
        return report()
    finally:
        refs.clear()
        context.enable_progress_bars = progress_before
        if started_here:
            ray.shutdown()
