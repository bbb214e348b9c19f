"""Fit kalm-mini's sentence readout (``evidence.json``) on SQuAD train (CC BY-SA 4.0).

Labels are free: the gold sentence of a question is the one of its paragraph that holds an answer string. The
model stays frozen. For each question the engine's own evidence path (one decoder pass, the same code
``rerank(evidence=True)`` runs) gives every read sentence its features: the relevance attention's best and mean
window weight, the encoder cosine of the query and the sentence's pooled windows, and the share of the query's
word-piece IDF the sentence holds. A :class:`~kalm_rag.evidence.SentenceReadout` weighs the features,
standardised within each passage, with a softmax over the passage's sentences; its few weights are fitted by
L-BFGS on the cross-entropy of the gold sentences, at every ratio asked (one readout for all). Questions held
out by paragraph report top-1 before (the training-free readout) and after.

    kalm-rag train evidence --data-dir ../shared/data --out runs/evidence --idf kalm_rag/weights/kalm-mini
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kalm_rag.evidence import SentenceReadout, sentence_spans

logger = logging.getLogger(__name__)

#: The features kalm-mini's readout weighs (computed by the engine and ``MiniBackend.sentence_columns``).
FEATURES = ("attention_max", "attention_mean", "cosine", "coverage")
RATIOS = (1, 4)


@dataclass
class SentenceExample:
    """One question's read sentences: features ``(S, F)`` in :data:`FEATURES` order and the gold indices."""

    features: torch.Tensor
    gold: list[int]
    ratio: int


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def squad_questions(folder: Path, limit: int, seed: int = 0) -> list[tuple[str, str, list[int]]]:
    """``(question, paragraph, gold sentence indices)`` of ``limit`` answerable questions whose paragraph has at
    least two sentences, all the questions of randomly drawn paragraphs (a held-out split is then by paragraph).
    """
    corpus = {d["_id"]: d["text"] for d in _jsonl(folder / "corpus.jsonl.gz")}
    by_paragraph: dict[str, list[dict[str, Any]]] = {}
    for q in _jsonl(folder / "queries.jsonl.gz"):
        by_paragraph.setdefault(q["_id"].removeprefix("squad-").rsplit("-", 1)[0], []).append(q)
    groups = list(by_paragraph.values())
    random.Random(seed).shuffle(groups)
    out = []
    for q in (q for group in groups for q in group):
        text = corpus.get(q["_id"].removeprefix("squad-").rsplit("-", 1)[0])  # squad-train-a-p-q -> train-a-p
        if text is None:
            continue
        sentences = sentence_spans(text)
        gold = sorted(
            {
                i
                for answer in q.get("answers", [])
                for m in re.finditer(re.escape(answer), text)
                for i, (s, e) in enumerate(sentences)
                if s <= m.start() < e
            }
        )
        if gold and len(sentences) > 1:
            out.append((q["text"], text, gold))
        if len(out) >= limit:
            break
    return out


def sentence_examples(
    rr: Any, questions: Sequence[tuple[str, str, list[int]]], ratio: int, *, desc: str = "Sentence features"
) -> list[SentenceExample]:
    """Each question's sentence features at ``ratio``, through the engine's evidence path."""
    examples = []
    paragraphs = list(dict.fromkeys(p for _, p, _ in questions))
    entries = dict(zip(paragraphs, rr._pooled(paragraphs)))  # encoded once into the reranker's store
    for query, text, gold in tqdm(questions, desc=desc, unit="question"):
        found = rr._decode_with_evidence(
            query, [entries[text]], instruction=rr.instruction, system_instruction=rr.system_instruction, ratio=ratio
        )
        layout = rr._passage_layouts(found, [0], [text])[0]
        sentences = layout.sentences
        columns = rr._sentence_columns(found, [0], [text], [layout])[0]
        read_gold = [g for g in gold if g < len(sentences)]
        if len(sentences) < 2 or not read_gold:
            continue
        features = torch.tensor([columns[f] for f in FEATURES], dtype=torch.float64).T  # (S, F)
        examples.append(SentenceExample(features, read_gold, ratio))
    return examples


