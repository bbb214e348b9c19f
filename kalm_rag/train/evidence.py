"""Fit kalm-mini's sentence readout (``evidence.json``, ``evidence_match.safetensors``) on SQuAD train (CC BY-SA 4.0).

Labels are free: the gold sentence of a question is the one of its paragraph that holds an answer string. The
model stays frozen. For each question the engine's own evidence path (one decoder pass, the same code
``rerank(evidence=True)`` runs) gives every read sentence its features: the relevance attention's best and mean
window weight, the encoder cosine of the query and the sentence's pooled windows, the share of the query's
word-piece IDF the sentence holds, and the trained token-level ``match``
(:class:`~kalm_rag.models.mini.readout.SentenceMatch`: each query token's best window of the sentence through a
learned map of the query's states). A :class:`~kalm_rag.evidence.SentenceReadout` weighs the features,
standardised within each passage, with a softmax over the passage's sentences; the match's map and the readout's
weights are fitted together by Adam on the cross-entropy of the gold sentences, at every ratio asked (one readout
for all). Questions held out by paragraph report top-1 of the training-free readout, of the four untrained
features alone (L-BFGS) and of the shipped readout.

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

from kalm_rag.errors import NumericalError
from kalm_rag.evidence import SentenceReadout, sentence_spans
from kalm_rag.models.mini.readout import SentenceMatch

logger = logging.getLogger(__name__)

#: The features kalm-mini's readout weighs without training anything but its weights (the engine and
#: ``MiniBackend.sentence_columns`` compute them).
BASE_FEATURES = ("attention_max", "attention_mean", "cosine", "coverage")
#: The shipped readout's features: the base ones and the trained sentence match.
FEATURES = (*BASE_FEATURES, "match")
RATIOS = (1, 4)


@dataclass
class MatchInputs:
    """What the sentence match reads for one question: the query's encoder states ``(Tq, d)``, its tokens' IDF
    and realness ``(Tq,)``, the passage's pooled windows ``(W, d)`` and each read sentence's windows.
    """

    query_states: torch.Tensor
    idf: torch.Tensor
    real: torch.Tensor
    windows: torch.Tensor
    groups: list[list[int]]


@dataclass
class SentenceExample:
    """One question's read sentences: features ``(S, F)`` in :data:`BASE_FEATURES` order (or any fixed order),
    the gold indices, the ratio and, for fitting the match, its inputs.
    """

    features: torch.Tensor
    gold: list[int]
    ratio: int
    match: MatchInputs | None = None


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
    """Each question's base sentence features and match inputs at ``ratio``, through the engine's evidence path."""
    backend = rr.backend
    examples = []
    paragraphs = list(dict.fromkeys(p for _, p, _ in questions))
    entries = dict(zip(paragraphs, rr._pooled(paragraphs)))  # encoded once into the reranker's store
    windows: dict[str, torch.Tensor] = {}  # one copy of each paragraph's windows at this ratio
    for query, text, gold in tqdm(questions, desc=desc, unit="question"):
        found = rr._decode_with_evidence(
            query, [entries[text]], instruction=rr.instruction, system_instruction=rr.system_instruction, ratio=ratio
        )
        layout = rr._passage_layouts(found, [0], [text])[0]
        sentences = layout.sentences
        read_gold = [g for g in gold if g < len(sentences)]
        if len(sentences) < 2 or not read_gold:
            continue
        columns = rr._sentence_columns(found, [0], [text], [layout])[0]
        features = torch.tensor([columns[f] for f in BASE_FEATURES], dtype=torch.float64).T  # (S, F)
        _, query_ids = backend.split_prompt(found.prompt)
        h_query, _ = backend.query_states(query_ids)  # (1, Tq, d)
        idf, real = backend.query_token_idf(query_ids)  # (Tq,), (Tq,)
        vectors = windows.setdefault(text, found.vectors[0].to(torch.float32))  # (W, d)
        inputs = MatchInputs(h_query[0].float(), idf, real, vectors, [list(g) for g in layout.groups])
        examples.append(SentenceExample(features, read_gold, ratio, inputs))
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
    w = torch.zeros(examples[0].features.shape[1], dtype=torch.float64, requires_grad=True)
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


def _padded(examples: Sequence[SentenceExample]) -> dict[str, torch.Tensor]:
    """A batch of examples right-padded: query states ``(B, T, d)``, IDF/realness ``(B, T)``, windows ``(B, W, d)``,
    sentence-window membership ``(B, S, W)``, base features ``(B, S, F)``, real sentences and gold ``(B, S)``.
    """
    inputs = [ex.match for ex in examples if ex.match is not None]
    if len(inputs) != len(examples):
        raise ValueError("fitting the sentence match needs every example's match inputs")
    B, d = len(examples), inputs[0].query_states.shape[1]
    T = max(m.query_states.shape[0] for m in inputs)
    W = max(m.windows.shape[0] for m in inputs)
    S = max(ex.features.shape[0] for ex in examples)
    out = {
        "query_states": torch.zeros(B, T, d),
        "idf": torch.zeros(B, T),
        "real": torch.zeros(B, T),
        "windows": torch.zeros(B, W, d),
        "member": torch.zeros(B, S, W, dtype=torch.bool),
        "features": torch.zeros(B, S, examples[0].features.shape[1]),
        "sentences": torch.zeros(B, S, dtype=torch.bool),
        "gold": torch.zeros(B, S, dtype=torch.bool),
    }
    for i, (ex, m) in enumerate(zip(examples, inputs)):
        t, w, n = m.query_states.shape[0], m.windows.shape[0], ex.features.shape[0]
        out["query_states"][i, :t], out["idf"][i, :t], out["real"][i, :t] = m.query_states, m.idf, m.real
        out["windows"][i, :w] = m.windows
        for j, group in enumerate(m.groups):
            out["member"][i, j, group] = True
        out["features"][i, :n] = ex.features.float()
        out["sentences"][i, :n] = True
        out["gold"][i, ex.gold] = True
    return out


def batch_match(match: SentenceMatch, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:meth:`SentenceMatch.forward` of a padded batch: ``(B, S)`` (what inference computes one query at a time)."""
    cos = match.token_window_cosines(batch["query_states"], batch["windows"])  # (B, T, W)
    best = cos[:, :, None, :].masked_fill(~batch["member"][:, None], -1.0).amax(dim=-1)  # (B, T, S)
    weights = match.token_weights(batch["idf"], batch["real"])  # (B, T)
    return (weights[:, :, None] * best).sum(dim=1)  # (B, S)


