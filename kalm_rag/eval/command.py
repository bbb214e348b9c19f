"""Rerank BEIR-format test sets and report nDCG@10, MRR@10, Recall@100 and latency.

Examples:
\b
    kalm-rag eval run ../shared/data/scifact ../shared/data/nfcorpus       # BM25, cosine, kalm-mini r=1,4,16
    kalm-rag eval run ../shared/data/wikiqa/test --cross-encoder ~/.cache/kalm-rag/kalm-mini/runs/cross-encoder/best
    kalm-rag eval report --out docs/benchmarks                             # eval.md + eval.json from all results

A data set folder holds corpus.jsonl[.gz], queries.jsonl[.gz] and qrels/test.tsv; a candidates.tsv next to
them replaces the BM25 first stage. Runs are resumable: scores and passage encodings are cached.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from kalm_rag.paths import default_cache_dir

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, rich_markup_mode=None)

CacheDir = Annotated[Path, typer.Option("--cache-dir", envvar="KALM_RAG_CACHE", help="Encodings and per-run scores.")]
DEFAULT_CACHE = default_cache_dir()


def _name(folder: Path) -> str:
    return folder.parent.name if folder.name in ("test", "beir") else folder.name


@app.command()
def run(
    datasets: Annotated[list[Path], typer.Argument(help="BEIR-format folders.", exists=True, file_okay=False)],
    model: Annotated[str, typer.Option(help="kalm-mini or a kalm-mini checkpoint folder.")] = "kalm-mini",
    ratios: Annotated[str, typer.Option(help="kalm-mini ratios to evaluate.")] = "1,4,16",
    cross_encoder: Annotated[
        Path | None, typer.Option(help="Cross-encoder checkpoint (kalm-rag train cross-encoder).")
    ] = None,
    ce_max_queries: Annotated[
        int | None, typer.Option(help="Score only the first N queries with the (slow) cross-encoder.")
    ] = None,
    latency_queries: Annotated[int, typer.Option(min=1, help="Queries timed for the latency column.")] = 5,
    cache_dir: CacheDir = DEFAULT_CACHE,
    methods: Annotated[
        str, typer.Option(help="Which rerankers: all, or a comma list of cosine, cross-encoder, mini.")
    ] = "all",
    threads: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Evaluate every reranker on each data set; results go to CACHE_DIR/eval/NAME/result.json.

    Rows of methods not run this time are kept from an earlier result.json of the same data set.
    """
    import torch

    from kalm_rag.eval.rerankers import CosineReranker, CrossEncoderReranker, MiniReranker
    from kalm_rag.eval.run import engine_latency, evaluate_dataset, markdown_table
    from kalm_rag.models.mini import MiniBackend
    from kalm_rag.train.cache import EncodingCache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)
    backend = MiniBackend.from_pretrained(model, device=torch.device("cpu"), dtype=torch.float32)
    cache = EncodingCache(cache_dir, backend)
    wanted = {"cosine", "cross-encoder", "mini"} if methods == "all" else set(methods.split(","))
    rerankers: dict = {}
    latency: dict = {}
    if "cosine" in wanted:
        cos = CosineReranker(backend, cache)
        rerankers[cos.name] = cos
        latency[cos.name] = lambda qs, ps: _median([_time(lambda q=q, p=p: cos(q, p)) for q, p in zip(qs, ps)])
    limits = {}
    if cross_encoder is not None and "cross-encoder" in wanted:
        ce = CrossEncoderReranker(cross_encoder)
        rerankers[ce.name] = ce
        limits[ce.name] = ce_max_queries
        latency[ce.name] = lambda qs, ps: _median(_time_each(ce, qs[:3], ps[:3]))  # slow: 3 queries
    for r in [int(x) for x in ratios.split(",")] if "mini" in wanted else []:
        mr = MiniReranker(backend, cache, r)
        rerankers[mr.name] = mr
        latency[mr.name] = lambda qs, ps, r=r: engine_latency(backend, cache, qs, ps, r)
    for folder in datasets:
        name = _name(folder)
        out_dir = cache_dir / "eval" / name
        result = evaluate_dataset(
            folder,
            rerankers=rerankers,
            backend=backend,
            cache=cache,
            out_dir=out_dir,
            max_queries=limits,
            latency_queries=latency_queries,
            latency_fns=latency,
        )
        result["dataset"] = name
        result["model"] = backend.weights_id
        result["threads"] = torch.get_num_threads()
        previous = out_dir / "result.json"
        if previous.is_file():
            done = {row["method"] for row in result["rows"]}
            kept = [row for row in json.loads(previous.read_text())["rows"] if row["method"] not in done]
            result["rows"] = result["rows"][:1] + [r for r in kept if r["method"] != "BM25"] + result["rows"][1:]
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
        typer.echo(markdown_table(result))


def _time(fn) -> float:
    import time

    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0


def _time_each(fn, queries: list[str], passages: list[list[str]]) -> list[float]:
    import time

    fn(queries[0], passages[0])  # warm-up once
    out = []
    for q, p in zip(queries, passages):
        t = time.perf_counter()
        fn(q, p)
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


@app.command()
def report(
    out: Annotated[
        Path,
        typer.Option(help="Folder for eval.md and eval.json (e.g. docs/benchmarks of a checkout).", file_okay=False),
    ],
    cache_dir: CacheDir = DEFAULT_CACHE,
    order: Annotated[
        str, typer.Option(help="Data sets, in table order.")
    ] = "scifact,nfcorpus,wikiqa,cranfield,medline_med",
) -> None:
    """Gather result.json files into eval.md + eval.json (one table per data set, plus averages)."""
    from kalm_rag.eval.run import markdown_table

    results = []
    for name in order.split(","):
        f = cache_dir / "eval" / name / "result.json"
        if f.is_file():
            results.append(json.loads(f.read_text()))
    if not results:
        typer.echo(f"Error: no results under {cache_dir / 'eval'} for {order}; run kalm-rag eval run first.", err=True)
        raise typer.Exit(code=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    parts = [
        "# kalm-mini evaluation",
        "",
        "Generated by `kalm-rag eval report` from `kalm-rag eval run` results. Latency: median ms to score "
        "one query against 100 BM25 candidates on this machine (2 shared CPU cores); kalm-mini through "
        "`Reranker.score` with passages pre-encoded in the store, cosine with passage embeddings precomputed "
        "(query encoding included), the cross-encoder reading every pair.",
        "",
    ]
    parts += [markdown_table(r) for r in results]
    main = [r for r in results if r["dataset"] in ("scifact", "nfcorpus", "wikiqa")]
    if len(main) == 3:
        methods = [row["method"] for row in main[0]["rows"]]
        parts += [
            "### Average nDCG@10 over SciFact, NFCorpus, WikiQA (the bars' sets)",
            "",
            "| method | avg nDCG@10 |",
            "|---|---|",
        ]
        for m in methods:
            vals = [next((row for row in r["rows"] if row["method"] == m), None) for r in main]
            found = [v for v in vals if v is not None and "same_queries_ndcg@10" not in v]
            if len(found) == len(vals):
                parts.append(f"| {m} | {sum(v['ndcg@10'] for v in found) / 3:.4f} |")
        parts.append("")
    (out / "eval.md").write_text("\n".join(parts))
    typer.echo((out / "eval.md").read_text())
