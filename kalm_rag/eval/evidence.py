"""``kalm-rag eval evidence``: how well evidence spans find the answer sentence, and what pruning keeps.

Each example is a query, one passage, its sentences and the gold ones:
- SQuAD dev (``squad/dev/evidence.jsonl.gz`` + ``corpus.jsonl.gz``): the question's own paragraph, split with
  ``sentencex`` as the library does; gold = every sentence that holds an occurrence of an answer string (the
  answer offsets are not in the data, so a repeated answer string makes several sentences gold; any counts).
- WikiQA test (``wikiqa/test``): each answerable question's candidate sentences joined by a space into one
  passage, the candidates as its sentences; gold = the sentences labelled 1 (recall counts each).

Metrics per method: top-1 accuracy (the best-scored sentence is gold); answer-sentence recall when each passage
is pruned to 50 % of its characters (:func:`kalm_rag.evidence.select_sentences`, the rule ``rerank(prune=)``
uses); the smallest budget at which mean recall reaches 95 %, reported as the mean fraction of characters
actually kept. Characters stand in for tokens (both tokenizers here cut words into pieces in proportion).
Baselines: the first sentences (in order), BM25 per sentence (``bm25s``), all-MiniLM-L6-v2 cosine per sentence.
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kalm_rag.evidence import (
    EvidenceSpan,
    select_by_mass,
    select_sentences,
    sentence_spans,
)

#: The budgets scanned for the 95 % recall point (fractions of each passage's characters).
BUDGETS = tuple(i / 100 for i in range(1, 101))
#: The evidence masses scanned for the 95 % recall point of the ``prune_mass`` rule.
MASSES = tuple(i / 200 for i in range(1, 200)) + (0.999, 1.0)


@dataclass
class EvidenceExample:
    """A query, its passage, the passage's sentences (character spans) and the gold sentences' indices."""

    qid: str
    query: str
    text: str
    sentences: list[tuple[int, int]]
    gold: set[int]
    #: ``"any"``: a hit if one gold sentence is kept (SQuAD); ``"all"``: recall is the fraction kept (WikiQA).
    recall: str = "any"
    extra: dict[str, Any] = field(default_factory=dict)


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_squad_evidence(folder: str | Path, *, limit: int | None = None) -> list[EvidenceExample]:
    """SQuAD dev evidence examples from ``folder`` (holding ``evidence.jsonl.gz`` and ``corpus.jsonl.gz``)."""
    folder = Path(folder)
    corpus = {d["_id"]: d["text"] for d in _jsonl(folder / "corpus.jsonl.gz")}
    out = []
    for row in _jsonl(folder / "evidence.jsonl.gz"):
        text = corpus[row["corpus-id"]]
        sentences = sentence_spans(text)
        gold = {
            i
            for answer in row["answers"]
            for m in re.finditer(re.escape(answer), text)
            for i, (s, e) in enumerate(sentences)
            if s <= m.start() < e
        }
        if gold:
            out.append(EvidenceExample(row["_id"], row["question"], text, sentences, gold, "any"))
        if limit is not None and len(out) >= limit:
            break
    return out


def load_wikiqa_evidence(folder: str | Path, *, limit: int | None = None) -> list[EvidenceExample]:
    """WikiQA test examples (answerable questions) from ``folder`` (BEIR files + ``candidates.tsv``)."""
    folder = Path(folder)
    corpus = {d["_id"]: d["text"] for d in _jsonl(folder / "corpus.jsonl.gz")}
    queries = {q["_id"]: q["text"] for q in _jsonl(folder / "queries.jsonl.gz")}
    labels: dict[tuple[str, str], int] = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, score = line.split("\t")
        labels[(qid, did)] = int(score)
    candidates: dict[str, list[str]] = {}
    for line in (folder / "candidates.tsv").read_text().splitlines()[1:]:
        qid, did = line.split("\t")
        candidates.setdefault(qid, []).append(did)
    out = []
    for qid, docs in candidates.items():
        gold = {i for i, d in enumerate(docs) if labels.get((qid, d), 0) > 0}
        if not gold:
            continue
        parts, sentences, pos = [], [], 0
        for d in docs:
            t = corpus[d].strip()
            sentences.append((pos, pos + len(t)))
            parts.append(t)
            pos += len(t) + 1
        out.append(EvidenceExample(qid, queries[qid], " ".join(parts), sentences, gold, "all"))
        if limit is not None and len(out) >= limit:
            break
    return out


def builtin_examples() -> list[EvidenceExample]:
    """A tiny hand-written set (for tests and a smoke run): one gold sentence each."""
    rows = [
        (
            "What is the capital of France?",
            "France is a country in Europe. Its capital is Paris, on the Seine. It has a long coastline.",
            1,
        ),
        (
            "When did the Berlin Wall fall?",
            "The Berlin Wall divided the city for decades. It fell on 9 November 1989. Germany reunified a year later.",
            1,
        ),
        (
            "What do bees make?",
            "Bees make honey from the nectar of flowers. Many bees live in hives. Some species are solitary.",
            0,
        ),
        (
            "How tall is Mount Everest?",
            "Mount Everest lies in the Himalayas. Climbers usually start in Nepal. Its summit is 8,849 metres high.",
            2,
        ),
    ]
    out = []
    for i, (query, text, gold) in enumerate(rows):
        sentences = sentence_spans(text)
        out.append(EvidenceExample(f"builtin-{i}", query, text, sentences, {gold}, "any"))
    return out


# ----- scorers: one score per sentence of each example -----------------------------------------------

SentenceScorer = Callable[[Sequence[EvidenceExample]], list[list[float]]]


def first_sentence_scores(examples: Sequence[EvidenceExample]) -> list[list[float]]:
    """The passage's own order: the first sentence is the best."""
    return [[-float(i) for i in range(len(ex.sentences))] for ex in examples]