def batch_logits(match: SentenceMatch, weights: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The readout's logits ``(B, S)`` (padding: a large negative): features and match standardised within each
    passage (as :meth:`SentenceReadout.logits`), weighted by ``weights`` ``(F + 1,)``.
    """
    x = torch.cat([batch["features"], batch_match(match, batch)[..., None]], dim=-1)  # (B, S, F+1)
    real = batch["sentences"][..., None].to(x.dtype)  # (B, S, 1)
    n = real.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (x * real).sum(dim=1, keepdim=True) / n
    # clamp the variance, not the std: sqrt's gradient at 0 is inf, and a clamped inf is NaN (two sentences that
    # share their only window have the same match, and one such passage turned a whole run into NaN)
    std = (((x - mean) * real) ** 2).sum(dim=1, keepdim=True).div(n).clamp(min=1e-6).sqrt()
    return (((x - mean) / std * real) @ weights).masked_fill(~batch["sentences"], -1e4)


def fit_match(
    examples: Sequence[SentenceExample],
    hidden_size: int,
    *,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[SentenceMatch, torch.Tensor]:
    """Fit a :class:`SentenceMatch` (from the identity map) and the readout's weights ``(F + 1,)`` (from 0) with
    Adam on the mean cross-entropy of the gold sentences; batches hold one ratio each, in a seeded order.
    """
    torch.manual_seed(seed)
    match = SentenceMatch(hidden_size)
    weights = torch.zeros(examples[0].features.shape[1] + 1, requires_grad=True)
    optimizer = torch.optim.Adam([*match.parameters(), weights], lr=lr)
    rng = random.Random(seed)
    by_ratio: dict[int, list[SentenceExample]] = {}
    for ex in examples:
        by_ratio.setdefault(ex.ratio, []).append(ex)
    for epoch in range(epochs):
        batches = []
        for rows in by_ratio.values():
            rows = rows[:]
            rng.shuffle(rows)
            batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        rng.shuffle(batches)
        for rows in tqdm(batches, desc=f"Fit the match, epoch {epoch + 1}/{epochs}", unit="batch"):
            batch = _padded(rows)
            log_p = torch.log_softmax(batch_logits(match, weights, batch), dim=-1)  # (B, S)
            loss = -torch.logsumexp(log_p.masked_fill(~batch["gold"], -1e4), dim=-1).mean()  # any gold counts
            if not torch.isfinite(loss):  # never write a diverged match: say so, and where
                raise NumericalError(f"the sentence match's loss is {loss.item()} at epoch {epoch + 1}; lower the lr")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return match.eval(), weights.detach().double()


def top1_with_match(examples: Sequence[SentenceExample], match: SentenceMatch, weights: torch.Tensor) -> float:
    """:func:`top1` of the readout over the base features and the match."""
    hits = 0
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            rows = examples[i : i + 64]
            logits = batch_logits(match, weights.float(), _padded(rows))  # (B, S)
            for ex, row in zip(rows, logits):
                hits += int(row[: ex.features.shape[0]].argmax()) in ex.gold
    return hits / max(len(examples), 1)


def train_readout(
    data_dir: Path,
    out: Path,
    *,
    idf: Path,
    questions: int = 3000,
    held_out: int = 500,
    ratios: Sequence[int] = RATIOS,
    epochs: int = 2,
    seed: int = 1,
) -> dict[str, Any]:
    """Fit the readout and its sentence match on SQuAD train questions at ``ratios``; write ``evidence.json``,
    ``evidence_match.safetensors`` (and the report) to ``out``.

    ``idf`` is a folder holding the word-piece statistics (``lexical.safetensors``) of the ``coverage`` and
    ``match`` features; it is copied next to the readout. The model is read exactly (base ratio 1, float32).
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
    rr.backend.evidence_match = None  # the match being fitted reads its inputs, not the shipped one's column
    data = squad_questions(data_dir / "squad" / "train", questions + held_out, seed=seed)
    dev_data, train_data = data[:held_out], data[held_out:]
    train, dev = [], []
    for r in ratios:
        train += sentence_examples(rr, train_data, r, desc=f"Train features, ratio {r}")
        dev += sentence_examples(rr, dev_data, r, desc=f"Held-out features, ratio {r}")
    base_weights = fit_readout(train)
    match, weights = fit_match(train, rr.backend.hidden_size, epochs=epochs, seed=seed)
    attention_only = torch.zeros(len(BASE_FEATURES), dtype=torch.float64)
    attention_only[0] = 1.0  # the training-free readout: the best window
    report = {
        "data": "SQuAD v1.1 train (CC BY-SA 4.0): gold sentence = the one holding an answer string",
        "questions": len(train_data),
        "held_out_questions": len(dev_data),
        "ratios": list(ratios),
        "examples": len(train),
        "epochs": epochs,
        "features": list(FEATURES),
        "weights": [round(float(w), 6) for w in weights],
        "held_out_top1": {
            str(r): {
                "attention_max_only": top1([e for e in dev if e.ratio == r], attention_only),
                "base_features_readout": top1([e for e in dev if e.ratio == r], base_weights),
                "readout": top1_with_match([e for e in dev if e.ratio == r], match, weights),
            }
            for r in ratios
        },
        "idf_sources": list(LexicalStats.load(idf).sources),
        "seed": seed,
        "minutes": round((time.monotonic() - start) / 60, 2),
    }
    meta = {k: report[k] for k in ("data", "questions", "ratios", "epochs", "seed", "idf_sources")}
    SentenceReadout(FEATURES, tuple(round(float(w), 6) for w in weights), meta).save(out)
    match.save(out)
    if (idf / LEXICAL_FILE).resolve() != (out / LEXICAL_FILE).resolve():
        shutil.copyfile(idf / LEXICAL_FILE, out / LEXICAL_FILE)
    (out / "evidence_training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