def _standardised(x: torch.Tensor) -> torch.Tensor:
    """``(S, F)`` features standardised within the passage, as :meth:`SentenceReadout.logits` does."""
    mean = x.mean(dim=0, keepdim=True)
    std = x.var(dim=0, unbiased=False, keepdim=True).sqrt().clamp(min=1e-3)
    return (x - mean) / std


def fit_readout(examples: Sequence[SentenceExample], *, l2: float = 1e-3) -> torch.Tensor:
    """Readout weights ``(F,)`` minimising the mean cross-entropy of the gold sentences (L-BFGS, float64)."""
    xs = [_standardised(ex.features) for ex in examples]
    golds = [torch.tensor(ex.gold) for ex in examples]
    w = torch.zeros(len(FEATURES), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        losses = [
            -torch.logsumexp(torch.log_softmax(x @ w, dim=0)[g], dim=0) for x, g in zip(xs, golds)
        ]  # any gold sentence counts
        loss = torch.stack(losses).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def top1(examples: Sequence[SentenceExample], weights: torch.Tensor) -> float:
    """Share of examples whose best-scored sentence is gold (ties: the earlier sentence)."""
    hits = 0
    for ex in examples:
        scores = (_standardised(ex.features) @ weights).tolist()
        best = max(range(len(scores)), key=lambda j: (scores[j], -j))
        hits += best in ex.gold
    return hits / max(len(examples), 1)


def train_readout(
    data_dir: Path,
    out: Path,
    *,
    idf: Path,
    questions: int = 3000,
    held_out: int = 500,
    ratios: Sequence[int] = RATIOS,
    seed: int = 1,
) -> dict[str, Any]:
    """Fit the readout on SQuAD train questions at ``ratios``; write ``evidence.json`` (and the report) to ``out``.

    ``idf`` is a folder holding the word-piece statistics (``lexical.safetensors``) of the ``coverage`` feature;
    it is copied next to the readout. The model is read exactly (base ratio 1, float32 vectors).
    """
    import shutil

    from kalm_rag.engine import Reranker
    from kalm_rag.models.mini.backend import MiniBackend
    from kalm_rag.models.mini.lexical import LEXICAL_FILE, LexicalStats

    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    rr = Reranker.from_pretrained("kalm-mini", store="memory://", base_ratio=1, storage="float32", device="cpu")
    if not isinstance(rr.backend, MiniBackend):
        raise TypeError("the sentence readout is fitted on kalm-mini")
    rr.backend.evidence_idf = LexicalStats.load(idf)
    data = squad_questions(data_dir / "squad" / "train", questions + held_out, seed=seed)
    dev_data, train_data = data[:held_out], data[held_out:]
    train, dev = [], []
    for r in ratios:
        train += sentence_examples(rr, train_data, r, desc=f"Train features, ratio {r}")
        dev += sentence_examples(rr, dev_data, r, desc=f"Held-out features, ratio {r}")
    weights = fit_readout(train)
    attention_only = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # the training-free readout's order
    report = {
        "data": "SQuAD v1.1 train (CC BY-SA 4.0): gold sentence = the one holding an answer string",
        "questions": len(train_data),
        "held_out_questions": len(dev_data),
        "ratios": list(ratios),
        "examples": len(train),
        "features": list(FEATURES),
        "weights": [round(float(w), 6) for w in weights],
        "held_out_top1": {
            str(r): {
                "attention_max_only": top1([e for e in dev if e.ratio == r], attention_only),
                "readout": top1([e for e in dev if e.ratio == r], weights),
            }
            for r in ratios
        },
        "idf_sources": list(LexicalStats.load(idf).sources),
        "seed": seed,
        "minutes": round((time.monotonic() - start) / 60, 2),
    }
    meta = {k: report[k] for k in ("data", "questions", "ratios", "seed", "idf_sources")}
    SentenceReadout(FEATURES, tuple(round(float(w), 6) for w in weights), meta).save(out)
    if (idf / LEXICAL_FILE).resolve() != (out / LEXICAL_FILE).resolve():
        shutil.copyfile(idf / LEXICAL_FILE, out / LEXICAL_FILE)
    (out / "evidence_training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
