"""The kalm-rag command line: thin wrappers over the engine (rerank, demo, serve), plus the developer tools
(bench, train, eval), whose heavy imports happen only when they run.

Examples:
    kalm-rag demo                                   # rerank a few built-in examples with the default model
    kalm-rag rerank --model ./KaLM-Reranker-V1-Nano --input requests.jsonl > results.jsonl
    kalm-rag serve --store sqlite:///passages.db --port 8080   # the Cohere/TEI rerank APIs over HTTP
    kalm-rag index corpus.jsonl.gz --store sqlite:///passages.db   # pre-encode a corpus into the store
    python -m kalm_rag --version
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn, TextIO

import typer

from kalm_rag._version import __version__
from kalm_rag.paths import user_cache_dir

#: Set to show the full traceback of an error instead of its one-line message.
DEBUG_ENV = "KALM_RAG_DEBUG"

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: no type column (<bool>, <path>), text as written
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # the sub-commands inherit it
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kalm-rag {__version__}")
        raise typer.Exit()


@app.callback()
def cli(
    version: Annotated[
        bool,
        typer.Option(
            "--version", metavar="", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """FBNL reranking (KaLM-Reranker-V1) with a cached-passage store.

    Start with: kalm-rag demo. Rerank a JSONL file with: kalm-rag rerank --input requests.jsonl.
    Set KALM_RAG_DEBUG=1 to see full tracebacks.
    """


ModelOption = Annotated[
    str, typer.Option("--model", "-m", envvar="KALM_RAG_MODEL", help="kalm-mini, a checkpoint folder or a hub id.")
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store", envvar="KALM_RAG_STORE", help="Store URL: memory://, sqlite:///path.db, redis://host:port/0."
    ),
]
RatioOption = Annotated[int, typer.Option("--ratio", "-r", min=1, max=32, help="MEP pooling ratio (1..32).")]


def _one_line(message: str) -> str:
    """``message`` on one line: a user reads one line per error, never a traceback."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _error(message: str) -> NoReturn:
    typer.echo(f"Error: {_one_line(message)}", err=True)
    typer.echo(f"Set {DEBUG_ENV}=1 for the full traceback.", err=True)
    raise typer.Exit(code=1)


#: The keys a request line may have; any other key is refused (a misspelt "top_k" must not be ignored).
REQUEST_KEYS = ("query", "passages", "top_k")
PASSAGE_KEYS = ("id", "text")


@dataclass(frozen=True)
class _Request:
    """One checked input line: the query, the passage texts and ids (as str), its own top_k."""

    where: str
    query: str
    texts: list[str]
    ids: list[str]
    top_k: int | None


def _read_requests(path: Path) -> list[_Request]:
    """Read and check every line of ``path`` (``-``: stdin) before anything runs; errors name the line.

    Each line is ``{"query": str, "passages": [str | {"text": str, "id": str | int}], "top_k"?: int}``.
    """
    from kalm_rag.data import read_jsonl_numbered
    from kalm_rag.errors import InvalidInputError
    from kalm_rag.validation import check_positive_int, check_text

    requests = []
    name = "stdin" if str(path) == "-" else str(path)
    source = sys.stdin.buffer if str(path) == "-" else path  # bytes: the reader decodes (and names) each line
    for n, row in read_jsonl_numbered(source, name=name):  # the reader of `kalm-rag index` too: one message
        where = f"{name}:{n}"
        if "query" not in row or "passages" not in row:
            raise InvalidInputError(f"{where}: each line needs 'query' and 'passages'")
        unknown = sorted(set(row) - set(REQUEST_KEYS))
        if unknown:
            raise InvalidInputError(f"{where}: unknown key(s) {unknown}; a line has {list(REQUEST_KEYS)}")
        try:
            query = check_text(row["query"], "query")
            top_k = None if row.get("top_k") is None else check_positive_int(row["top_k"], "top_k")
            texts, ids = _passage_texts_and_ids(row["passages"])
        except InvalidInputError as exc:
            raise InvalidInputError(f"{where}: {exc}") from None
        requests.append(_Request(where, query, texts, ids, top_k))
    return requests