def bm25_scores(examples: Sequence[EvidenceExample]) -> list[list[float]]:
    """BM25 (``bm25s`` through :class:`kalm_rag.data.BM25Index`) of the query against each sentence of its passage."""
    from kalm_rag.data import BM25Index

    return [BM25Index([ex.text[s:e] for s, e in ex.sentences]).scores(ex.query) for ex in examples]


def cosine_scores(examples: Sequence[EvidenceExample]) -> list[list[float]]:
    """all-MiniLM-L6-v2 cosine (sentence-transformers, the installed package's files) of query and sentence."""
    from sentence_transformers import SentenceTransformer

    from kalm_rag.models.mini.backend import encoder_dir
    from kalm_rag.models.mini.config import ENCODERS

    model = SentenceTransformer(str(encoder_dir(ENCODERS["all-MiniLM-L6-v2"])), device="cpu")
    out = []
    for ex in examples:
        texts = [ex.query] + [ex.text[s:e] for s, e in ex.sentences]
        emb = model.encode(texts, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
        out.append((emb[1:] @ emb[0]).tolist())
    return out


def model_scores(reranker: Any, *, ratio: int | None = None, training_free: bool = False) -> SentenceScorer:
    """Evidence scores of a :class:`~kalm_rag.Reranker` (the spans ``rerank(evidence=True)`` gives), mapped to
    the example's sentences; sentences it did not read score ``-inf``. With ``training_free``, a kalm-mini's
    trained sentence readout is set aside for the run (its relevance-attention readout is measured instead).
    """

    def score(examples: Sequence[EvidenceExample]) -> list[list[float]]:
        backend = reranker.backend
        head = backend.evidence_readout
        if training_free and head is not None:
            backend.evidence_readout = None
        try:
            out = []
            for ex in tqdm(examples, desc="Evidence", unit="query", disable=len(examples) < 50):
                spans = passage_evidence(reranker, ex.query, ex.text, sentences=ex.sentences, ratio=ratio)
                by_start = {s.start: s.score for s in spans}
                out.append([by_start.get(s, float("-inf")) for s, _ in ex.sentences])
        finally:
            if head is not None:
                backend.evidence_readout = head
        return out

    return score


def passage_evidence(
    reranker: Any,
    query: str,
    text: str,
    *,
    sentences: Sequence[tuple[int, int]] | None = None,
    ratio: int | None = None,
) -> list[EvidenceSpan]:
    """The evidence spans of one passage for ``query``, over given sentences (the engine's own path)."""
    r = reranker._call_ratio(ratio)
    found = reranker._decode_with_evidence(
        query,
        reranker._pooled([text]),
        instruction=reranker.instruction,
        system_instruction=reranker.system_instruction,
        ratio=r,
    )
    given = None if sentences is None else [list(sentences)]
    return reranker._passages_evidence(found, [0], [text], sentences=given)[0]


# ----- metrics ---------------------------------------------------------------------------------------


def _ranked_spans(ex: EvidenceExample, scores: Sequence[float]) -> list[EvidenceSpan]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [EvidenceSpan(ex.sentences[i][0], ex.sentences[i][1], float(scores[i])) for i in order]


def _recall_and_kept(
    ex: EvidenceExample, ranked: list[EvidenceSpan], keep: float, *, by_mass: bool = False
) -> tuple[float, float]:
    kept = select_by_mass(ranked, keep) if by_mass else select_sentences(ranked, keep)
    starts = {s.start for s in kept}
    hits = sum(ex.sentences[g][0] in starts for g in ex.gold)
    recall = float(hits > 0) if ex.recall == "any" else hits / len(ex.gold)
    total = sum(e - s for s, e in ex.sentences)
    return recall, sum(s.end - s.start for s in kept) / max(total, 1)


def evidence_metrics(examples: Sequence[EvidenceExample], scores: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """``top1``, ``recall_at_50`` (recall with 50 % of the characters kept), ``kept_at_95`` (mean fraction of
    characters kept at the smallest budget whose mean recall is >= 0.95) and ``budget_at_95`` (that budget).

    For scores that are shares of evidence (no negative score: the models' readouts), also ``mass_kept_at_95``
    and ``mass_at_95``: the same with the ``prune_mass`` rule (:func:`~kalm_rag.evidence.select_by_mass`), the
    smallest mass whose mean recall is >= 0.95 (``None`` for other scores).
    """
    ranked = [_ranked_spans(ex, s) for ex, s in zip(examples, scores)]
    top1 = statistics.fmean(
        float(max(range(len(s)), key=lambda i: (s[i], -i)) in ex.gold) for ex, s in zip(examples, scores)
    )
    recall_50 = statistics.fmean(_recall_and_kept(ex, r, 0.5)[0] for ex, r in zip(examples, ranked))
    kept_95, budget_95 = 1.0, 1.0
    for budget in BUDGETS:
        pairs = [_recall_and_kept(ex, r, budget) for ex, r in zip(examples, ranked)]
        if statistics.fmean(p[0] for p in pairs) >= 0.95:
            kept_95, budget_95 = statistics.fmean(p[1] for p in pairs), budget
            break
    mass_kept: float | None = None
    mass_95: float | None = None
    if all(x >= 0.0 for row in scores for x in row):
        for mass in MASSES:
            pairs = [_recall_and_kept(ex, r, mass, by_mass=True) for ex, r in zip(examples, ranked)]
            if statistics.fmean(p[0] for p in pairs) >= 0.95:
                mass_kept, mass_95 = statistics.fmean(p[1] for p in pairs), mass
                break
    return {
        "top1": top1,
        "recall_at_50": recall_50,
        "kept_at_95": kept_95,
        "budget_at_95": budget_95,
        "mass_kept_at_95": mass_kept,
        "mass_at_95": mass_95,
    }


def evaluate(
    examples: Sequence[EvidenceExample], scorers: dict[str, SentenceScorer]
) -> dict[str, dict[str, float | None]]:
    """Metrics (and seconds taken) of every scorer on ``examples``."""
    results = {}
    for name, scorer in scorers.items():
        start = time.perf_counter()
        scores = scorer(examples)
        metrics = evidence_metrics(examples, scores)
        metrics["seconds"] = time.perf_counter() - start
        results[name] = metrics
    return results


def evidence_overhead(reranker: Any, query: str, passages: Sequence[str], *, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds of ``rerank`` of cached ``passages`` without and with ``evidence=True``.

    ``evidence_ms`` is the usual case, the passages seen before (their vectors come from the store, their
    offsets and sentences from the reranker's layout cache); ``cold_evidence_ms`` empties those caches before
    each call (new passages: the tokenizer and the sentence splitter run); ``cold_top10_ms`` does too, for a
    call that keeps the best 10 (``top_k=10``: only those are split into sentences).
    """
    reranker.encode(list(passages))
    reranker.rerank(query, passages)  # warm-up
    reranker.rerank(query, passages, evidence=True)
    plain, with_evidence, cold, cold_top = [], [], [], []
    for _ in range(repeats):  # passages seen before: every layout kept
        t0 = time.perf_counter()
        reranker.rerank(query, passages)
        t1 = time.perf_counter()
        reranker.rerank(query, passages, evidence=True)
        plain.append((t1 - t0) * 1000)
        with_evidence.append((time.perf_counter() - t1) * 1000)
    for _ in range(repeats):  # passages never seen: no layout kept
        _forget_layouts(reranker)
        t0 = time.perf_counter()
        reranker.rerank(query, passages, evidence=True)
        cold.append((time.perf_counter() - t0) * 1000)
        _forget_layouts(reranker)
        t0 = time.perf_counter()
        reranker.rerank(query, passages, evidence=True, top_k=10)
        cold_top.append((time.perf_counter() - t0) * 1000)
    p, e, c = statistics.median(plain), statistics.median(with_evidence), statistics.median(cold)
    return {
        "plain_ms": p,
        "evidence_ms": e,
        "overhead": e / p - 1.0,
        "cold_evidence_ms": c,
        "cold_overhead": c / p - 1.0,
        "cold_top10_ms": statistics.median(cold_top),
        "cold_top10_overhead": statistics.median(cold_top) / p - 1.0,
        "passages": float(len(passages)),
    }


def _forget_layouts(reranker: Any) -> None:
    """Empty what evidence keeps per passage (windows, sentences, word pieces)."""
    reranker._layouts.clear()


def markdown_table(results: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """One table per data set: a row per method."""
    lines = []
    for name, by_method in results.items():
        lines += [
            f"### {name}",
            "",
            "| method | top-1 accuracy | recall at 50% kept | kept at 95% recall | kept at 95% recall, prune_mass "
            "| seconds |",
            "|---|---|---|---|---|---|",
        ]
        for method, m in by_method.items():
            mass = m.get("mass_at_95")
            by_mass = "n/a" if mass is None else f"{m['mass_kept_at_95']:.3f} (mass {mass:.3f})"
            lines.append(
                f"| {method} | {m['top1']:.3f} | {m['recall_at_50']:.3f} | {m['kept_at_95']:.3f} "
                f"(budget {m['budget_at_95']:.2f}) | {by_mass} | {m['seconds']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)
