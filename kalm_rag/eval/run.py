"""Evaluate rerankers on BEIR-format test sets: candidates, rerank, metrics (pytrec_eval), calibration, tables.

Scores per (data set, scorer) are kept under the run's folder and written every few queries, so an interrupted
run resumes where it stopped; a file written by another scorer identity is never reused.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kalm_rag.data import BeirDataset, BM25Index, load_beir
from kalm_rag.errors import MissingDependencyError

logger = logging.getLogger(__name__)

Scorer = Callable[[str, list[str]], list[float]]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


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


@dataclass
class EvalSet:
    """A test set ready to rerank: its candidates per query, their first-stage scores, the judgements.

    Attributes:
        name: the data set's name.
        ds: the BEIR data set (corpus, queries, qrels of the file named by ``qrels_file``).
        candidates: query id -> candidate document ids, first-stage order.
        first_stage: query id -> {document id: first-stage score}.
        first_stage_name: what produced the candidates.
        qrels_file: the judgement file used.
        relevant_grade: the lowest grade that counts as relevant for the binary (calibration) measures.
    """

    name: str
    ds: BeirDataset
    candidates: dict[str, list[str]]
    first_stage: dict[str, dict[str, float]]
    first_stage_name: str
    qrels_file: str
    relevant_grade: int


def _read_run_file(path: Path) -> dict[str, dict[str, float]]:
    """``query-id -> {corpus-id: score}`` of a TSV run (``query-id, corpus-id, rank, score``, header line)."""
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        score_col = header.index("score") if "score" in header else None
        for row in reader:
            if row:
                docs = run.setdefault(row[0], {})
                docs[row[1]] = float(row[score_col]) if score_col is not None else -float(len(docs))
    return run


def load_eval_set(folder: str | Path, *, depth: int = 100, name: str | None = None) -> EvalSet:
    """A BEIR test folder with its candidates, in this order of preference.

    1. a first-stage run file in the folder (``*.run.tsv``, e.g. TREC DL's ``bm25_top100.run.tsv``): its top
       ``depth`` per query;
    2. the data set's own pools (``candidates.tsv``, e.g. WikiQA's answer sentences), BM25-scored;
    3. BM25 (bm25s) top ``depth`` over the whole corpus.

    Judgements: ``qrels/test_full_official.tsv`` when present (TREC's official file, which also judges passages
    outside the candidates), else ``qrels/test.tsv``.
    """
    folder = Path(folder)
    name = name or (folder.parent.name if folder.name in ("test", "dev", "beir") else folder.name)
    split = "test_full_official" if (folder / "qrels" / "test_full_official.tsv").is_file() else "test"
    ds = load_beir(folder, split, name=name)
    run_files = sorted(folder.glob("*.run.tsv"))
    if run_files:
        run = _read_run_file(run_files[0])
        candidates = {}
        for q in ds.queries:
            ranked = sorted(run.get(q, {}).items(), key=lambda kv: -kv[1])
            candidates[q] = [d for d, _ in ranked if d in ds.corpus][:depth]
        first = {q: {d: run[q][d] for d in docs} for q, docs in candidates.items() if docs}
        source = f"{run_files[0].name} (top {depth})"
    else:
        index = BM25Index([ds.corpus[d] for d in ds.doc_ids])
        qids = list(ds.queries)
        k = len(ds.doc_ids) if ds.candidates is not None else depth
        top, scores = index.search([ds.queries[q] for q in qids], k)
        candidates, first = {}, {}
        for qid, rows, sc in zip(qids, top, scores):
            found = {ds.doc_ids[i]: float(s) for i, s in zip(rows, sc)}
            if ds.candidates is None:
                candidates[qid] = [ds.doc_ids[i] for i in rows]
            else:
                candidates[qid] = [d for d in ds.candidates.get(qid, []) if d in ds.corpus]
            first[qid] = {d: found.get(d, 0.0) for d in candidates[qid]}
        source = f"BM25 top {depth} (bm25s)" if ds.candidates is None else "the data set's candidates.tsv pools"
    grades = [g for rel in ds.qrels.values() for g in rel.values()]
    relevant_grade = 2 if grades and max(grades) >= 3 else 1  # TREC's graded 0-3 scale: >= 2 is relevant
    candidates = {q: docs for q, docs in candidates.items() if docs}
    return EvalSet(name, ds, candidates, first, source, f"qrels/{split}.tsv", relevant_grade)


def evaluated_queries(eval_set: EvalSet, *, max_queries: int | None = None) -> list[str]:
    """The ids of the queries :func:`evaluate_set` scores: judged, with candidates, the first ``max_queries``."""
    return [q for q in eval_set.ds.queries if q in eval_set.candidates][:max_queries]


def passages_to_score(eval_set: EvalSet, *, max_queries: int | None = None) -> list[str]:
    """The distinct candidate texts of the evaluated queries (sorted): what the model must encode, no more."""
    qids = evaluated_queries(eval_set, max_queries=max_queries)
    return sorted({eval_set.ds.corpus[d] for q in qids for d in eval_set.candidates[q]})


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every NaN (an undefined share, e.g. a precision with nothing predicted) as ``None``."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


def evaluate_set(eval_set: EvalSet, scorers: list[Any], out_dir: Path, *, max_queries: int | None = None) -> dict:
    """First stage and every scorer on one set: nDCG@10 and MRR@10 per method, and calibration of model scores.

    A scorer with a ``ratio`` attribute (a :class:`~kalm_rag.eval.rerankers.RerankerScorer`) returns logits;
    their sigmoid is the engine's score, reported as expected calibration error and the precision/recall of the
    0.5 threshold (relevant: grade >= ``eval_set.relevant_grade``; unjudged candidates count as irrelevant).
    """
    from kalm_rag.train.calibrate import calibration_report

    ds = eval_set.ds
    out_dir.mkdir(parents=True, exist_ok=True)
    qids = evaluated_queries(eval_set, max_queries=max_queries)
    qrels = {q: ds.qrels[q] for q in qids}
    rows: list[dict[str, Any]] = [{"method": "BM25", **metrics(qrels, {q: eval_set.first_stage[q] for q in qids})}]
    for scorer in scorers:
        run = rerank_all(
            scorer.name, scorer, ds, {q: eval_set.candidates[q] for q in qids}, out_dir / f"{_slug(scorer.name)}.json"
        )
        row: dict[str, Any] = {"method": scorer.name, "identity": scorer.identity, **metrics(qrels, run)}
        if hasattr(scorer, "ratio"):
            probs, labels = [], []
            for q in qids:
                for d, z in run[q].items():
                    probs.append(1.0 / (1.0 + math.exp(-z)))
                    labels.append(int(ds.qrels[q].get(d, 0) >= eval_set.relevant_grade))
            row["calibration"] = _json_safe(asdict(calibration_report(probs, labels)))  # undefined: null
        rows.append(row)
        logger.info("%s %s nDCG@10 %.4f", ds.name, scorer.name, row["ndcg@10"])
    return {
        "dataset": eval_set.name,
        "queries": len(qrels),
        "first_stage": eval_set.first_stage_name,
        "qrels": eval_set.qrels_file,
        "recall@100": recall_at(qrels, eval_set.candidates, 100),
        "rows": rows,
    }


def markdown_tables(results: list[dict], *, title: str, calibration_method: str | None = None) -> str:
    """One run's tables: nDCG@10 per data set and method (with the average), then calibration of one method."""
    methods = [row["method"] for row in results[0]["rows"]]
    lines = [
        f"### {title}",
        "",
        "| data set | queries | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for res in results:
        by = {row["method"]: row for row in res["rows"]}
        cells = [f"{by[m]['ndcg@10']:.4f}" if m in by else "-" for m in methods]
        lines.append(f"| {res['dataset']} | {res['queries']} | " + " | ".join(cells) + " |")
    avg = [
        sum(next(r["ndcg@10"] for r in res["rows"] if r["method"] == m) for res in results) / len(results)
        for m in methods
    ]
    lines.append("| **average** | | " + " | ".join(f"**{v:.4f}**" for v in avg) + " |")
    lines += [
        "",
        "nDCG@10; candidates and judgements per data set: "
        + "; ".join(f"{r['dataset']}: {r['first_stage']}, {r['qrels']}" for r in results)
        + ".",
    ]
    if calibration_method:
        lines += [
            "",
            f"#### Calibration of {calibration_method} (score = P(yes))",
            "",
            "| data set | pairs | relevant | ECE | precision at 0.5 | recall at 0.5 | mean score, relevant | "
            "mean score, irrelevant |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for res in results:
            row = next((r for r in res["rows"] if r["method"] == calibration_method), None)
            if row is None or "calibration" not in row:
                continue
            c = row["calibration"]
            lines.append(
                f"| {res['dataset']} | {c['pairs']} | {c['positives']} | {c['ece']:.3f} | "
                f"{_share(c['precision_at_05'])} | {_share(c['recall_at_05'])} | {_share(c['mean_score_relevant'])} | "
                f"{_share(c['mean_score_irrelevant'])} |"
            )
    return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    """A share for the table: three decimals, or "n/a" where it is undefined (``None``: e.g. no passage scored
    >= 0.5 for the precision, no relevant passage for the recall).
    """
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