def _passage_texts_and_ids(passages: object) -> tuple[list[str], list[str]]:
    """Texts and ids (always str: the given id, else the passage's position) of a line's passages."""
    from kalm_rag.errors import InvalidInputError
    from kalm_rag.validation import check_text

    if not isinstance(passages, list):
        raise InvalidInputError(f"passages must be a list, got {type(passages).__name__}")
    texts, ids = [], []
    for i, p in enumerate(passages):
        if isinstance(p, dict):
            unknown = sorted(set(p) - set(PASSAGE_KEYS))
            if unknown or "text" not in p:
                raise InvalidInputError(f"passages[{i}] must be {{'text': ..., 'id': ...}}, got keys {sorted(p)}")
            pid = p.get("id", i)
            if isinstance(pid, bool) or not isinstance(pid, (str, int)):
                raise InvalidInputError(f"passages[{i}] id must be a str or an int, got {pid!r:.80}")
            texts.append(check_text(p["text"], f"passages[{i}] text"))
            ids.append(str(pid))
        else:
            texts.append(check_text(p, f"passages[{i}]"))
            ids.append(str(i))
    return texts, ids


@app.command()
def rerank(
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL requests ('-' for stdin).", allow_dash=True)],
    model: ModelOption = "kalm-mini",
    store: StoreOption = None,
    ratio: RatioOption = 4,
    top_k: Annotated[
        int | None, typer.Option("--top-k", "-k", min=1, help="Keep the best K per query (a line's top_k wins).")
    ] = None,
    instruction: Annotated[str | None, typer.Option(help="Task instruction (default: the official one).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: CUDA when available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write JSONL here (default: stdout).")] = None,
    evidence: Annotated[
        bool, typer.Option(help='Add "evidence": the sentences that made each passage relevant, best first.')
    ] = False,
    prune: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help='Add "pruned_text": each passage cut to its best sentences (this fraction).'
        ),
    ] = None,
    prune_mass: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help='Add "pruned_text": each passage cut to its best sentences holding this share of its evidence.',
        ),
    ] = None,
) -> None:
    """Rerank passages from a JSONL file: one {"query", "passages", "top_k"?} request per line.

    A passage is a string or {"text", "id"}. Every line is checked before the model loads, and an error
    names its line. A line's own top_k takes precedence over --top-k. Each output line is
    {"query", "results": [{"index", "id", "score", "text"}]}, sorted best first; "id" is always a string
    (the passage's own id, else its position). With --output the file appears only when every line is done.
    With --evidence each result also has "evidence": [{"start", "end", "score"}] character spans of its sentences
    into "text", best first; with --prune FRACTION, "pruned_text" (the kept sentences in their order) and
    "evidence" lists the kept sentences. --prune-mass SHARE prunes by evidence instead of length: each passage
    keeps its best sentences until they hold that share of its evidence (at most one of --prune, --prune-mass).
    """
    from kalm_rag import Reranker
    from kalm_rag.errors import InvalidInputError, KalmError

    tmp: Path | None = None
    try:
        if prune is not None and prune_mass is not None:
            raise InvalidInputError(
                "give --prune (a share of characters) or --prune-mass (a share of evidence), not both"
            )
        requests = _read_requests(input)
        rr = Reranker.from_pretrained(
            model, store=store, ratio=ratio, device=device, dtype=dtype, batch_size=batch_size
        )
        if output is not None:  # written next to the destination, renamed into place when complete
            fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
            tmp = Path(name)
            out: TextIO = os.fdopen(fd, "w", encoding="utf-8")
        else:
            out = sys.stdout
        try:
            for req in requests:
                try:
                    k = req.top_k if req.top_k is not None else top_k  # the line's own top_k wins
                    if evidence or prune is not None or prune_mass is not None:
                        ranked = rr.rerank(
                            req.query,
                            req.texts,
                            top_k=k,
                            instruction=instruction,
                            evidence=True,
                            prune=prune,
                            prune_mass=prune_mass,
                        )
                    else:
                        ranked = rr.rerank(req.query, req.texts, top_k=k, instruction=instruction)
                except KalmError as exc:
                    raise KalmError(f"{req.where}: {exc}") from exc
                results = [{"index": r.index, "id": req.ids[r.index], "score": r.score, "text": r.text} for r in ranked]
                for result, r in zip(results, ranked):
                    if r.evidence is not None:
                        result["evidence"] = [span.to_dict() for span in r.evidence]
                    if r.pruned_text is not None:
                        result["pruned_text"] = r.pruned_text
                out.write(json.dumps({"query": req.query, "results": results}, ensure_ascii=False) + "\n")
        finally:
            if output is not None:
                out.close()
        if tmp is not None and output is not None:
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o666 & ~umask)  # the permissions of a file opened normally, not mkstemp's 0600
            os.replace(tmp, output)
            tmp = None
    except Exception as exc:  # one-line errors for users; tracebacks on request
        if os.environ.get("KALM_RAG_DEBUG"):
            raise
        _error(str(exc))
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class DemoExample:
    """One built-in demo query: its passages, which one answers it, and which shares its words without answering."""

    query: str
    passages: tuple[str, ...]
    answer: int  # the passage that answers the query (marked with * in the output)
    distractor: int  # a passage with many of the query's words that does not answer it


