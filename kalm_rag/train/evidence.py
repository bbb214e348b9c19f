"""Train kalm-mini's evidence head (``evidence_head.safetensors``) on SQuAD train (CC BY-SA 4.0).

Labels are free: the gold sentence of a question is the one of its paragraph that holds an answer string. The
decoder stays frozen; for each question, one forward pass at a random MEP ratio gives the head's inputs (the
relevance attention's per-window features, the query's final states), kept in memory, and the head is trained
on them with a softmax over the paragraph's sentences, each sentence scored as inference does it: the best
window that overlaps it (``kalm_rag.evidence``, aggregate ``"max"``). Held-out train questions pick the best
epoch.

    kalm-rag train evidence --data-dir ../shared/data --out runs/evidence --questions 6000 --threads 1
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kalm_rag.evidence import sentence_spans, window_spans
from kalm_rag.models.mini.backend import MiniBackend
from kalm_rag.models.mini.evidence_head import EvidenceHead, window_features

logger = logging.getLogger(__name__)

RATIOS = (1, 2, 4, 8)


@dataclass
class HeadExample:
    """One question's frozen decoder outputs at one ratio and its sentence targets."""

    features: torch.Tensor  # (W, 4)
    query_states: torch.Tensor  # (Tq, d) final query states
    paragraph: int  # index into the paragraph vectors
    ratio: int
    sentence_windows: list[list[int]]  # per sentence: the windows it overlaps (or its nearest one)
    gold: list[int]  # gold sentence indices


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def squad_questions(folder: Path, limit: int, seed: int = 0) -> list[tuple[str, str, list[int], list[tuple[int, int]]]]:
    """``(question, paragraph, gold sentence indices, sentence spans)`` of ``limit`` answerable questions, all the
    questions of randomly drawn paragraphs.
    """
    corpus = {d["_id"]: d["text"] for d in _jsonl(folder / "corpus.jsonl.gz")}
    by_paragraph: dict[str, list[dict[str, Any]]] = {}
    for q in _jsonl(folder / "queries.jsonl.gz"):
        by_paragraph.setdefault(q["_id"].removeprefix("squad-").rsplit("-", 1)[0], []).append(q)
    groups = list(by_paragraph.values())
    random.Random(seed).shuffle(groups)  # whole paragraphs: fewer passages to hold, held-out split by paragraph
    queries = [q for group in groups for q in group]
    out = []
    for q in queries:
        pid = q["_id"].removeprefix("squad-").rsplit("-", 1)[0]  # squad-train-a-p-q -> train-a-p
        text = corpus.get(pid)
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
            out.append((q["text"], text, gold, sentences))
        if len(out) >= limit:
            break
    return out


def sentence_windows(sentences: list[tuple[int, int]], windows: list[tuple[int, int] | None]) -> list[list[int]]:
    """For each sentence the windows overlapping it (else the nearest one), as ``evidence_spans`` reads them."""
    real = [(i, w) for i, w in enumerate(windows) if w is not None]
    out = []
    for s, e in sentences:
        hit = [i for i, (ws, we) in real if min(e, we) - max(s, ws) > 0]
        if not hit:
            hit = [min(real, key=lambda item: min(abs(item[1][0] - e), abs(item[1][1] - s)))[0]]
        out.append(hit)
    return out


@torch.no_grad()
def build_examples(
    rr: Any, questions: list[tuple[str, str, list[int], list[tuple[int, int]]]], seed: int = 0
) -> tuple[list[HeadExample], list[torch.Tensor]]:
    """Run the frozen kalm-mini once per question (at a random ratio); keep what the head reads."""
    from kalm_rag.pooling import repool

    rng = random.Random(seed)
    backend = rr.backend
    paragraphs = list(dict.fromkeys(p for _, p, _, _ in questions))
    index = {p: i for i, p in enumerate(paragraphs)}
    entries = rr._pooled(paragraphs)  # encodes (once) into the reranker's store, base ratio 1
    vectors = [e.vectors.float() for e in entries]
    offsets = backend.passage_offsets(paragraphs, rr.max_passage_tokens)
    examples = []
    for query, paragraph, gold, sentences in tqdm(questions, desc="Decoder features", unit="question"):
        p = index[paragraph]
        r = rng.choice(RATIOS)
        pooled = repool(entries[p].vectors, entries[p].counts, r)[0]  # (W, d)
        windows = window_spans(offsets[p], r)
        read_end = max((w[1] for w in windows if w is not None), default=0)
        kept = [(s, min(e, read_end)) for s, e in sentences if s < read_end]
        gold_kept = [g for g in gold if g < len(kept)]
        if not gold_kept or len(kept) < 2:
            continue
        prompt = backend.prompt_ids(query, instruction=rr.instruction, system_instruction="", max_query_tokens=128)
        instruction_ids, query_ids = backend.split_prompt(prompt)
        h_instr = backend.instruction_states(instruction_ids)
        h_query, query_mask = backend.encode_segments([query_ids], prefix=[backend.cls_id])
        probe: dict[str, torch.Tensor] = {}
        mask = torch.ones((1, pooled.shape[0]), dtype=torch.long)
        backend.decoder(h_instr, h_query, query_mask, pooled[None].to(backend.dtype), mask, probe)
        examples.append(
            HeadExample(
                features=window_features(probe, query_mask)[0].float(),
                query_states=probe["query_states"][0].float(),
                paragraph=p,
                ratio=r,
                sentence_windows=sentence_windows(kept, windows),
                gold=gold_kept,
            )
        )
    return examples, vectors


