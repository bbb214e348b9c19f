"""Evaluate rerankers on a BEIR folder: first stage, rerank, metrics (pytrec_eval), latency, tables.

Results per (data set, reranker) are kept under ``cache_dir/eval/<data set>/`` and written every few
queries, so an interrupted run resumes where it stopped; passage encodings come from the same
``EncodingCache`` as training.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kalm_rag.data import BeirDataset, BM25Index, load_beir
from kalm_rag.errors import MissingDependencyError

logger = logging.getLogger(__name__)

Scorer = Callable[[str, list[str]], list[float]]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def first_stage(ds: BeirDataset, k: int = 100) -> tuple[dict[str, dict[str, float]], dict[str, list[str]], str]:
    """BM25 scores and candidates per query: BM25 top-``k``, or the data set's own ``candidates.tsv`` pools."""
    index = BM25Index([ds.corpus[d] for d in ds.doc_ids])
    qids = list(ds.queries)
    depth = k if ds.candidates is None else min(len(ds.doc_ids), 1000)
    top, scores = index.search([ds.queries[q] for q in qids], depth)
    bm25: dict[str, dict[str, float]] = {}
    cands: dict[str, list[str]] = {}
    for qid, rows, sc in zip(qids, top, scores):
        found = {ds.doc_ids[i]: float(s) for i, s in zip(rows, sc)}
        if ds.candidates is None:
            cands[qid] = [ds.doc_ids[i] for i in rows]
            bm25[qid] = found
        else:
            cands[qid] = [d for d in ds.candidates.get(qid, []) if d in ds.corpus]
            bm25[qid] = {d: found.get(d, 0.0) for d in cands[qid]}
    source = "BM25 top-100 (bm25s)" if ds.candidates is None else "the data set's candidates.tsv pools"
    return bm25, cands, source


def recall_at(qrels: dict[str, dict[str, int]], cands: dict[str, list[str]], k: int = 100) -> float:
    vals = []
    for q, rel in qrels.items():
        relevant = {d for d, g in rel.items() if g > 0}
        if relevant:
            vals.append(len(relevant & set(cands.get(q, [])[:k])) / len(relevant))
    return float(np.mean(vals)) if vals else 0.0


def metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10 and MRR@10 with trec_eval's definitions (pytrec_eval), averaged over the judged queries.

    Queries without a positive judgement are left out; a judged query missing from ``run`` counts as 0.
    nDCG gains are the grades (trec_eval's ``ndcg_cut.10``). MRR@10 is ``recip_rank`` over each query's ten
    best documents, ordered as trec_eval orders a run: score descending, ties by document id descending.
    """
    try:
        import pytrec_eval
    except ModuleNotFoundError as exc:
        raise MissingDependencyError('metrics need pytrec-eval-terrier: pip install "kalm-rag[eval]"') from exc

    q = {qid: {d: int(g) for d, g in rel.items() if g > 0} for qid, rel in qrels.items()}
    q = {qid: rel for qid, rel in q.items() if rel}
    if not q:
        return {"ndcg@10": 0.0, "mrr@10": 0.0}
    r = {qid: {d: float(s) for d, s in run[qid].items()} for qid in q if run.get(qid)}
    top10 = {
        qid: dict(sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:10]) for qid, docs in r.items()
    }
    ndcg = pytrec_eval.RelevanceEvaluator(q, {"ndcg_cut.10"}).evaluate(r)
    rr = pytrec_eval.RelevanceEvaluator(q, {"recip_rank"}).evaluate(top10)
    n = len(q)
    return {
        "ndcg@10": sum(v["ndcg_cut_10"] for v in ndcg.values()) / n,
        "mrr@10": sum(v["recip_rank"] for v in rr.values()) / n,
    }


def read_run(path: Path) -> tuple[str | None, dict[str, dict[str, float]]]:
    """``(identity, scores)`` of a saved run file (``identity`` names the model that produced the scores)."""
    if not path.is_file():
        return None, {}
    raw = json.loads(path.read_text())
    if "scores" in raw and "identity" in raw:
        return raw["identity"], raw["scores"]
    return None, {}  # a file without identity cannot be trusted to be this model's


def rerank_all(
    name: str,
    scorer: Scorer,
    ds: BeirDataset,
    cands: dict[str, list[str]],
    out_file: Path,
    *,
    max_queries: int | None = None,
    save_every: int = 20,
) -> dict[str, dict[str, float]]:
    """Scores of every query's candidates (resumable through ``out_file``).

    Saved scores are reused only when the file names the same scorer identity (``scorer.identity``): a run
    of an earlier checkpoint is started over, never mixed in.
    """
    identity = getattr(scorer, "identity", name)
    saved_identity, run = read_run(out_file)
    if saved_identity != identity:
        if out_file.is_file():
            logger.info("%s: %s holds scores of another model (%s); starting over", name, out_file, saved_identity)
        run = {}
    qids = [q for q in ds.queries if cands.get(q)]
    if max_queries is not None:
        qids = qids[:max_queries]
    todo = [q for q in qids if q not in run]
    bar = tqdm(total=len(qids), initial=len(qids) - len(todo), desc=f"{ds.name}: {name}", unit="query", mininterval=10)
    for n, qid in enumerate(todo, start=1):
        texts = [ds.corpus[d] for d in cands[qid]]
        scores = scorer(ds.queries[qid], texts)
        run[qid] = {d: float(s) for d, s in zip(cands[qid], scores)}
        bar.update(1)
        if n % save_every == 0 or n == len(todo):
            tmp = out_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"identity": identity, "scores": run}))
            tmp.replace(out_file)
    bar.close()
    return {q: run[q] for q in qids}


def engine_latency(backend, cache, query_texts: list[str], passage_lists: list[list[str]], ratio: int) -> float:
    """Median ms of ``Reranker.score`` for one query and its (pre-encoded, stored) candidates."""
    from kalm_rag.engine import Reranker
    from kalm_rag.pooling import mep_pool
    from kalm_rag.store import MemoryStore, PooledPassage, passage_key

    rr = Reranker(backend, store=MemoryStore(), batch_size=128, show_progress_bar=False)
    entries = {}
    for ps in passage_lists:
        for p in ps:
            if not p.strip():
                continue
            states = cache.get(p)
            pooled, counts = mep_pool(states[None], torch.ones((1, states.shape[0]), dtype=torch.long), 1)
            entries[passage_key(p)] = PooledPassage(pooled[0], counts[0], 1)
    rr.store.put_many(rr.namespace, entries)
    times = []
    for q, ps in zip(query_texts, passage_lists):
        ps = [p for p in ps if p.strip()]
        rr.score(q, ps, ratio=ratio)  # warm-up on this query
        t = time.perf_counter()
        rr.score(q, ps, ratio=ratio)
        times.append(time.perf_counter() - t)
        assert rr.counters["encoded_passages"] == 0, "latency must not include passage encoding"
    return statistics.median(times) * 1000.0


def evaluate_dataset(
    folder: Path,
    *,
    rerankers: dict[str, Scorer],
    backend,
    cache,
    out_dir: Path,
    max_queries: dict[str, int | None] | None = None,
    latency_queries: int = 10,
    latency_fns: dict[str, Callable[[list[str], list[list[str]]], float]] | None = None,
) -> dict:
    """Every reranker on one data set: metrics table rows + latencies."""
    ds = load_beir(folder, "test")
    out_dir.mkdir(parents=True, exist_ok=True)
    bm25, cands, source = first_stage(ds, 100)
    recall = recall_at(ds.qrels, cands, 100)
    needed = sorted({ds.corpus[d] for q in cands for d in cands[q]})
    cache.ensure(needed, desc=f"{ds.name}: encoding candidates")
    rows: list[dict[str, Any]] = [
        {"method": "BM25", **metrics(ds.qrels, bm25), "queries": len(bm25), "latency_ms": None}
    ]
    # latency set: BM25 top-100 of the first queries (WikiQA's own pools are ~10 passages, too small)
    lat_ds = BeirDataset(ds.name, ds.corpus, ds.queries, ds.qrels, None, ds.doc_ids)
    _, lat_cands, _ = first_stage(lat_ds, 100)
    lat_q = list(ds.queries)[:latency_queries]
    lat_passages = [[ds.corpus[d] for d in lat_cands[q]] for q in lat_q]
    cache.ensure(sorted({p for ps in lat_passages for p in ps}), desc=f"{ds.name}: encoding latency set")
    runs = {"BM25": bm25}
    for name, scorer in rerankers.items():
        limit = (max_queries or {}).get(name)
        run = rerank_all(name, scorer, ds, cands, out_dir / f"{_slug(name)}.json", max_queries=limit)
        runs[name] = run
        row: dict[str, Any] = {
            "method": name,
            "identity": getattr(scorer, "identity", name),
            **metrics({q: ds.qrels[q] for q in run}, run),
            "queries": len(run),
        }
        fn = (latency_fns or {}).get(name)
        if fn is not None:
            row["latency_ms"] = fn(lat_q, lat_passages)
        rows.append(row)
        logger.info("%s %s", ds.name, row)
    # a reranker scored on a subset of queries (the slow cross-encoder): every method on that same subset,
    # including methods scored by an earlier invocation (their run files are in out_dir)
    if (out_dir / "result.json").is_file():
        for old in json.loads((out_dir / "result.json").read_text())["rows"]:
            identity, scores = read_run(out_dir / f"{_slug(old['method'])}.json")
            if old["method"] not in runs and identity is not None and identity == old.get("identity"):
                runs[old["method"]] = scores
    for row in rows:
        run = runs[row["method"]]
        if row["queries"] < len(runs["BM25"]):
            sub_qrels = {q: ds.qrels[q] for q in run}
            row["same_queries_ndcg@10"] = {
                m: metrics(sub_qrels, {q: r[q] for q in run if q in r})["ndcg@10"]
                for m, r in runs.items()
                if all(q in r for q in run)
            }
    judged = sum(1 for rel in ds.qrels.values() if any(g > 0 for g in rel.values()))
    return {"dataset": ds.name, "queries": judged, "first_stage": source, "recall@100": recall, "rows": rows}


def markdown_table(result: dict) -> str:
    lines = [
        f"### {result['dataset']} ({result['queries']} test queries with a relevant passage; "
        f"candidates: {result['first_stage']}; "
        f"first-stage Recall@100 = {result['recall@100']:.4f})",
        "",
        "| method | nDCG@10 | MRR@10 | queries scored | median latency, 100 candidates (ms) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.1f}"
        note = " (first queries only, see below)" if "same_queries_ndcg@10" in r else ""
        lines.append(f"| {r['method']}{note} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | {r['queries']} | {lat} |")
    for r in result["rows"]:
        if "same_queries_ndcg@10" in r:
            same = ", ".join(f"{m} {v:.4f}" for m, v in r["same_queries_ndcg@10"].items())
            lines += [
                "",
                f"{r['method']} scored only the first {r['queries']} queries; nDCG@10 of every method "
                f"on those queries: {same}.",
            ]
    return "\n".join(lines) + "\n"
