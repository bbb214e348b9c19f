"""Rerank BEIR-format test sets with any model through the Reranker API, next to BM25 and MiniLM cosine.

\b
Examples:
    kalm-rag eval run ../shared/data/scifact ../shared/data/trec-dl-2019 --out runs/eval-mini
    kalm-rag eval run ../shared/data/nfcorpus --model path/to/KaLM-Reranker-V1-Nano --ratios 4 --out runs/eval-nano

A data set folder holds corpus.jsonl[.gz], queries.jsonl[.gz] and qrels/test.tsv; a first-stage run file
(*.run.tsv) or a candidates.tsv next to them replaces the BM25 first stage. Passage encodings are kept in a
SQLite store under the cache folder and scores per method are saved as they come, so a rerun is cheap.
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


@app.command()
def run(
    datasets: Annotated[list[Path], typer.Argument(help="BEIR-format test folders.", exists=True, file_okay=False)],
    out: Annotated[
        Path, typer.Option(help="Folder for this run's eval.md, eval.json and per-method scores.", file_okay=False)
    ],
    model: Annotated[str, typer.Option(help="kalm-mini, a checkpoint folder or a hub id.")] = "kalm-mini",
    ratios: Annotated[str, typer.Option(help="MEP ratios to score the model at.")] = "1,4,16",
    cosine: Annotated[bool, typer.Option(help="Also rerank with all-MiniLM-L6-v2 cosine.")] = True,
    max_queries: Annotated[int | None, typer.Option(min=1, help="Score only the first N queries of each set.")] = None,
    cache_dir: CacheDir = DEFAULT_CACHE,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads.")] = None,
) -> None:
    """Score every data set with BM25 (the first stage), cosine and the model at each ratio; one table per run.

    The model runs through Reranker.score, exactly as users call it (passages encoded once into a SQLite store
    under CACHE_DIR/eval). Writes OUT/eval.md (nDCG@10 per set and method, with the average, and the
    calibration of the model's scores at its default ratio) and OUT/eval.json.
    """
    import torch

    from kalm_rag.engine import Reranker
    from kalm_rag.eval.rerankers import CosineScorer, RerankerScorer
    from kalm_rag.eval.run import evaluate_set, load_eval_set, markdown_tables, passages_to_score

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)
    eval_sets = [load_eval_set(folder) for folder in datasets]  # a bad folder fails before the model loads
    store_dir = cache_dir / "eval"
    store_dir.mkdir(parents=True, exist_ok=True)
    # exact vectors at base ratio 1: the evaluation measures the model at every ratio, not a storage codec
    rr = Reranker.from_pretrained(
        model,
        store=f"sqlite:///{(store_dir / 'passages.db').resolve()}?memory_tier=2GB",
        show_progress_bar=True,
        base_ratio=1,
        storage="float32",
    )
    label = "kalm-mini" if model == "kalm-mini" else Path(model).name
    ratio_list = [int(r) for r in ratios.split(",") if r.strip()]
    scorers: list = [CosineScorer(stored_from=rr)] if cosine else []  # reads the states the model stored
    scorers += [RerankerScorer(rr, r, label=label) for r in ratio_list]
    results = []
    for eval_set in eval_sets:
        rr.encode(passages_to_score(eval_set, max_queries=max_queries))  # only the queries evaluated
        results.append(evaluate_set(eval_set, scorers, out / eval_set.name, max_queries=max_queries))
    default = rr.ratio if rr.ratio in ratio_list else ratio_list[0]
    table = markdown_tables(
        results, title=f"{label} ({rr.backend.weights_id})", calibration_method=f"{label} r={default}"
    )
    out.mkdir(parents=True, exist_ok=True)
    saved = {"model": rr.backend.weights_id, "results": results}
    (out / "eval.json").write_text(json.dumps(saved, indent=2, allow_nan=False) + "\n")  # strict JSON: no NaN
    (out / "eval.md").write_text(table)
    typer.echo(table)
    rr.close()


@app.command()
def evidence(
    out: Annotated[Path, typer.Option(help="Folder for evidence.md and evidence.json.", file_okay=False)],
    squad: Annotated[
        Path | None, typer.Option(help="SQuAD dev folder (evidence.jsonl.gz, corpus.jsonl.gz).", file_okay=False)
    ] = None,
    wikiqa: Annotated[
        Path | None, typer.Option(help="WikiQA test folder (BEIR + candidates.tsv).", file_okay=False)
    ] = None,
    model: Annotated[str, typer.Option(help="kalm-mini, a checkpoint folder or a hub id.")] = "kalm-mini",
    ratios: Annotated[str, typer.Option(help="MEP ratios to read evidence at.")] = "4",
    baselines: Annotated[bool, typer.Option(help="Also score first sentence, BM25 and MiniLM cosine.")] = True,
    max_queries: Annotated[int | None, typer.Option(min=1, help="Use only the first N examples of each set.")] = None,
    timing: Annotated[bool, typer.Option(help="Time evidence on a rerank of 100 cached SQuAD paragraphs.")] = True,
    training_free: Annotated[
        bool, typer.Option(help="Also measure kalm-mini's training-free readout next to its trained evidence head.")
    ] = True,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads.")] = None,
) -> None:
    """Evidence quality: top-1 answer-sentence accuracy, recall at 50% kept, characters kept at 95% recall.

    Without --squad and --wikiqa it runs on a tiny built-in set (a smoke test). Writes OUT/evidence.md and
    OUT/evidence.json.
    """
    import torch

    from kalm_rag.engine import Reranker
    from kalm_rag.eval import evidence as ev

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)
    rr = Reranker.from_pretrained(model)
    label = "kalm-mini" if model == "kalm-mini" else Path(model).name
    sets: dict[str, list[ev.EvidenceExample]] = {}
    if squad is not None:
        sets["SQuAD dev"] = ev.load_squad_evidence(squad, limit=max_queries)
    if wikiqa is not None:
        sets["WikiQA test"] = ev.load_wikiqa_evidence(wikiqa, limit=max_queries)
    if not sets:
        sets["built-in"] = ev.builtin_examples()[:max_queries]
    scorers: dict[str, ev.SentenceScorer] = {}
    if baselines:
        scorers.update(
            {
                "first sentence": ev.first_sentence_scores,
                "BM25 (bm25s)": ev.bm25_scores,
                "MiniLM cosine": ev.cosine_scores,
            }
        )
    trained = rr.backend.evidence_readout is not None
    exact = None  # a ratio the default store cannot give (kalm-mini keeps base-4 vectors) reads an exact store
    for r in (int(x) for x in ratios.split(",") if x.strip()):
        reader = rr
        if r % rr.base_ratio:
            exact = exact or Reranker.from_pretrained(model, base_ratio=1, storage="float32")
            reader = exact
        scorers[f"{label} r={r}" + (" (trained readout)" if trained else "")] = ev.model_scores(reader, ratio=r)
        if trained and training_free:
            scorers[f"{label} r={r} (training-free)"] = ev.model_scores(reader, ratio=r, training_free=True)
    results = {name: ev.evaluate(examples, scorers) for name, examples in sets.items()}
    report: dict = {
        "model": rr.backend.weights_id,
        "examples": {k: len(v) for k, v in sets.items()},
        "results": results,
    }
    table = ev.markdown_table(results)
    if timing and squad is not None:
        paragraphs = list(dict.fromkeys(ex.text for ex in sets["SQuAD dev"]))[:100]
        report["timing"] = ev.evidence_overhead(rr, sets["SQuAD dev"][0].query, paragraphs)
        t = report["timing"]
        table += (
            f"\nrerank of {int(t['passages'])} cached passages: {t['plain_ms']:.1f} ms, with evidence "
            f"{t['evidence_ms']:.1f} ms (+{100 * t['overhead']:.1f}%; passages not seen before: "
            f"{t['cold_evidence_ms']:.1f} ms, +{100 * t['cold_overhead']:.1f}%; the best 10 of them: "
            f"{t['cold_top10_ms']:.1f} ms, +{100 * t['cold_top10_overhead']:.1f}%)\n"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "evidence.md").write_text(table)
    typer.echo(table)
    rr.close()