def example_loss(
    head: EvidenceHead, ex: HeadExample, vectors: list[torch.Tensor], counts: list[torch.Tensor]
) -> tuple[torch.Tensor, bool]:
    """Softmax cross-entropy over the sentences (gold: any of them) and whether the top sentence is gold."""
    from kalm_rag.pooling import repool

    passages = repool(vectors[ex.paragraph], counts[ex.paragraph], ex.ratio)[0]  # (W, d)
    Tq = ex.query_states.shape[0]
    logits = head(ex.features[None], ex.query_states[None], torch.ones((1, Tq)), passages[None])[0]  # (W,)
    sentence_logits = torch.stack([logits[idx].max() for idx in ex.sentence_windows])  # (S,)
    log_probs = F.log_softmax(sentence_logits, dim=0)
    loss = -torch.logsumexp(log_probs[ex.gold], dim=0)
    return loss, int(sentence_logits.argmax()) in ex.gold


def train_head(
    data_dir: Path,
    out: Path,
    *,
    questions: int = 6000,
    held_out: int = 500,
    epochs: int = 4,
    lr: float = 1e-3,
    batch_size: int = 32,
    max_minutes: float = 30.0,
    token_rank: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the head on SQuAD train questions; save the best epoch's head (held-out top-1) into ``out``."""
    from kalm_rag.engine import Reranker

    torch.manual_seed(seed)
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    rr = Reranker.from_pretrained("kalm-mini", ratio=1, device="cpu", dtype="float32")
    backend = rr.backend
    if not isinstance(backend, MiniBackend):
        raise TypeError("the evidence head is trained on kalm-mini")
    backend.evidence_head = None  # features come from the frozen decoder alone
    cache = out / f"examples-{questions}-{held_out}-{seed}.pt"
    if cache.is_file():  # the frozen decoder's outputs of an earlier run with the same data: train another head
        examples, vectors, counts_by_paragraph = torch.load(cache, weights_only=False)
    else:
        data = squad_questions(data_dir / "squad" / "train", questions + held_out, seed=seed)
        examples, vectors = build_examples(rr, data, seed=seed)
        counts_by_paragraph = [e.counts for e in rr._pooled(list(dict.fromkeys(p for _, p, _, _ in data)))]
        torch.save((examples, vectors, counts_by_paragraph), cache)
    dev, train = examples[:held_out], examples[held_out:]
    head = EvidenceHead(hidden_size=rr.backend.hidden_size, token_rank=token_rank)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    history = []
    head.eval()
    with torch.no_grad():  # the untrained head ranks as the training-free readout: the bar to beat
        best = sum(example_loss(head, ex, vectors, counts_by_paragraph)[1] for ex in dev) / max(len(dev), 1)
    logger.info("before training (training-free readout): held-out top-1 %.4f", best)
    history.append({"epoch": 0, "held_out_top1": best})
    rng = random.Random(seed)
    for epoch in range(epochs):
        head.train()
        rng.shuffle(train)
        total = 0.0
        for i in range(0, len(train), batch_size):
            batch = train[i : i + batch_size]
            losses = [example_loss(head, ex, vectors, counts_by_paragraph)[0] for ex in batch]
            loss = torch.stack(losses).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        head.eval()
        with torch.no_grad():
            dev_top1 = sum(example_loss(head, ex, vectors, counts_by_paragraph)[1] for ex in dev) / max(len(dev), 1)
        history.append({"epoch": epoch + 1, "train_loss": total / max(len(train), 1), "held_out_top1": dev_top1})
        logger.info("epoch %d: loss %.4f, held-out top-1 %.4f", epoch + 1, total / max(len(train), 1), dev_top1)
        if dev_top1 > best:
            best = dev_top1
            head.save(out)
        if (time.monotonic() - start) / 60 > max_minutes:
            break
    report = {
        "data": "SQuAD v1.1 train (CC BY-SA 4.0): gold sentence = the one holding an answer string",
        "questions": len(train),
        "held_out": len(dev),
        "ratios": list(RATIOS),
        "history": history,
        "best_held_out_top1": best,
        "minutes": (time.monotonic() - start) / 60,
    }
    (out / "evidence_training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