#: Varied on purpose, each with a lexical distractor; not picked for the model to look good: the demo shows
#: what the model does, right or wrong.
DEMO_EXAMPLES = (
    DemoExample(
        "What is the capital of France?",
        (
            "France is famous for its cheese, and its capital hosts many museums.",
            "Paris is the capital and largest city of France, on the Seine river.",
            "The capital of Australia is Canberra, not Sydney.",
            "Lyon is a French city known for its cuisine.",
        ),
        answer=1,
        distractor=0,
    ),
    DemoExample(
        "How do plants make their food?",
        (
            "Plants in a garden need water and food to grow well.",
            "Photosynthesis lets plants turn light, water and carbon dioxide into glucose and oxygen.",
            "Many animals eat plants as their main food.",
        ),
        answer=1,
        distractor=0,
    ),
    DemoExample(
        "Who wrote the novel Pride and Prejudice?",
        (
            "Pride and Prejudice was adapted into a film in 2005, with Keira Knightley as Elizabeth Bennet.",
            "Jane Austen wrote Pride and Prejudice; it was first published anonymously in 1813.",
            "Charlotte Bronte wrote Jane Eyre, another novel of nineteenth-century England.",
        ),
        answer=1,
        distractor=0,
    ),
)

#: What a score means, printed by the demo (and said in docs/concepts.md).
SCORE_NOTE = (
    "Score: the model's probability that the passage answers the query. kalm-mini's is calibrated on lists of\n"
    "about 100 candidates with few relevant ones, so even a right answer often scores well below 0.5. A score\n"
    "ranks the passages of one query; compare scores within a list, not across queries. * marks the passage\n"
    "that answers the query: a small model such as kalm-mini can rank a passage that only shares the query's\n"
    "words above it."
)


@app.command()
def demo(
    model: ModelOption = "kalm-mini",
    store: StoreOption = None,
    ratio: RatioOption = 4,
) -> None:
    """Rerank a few built-in examples with the default model (the README's first command) and say what the
    score means. The examples are not picked for the model to look good: * marks the right answer.
    """
    from kalm_rag import Reranker

    try:
        # a few passages: no progress bars, whatever the logger level (they would interleave with the output)
        rr = Reranker.from_pretrained(model, store=store, ratio=ratio, show_progress_bar=False)
    except Exception as exc:  # no stand-in model: a demo on random weights would show meaningless scores
        if os.environ.get(DEBUG_ENV):
            raise
        _error(f"cannot load the model {model!r}: {exc}")
    typer.echo(SCORE_NOTE)
    for example in DEMO_EXAMPLES:
        rr.encode(list(example.passages))
        typer.echo(f"\nQuery: {example.query}")
        for rank, r in enumerate(rr.rerank(example.query, list(example.passages)), start=1):
            mark = "*" if r.index == example.answer else " "
            typer.echo(f" {mark}{rank}. [{r.score:.3f}] {r.text}")
    stats = rr.store.stats()
    typer.echo(f"\nstore: {stats['entries']} passages cached, {stats['hits']} hits, {stats['misses']} misses")


@app.command()
def serve(
    model: ModelOption = "kalm-mini",
    store: StoreOption = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 answers this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    workers: Annotated[
        int,
        typer.Option(
            min=1, help="Worker processes, each with its own model; share the store with sqlite:/// or redis://."
        ),
    ] = 1,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="KALM_RAG_API_KEY",
            help="Require Authorization: Bearer KEY on every path but /health (prefer the environment variable).",
        ),
    ] = None,
    ratio: RatioOption = 4,
    max_documents: Annotated[int, typer.Option(min=1, help="Most documents per request (and largest top_n).")] = 1000,
    max_document_chars: Annotated[int, typer.Option(min=1, help="Longest document, in characters.")] = 32_768,
    max_query_chars: Annotated[
        int, typer.Option(min=1, help="Longest query or instruction, in characters (checked before tokenising).")
    ] = 8192,
    max_body: Annotated[str, typer.Option(help="Largest request body, e.g. 8MiB.")] = "8MiB",
    max_batch_passages: Annotated[
        int, typer.Option(min=1, help="Most passages the model worker coalesces into one batch.")
    ] = 256,
    max_wait_ms: Annotated[
        float, typer.Option(min=0.0, help="How long a batch waits for more requests, in milliseconds.")
    ] = 2.0,
    batching: Annotated[bool, typer.Option(help="Coalesce concurrent requests (--no-batching: one at a time).")] = True,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads per worker (default: CPU cores / workers).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Passages per encoder or decoder call.")] = 32,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: CUDA when available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16.")] = None,
    graceful_timeout: Annotated[
        int, typer.Option(min=0, help="Seconds a shutdown waits for in-flight requests (0: no limit).")
    ] = 30,
    request_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a request may wait for the model worker (then 503).")
    ] = 300.0,
    body_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a client may take to send its request body (then 408).")
    ] = 10.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: critical, error, warning, info, debug.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request (uvicorn's access log).")] = False,
    storage: Annotated[
        str | None,
        typer.Option(
            help="How vectors are stored: float32, bfloat16, int8, res4, res2 or res1. Default: what the store "
            "records for the model (as kalm-rag index wrote it), else the model's default."
        ),
    ] = None,
) -> None:
    """Serve the reranker over HTTP: the Cohere (v1, v2), Jina and TEI rerank APIs, on FastAPI + uvicorn.

    Endpoints: POST /v2/rerank, /v1/rerank (Cohere), /rerank (TEI), /v1/encode (pre-encode into the store);
    GET /health, /metrics (Prometheus), /docs. Needs the serve extra: pip install "kalm-rag[serve]".
    On SIGTERM it finishes the requests in flight (up to --graceful-timeout) and exits 0.

    \b
    Example:
        kalm-rag serve --store sqlite:///passages.db --port 8080
        curl -s localhost:8080/v2/rerank -H 'content-type: application/json' \\
          -d '{"model": "kalm-mini", "query": "capital of France?", "documents": ["Paris.", "Bananas."]}'
    """
    import shutil
    import tempfile

    from kalm_rag.errors import MissingDependencyError
    from kalm_rag.store import open_store, parse_bytes

    try:
        import uvicorn

        from kalm_rag.serve.app import API_KEY_ENV, CONFIG_ENV, ServeConfig
    except MissingDependencyError as exc:
        _error(str(exc))
    except ImportError as exc:
        _error(f'kalm-rag serve needs the serve extra: pip install "kalm-rag[serve]" ({exc.name} is missing)')
    try:
        body_bytes = parse_bytes(max_body)
        open_store(store).close()  # a bad store URL fails here, once, rather than in every worker
    except Exception as exc:
        if os.environ.get("KALM_RAG_DEBUG"):
            raise
        _error(str(exc))
    if api_key is not None and not api_key.strip():
        _error("--api-key is empty")
    if workers > 1 and (store is None or store.startswith("memory")):
        typer.echo(
            "Warning: each worker process has its own memory store; share one with --store sqlite:/// or redis://",
            err=True,
        )
    config = ServeConfig(
        model=model,
        store=store,
        ratio=ratio,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        threads=threads or max(1, (os.cpu_count() or 1) // workers),
        max_documents=max_documents,
        max_document_chars=max_document_chars,
        max_query_chars=max_query_chars,
        max_body_bytes=body_bytes,
        max_batch_passages=max_batch_passages,
        max_wait_ms=max_wait_ms,
        batching=batching,
        request_timeout_s=request_timeout,
        body_timeout_s=body_timeout,
        storage=storage,
    )
    # uvicorn's worker processes build the app from the environment (app_from_env)
    os.environ[CONFIG_ENV] = config.to_json()
    if api_key:
        os.environ[API_KEY_ENV] = api_key
    metrics_dir = None
    if workers > 1:  # /metrics adds up every worker's values (prometheus-client's multiprocess mode)
        metrics_dir = tempfile.mkdtemp(prefix="kalm-rag-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run(
            "kalm_rag.serve.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            timeout_graceful_shutdown=graceful_timeout or None,
            log_level=log_level,
            access_log=access_log,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command()
def index(
    corpus: Annotated[
        Path,
        typer.Argument(
            help="A BEIR corpus.jsonl[.gz] or folder, a JSON-lines, CSV/TSV or Parquet file, or a folder of them."
        ),
    ],
    model: ModelOption = "kalm-mini",
    store: Annotated[
        str,
        typer.Option(
            "--store",
            envvar="KALM_RAG_STORE",
            help="Store URL to fill: sqlite:///path.db (one machine) or redis://host:port/0 (a cluster).",
        ),
    ] = "",
    engine: Annotated[str, typer.Option(help="local (this process) or ray (an actor pool; kalm-rag[ray]).")] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (auto, or host:port); default: start a local Ray.")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray actors (each loads the model once).")] = 1,
    cpus_per_worker: Annotated[
        float, typer.Option(min=0.1, help="CPUs each Ray actor reserves (torch threads).")
    ] = 1.0,
    gpus_per_worker: Annotated[float, typer.Option(min=0.0, help="GPUs each Ray actor reserves.")] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Passages per encoder batch.")] = 32,
    text_field: Annotated[str, typer.Option(help="The field (column) holding the passage text.")] = "text",
    title_field: Annotated[
        str | None, typer.Option(help="A field holding a title, put before the text by passage_text().")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Read only the first N rows.")] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="How vectors are stored: float32, bfloat16, int8, res4, res2 or res1 (resN trains the store's "
            "codebook from the first 256 passages). Default: the store's recorded setting, else the model's "
            "(kalm-mini res4, official checkpoints float32)."
        ),
    ] = None,
    storage_dtype: Annotated[str | None, typer.Option(hidden=True, help="The older name of --storage.")] = None,
    base_ratio: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=32,
            help="Ratio passages are stored at. Default: the store's, else the model's (kalm-mini 4, official 1).",
        ),
    ] = None,
    max_passage_tokens: Annotated[
        int | None, typer.Option(min=1, help="Passage length cut. Default: the store's, else 1024.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: CUDA when available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Compute dtype: float32 or bfloat16.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Pre-encode every passage of a corpus into the store, skipping those already there; print a JSON report.

    The whole corpus is checked before anything is written (an error names the file and line). The passage is
    the text field alone, as the adapters and the service send it, so that indexed passages are store hits at
    query time; rerunning the same command after an interruption does only the rest. The report on stdout has
    read, unique, already_present, encoded, failed, seconds, passages_per_s, engine, workers; the exit status is
    1 when any passage is not stored (the count is on stderr) or on a bad input. It also says how the vectors
    are stored (storage) and the store's mean bytes per passage (bytes_per_passage). The settings that shape
    the vectors (--storage, --base-ratio, --max-passage-tokens) are recorded in the store, and the query side
    adopts them.
    """
    from kalm_rag.index import IncompleteIndexError, index_corpus

    if not store:
        _error("--store is required: sqlite:///path.db (one machine) or redis://host:port/0 (a cluster)")
    if store.split(":", 1)[0].strip().lower() == "memory":  # the encodings would vanish when the command exits
        _error(
            "--store memory:// lives only as long as this command, so the index would be lost at exit; "
            "use sqlite:///path.db (one machine) or redis://host:port/0 (a cluster)"
        )
    try:
        report = index_corpus(
            corpus,
            model=model,
            store=store,
            engine=engine,
            ray_address=ray_address,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            batch_size=batch_size,
            text_field=text_field,
            title_field=title_field,
            limit=limit,
            storage=storage,
            storage_dtype=storage_dtype,
            base_ratio=base_ratio,
            max_passage_tokens=max_passage_tokens,
            device=device,
            dtype=dtype,
            show_progress_bar=progress,
        )
    except IncompleteIndexError as exc:
        typer.echo(json.dumps(exc.report.to_dict()))
        if os.environ.get("KALM_RAG_DEBUG"):
            raise
        _error(f"{exc.report.failed} passages not stored: {exc}")
    except Exception as exc:  # one-line errors for users; tracebacks on request
        if os.environ.get("KALM_RAG_DEBUG"):
            raise
        _error(str(exc))
    typer.echo(json.dumps(report.to_dict()))


# Further command groups (train, eval, bench) register below.


BENCH_SHAPES = ("tiny", "nano", "small")
BENCH_WORKDIR = user_cache_dir() / "bench"


@app.command()
def bench(
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for bench.md, bench.json and the plots (nothing is written elsewhere).", file_okay=False
        ),
    ],
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="Gemma 3 tokenizer folder (tokenizer.json[.gz]), e.g. ../shared/models/gemma3-tokenizer; needed by "
            "the "
            "nano and small shapes (tiny trains its own)."
        ),
    ] = None,
    workdir: Annotated[Path, typer.Option(help="Where the random checkpoint is built and reused.")] = BENCH_WORKDIR,
    shape: Annotated[str, typer.Option(help="Model shape: nano or small (tiny for a smoke run).")] = "nano",
    n: Annotated[int, typer.Option(min=1, help="Passages per query for the efficiency measure.")] = 100,
    n_official: Annotated[int, typer.Option(min=1, help="Passages per query against the official recipe.")] = 16,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads (default: torch's).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per measure (the median is kept).")] = 3,
    quick: Annotated[bool, typer.Option(metavar="", help="Small sweeps (N up to 100, lengths up to 512).")] = False,
    plots: Annotated[bool, typer.Option(metavar="", help="Draw the latency plots (needs kalm-rag[bench]).")] = True,
) -> None:
    """Measure online scoring: warm store vs official recipe vs same-size cross-encoder, sweeps, plots.

    A developer tool: the checkpoint has random weights (speed does not depend on them) and is built once in
    WORKDIR; the report goes to OUT.
    """
    if shape not in BENCH_SHAPES:
        _error(f"--shape must be one of {', '.join(BENCH_SHAPES)}, got {shape!r}")
    if tokenizer is None and shape != "tiny":
        _error(
            f"the {shape} shape needs the Gemma 3 tokenizer: pass --tokenizer (e.g. ../shared/models/gemma3-tokenizer)"
        )
    if tokenizer is not None and not any((tokenizer / f).is_file() for f in ("tokenizer.json", "tokenizer.json.gz")):
        _error(f"--tokenizer {tokenizer} is not a tokenizer folder (no tokenizer.json or tokenizer.json.gz there)")
    if plots and importlib.util.find_spec("matplotlib") is None:
        _error('the plots need matplotlib: pip install "kalm-rag[bench]" (or pass --no-plots)')
    from kalm_rag.bench.suite import BenchConfig, run_suite

    cfg = BenchConfig(
        tokenizer=tokenizer,
        workdir=workdir,
        out_dir=out,
        shape=shape,
        n=n,
        n_official=n_official,
        threads=threads,
        repeats=repeats,
        plots=plots,
        log=lambda msg: typer.echo(msg, err=True),
    )
    if quick:
        cfg.n_sweep, cfg.length_sweep, cfg.long_tokens = (10, 30, 100), (128, 256, 512), 512
    try:
        run_suite(cfg)
    except Exception as exc:  # one-line errors for users; tracebacks on request
        if os.environ.get("KALM_RAG_DEBUG"):
            raise
        _error(str(exc))
    typer.echo((out / "bench.md").read_text())


from kalm_rag.eval.command import app as eval_app  # noqa: E402  (the groups register after the commands above)
from kalm_rag.train.command import app as train_app  # noqa: E402

app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


def main() -> None:
    """Console entry point: any error a command lets through is printed as one line (``KALM_RAG_DEBUG=1``: the
    traceback).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        typer.echo(f"Error: {_one_line(str(exc)) or type(exc).__name__}", err=True)
        typer.echo(f"Set {DEBUG_ENV}=1 for the full traceback.", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
