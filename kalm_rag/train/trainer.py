"""Training loops: kalm-mini (FBNL, multi-ratio) and the same-backbone cross-encoder baseline.

Both see the same groups (1 positive + ``negatives`` hard negatives per query, the same sampler and
seed), the same loss and the same number of optimizer steps:

    loss = sum over ratios r of [ CE(softmax over the group, positive first) + BCE(sigmoid(logit), label)
                                 + distill * KL(softmax(teacher) || softmax(logits)) ]

i.e. a listwise contrastive term, the pointwise yes/no term of FBNL_SPEC section 7, and a listwise
distillation term whose teacher is all-MiniLM-L6-v2's own cosine similarity (scaled): with one labelled
positive per group the teacher's soft order of the hard negatives is most of the signal a few thousand
CPU steps can get. kalm-mini sums the loss over several MEP ratios so that one checkpoint serves every
ratio 1..32. The best checkpoint by dev nDCG@10 (r=4 for kalm-mini) is kept.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kalm_rag.padding import right_pad_vectors
from kalm_rag.pooling import mep_pool
from kalm_rag.prompt import DEFAULT_INSTRUCTION  # the engine's default: train as the model is used
from kalm_rag.train.cache import EncodingCache
from kalm_rag.train.config import TrainConfig
from kalm_rag.train.data import DevQuery, Example, TrainingData

logger = logging.getLogger(__name__)


@dataclass
class Group:
    """One training group: a query, its positive first, then negatives; ``echo`` = index of an echo negative or -1."""

    query: str
    passages: list[str]
    echo: int = -1


class GroupSampler:
    """Deterministic stream of groups (1 positive + ``negatives`` negatives) with source weighting."""

    def __init__(self, examples: list[Example], cfg: TrainConfig) -> None:
        if not 0 <= cfg.random_negatives <= cfg.negatives:
            raise ValueError(f"random_negatives must be in 0..negatives={cfg.negatives}, got {cfg.random_negatives}")
        self.rng = random.Random(cfg.seed)
        self.k = cfg.negatives
        self.k_random = cfg.random_negatives
        self.echo_probability = cfg.echo_probability
        self.by_source: dict[str, list[Example]] = {}
        for ex in examples:
            if ex.pos and len(ex.neg) >= 1:
                self.by_source.setdefault(ex.source, []).append(ex)
        self.sources = sorted(self.by_source)
        unknown = sorted(set(self.sources) - set(cfg.source_weights))
        if unknown:
            raise ValueError(f"no sampling weight for sources {unknown}; give them one in source_weights")
        self.weights = [cfg.source_weights[s] for s in self.sources]
        # every passage of a source: where easy (random) negatives are drawn from
        self.pool = {src: sorted({t for ex in exs for t in ex.pos + ex.neg}) for src, exs in self.by_source.items()}

    def group(self) -> Group:
        src = self.rng.choices(self.sources, weights=self.weights)[0]
        ex = self.rng.choice(self.by_source[src])
        pos = self.rng.choice(ex.pos)
        k_hard = self.k - self.k_random
        negs = ex.neg
        negs = self.rng.sample(negs, k_hard) if len(negs) >= k_hard else [self.rng.choice(negs) for _ in range(k_hard)]
        # easy negatives from the whole pool: a reranker also sees the tail of a first stage's list, and
        # hard negatives alone teach "less word overlap = more relevant"
        known = set(ex.pos)
        while len(negs) < self.k:
            t = self.rng.choice(self.pool[src])
            if t not in known:
                negs.append(t)
        echo = -1
        if ex.echo and self.rng.random() < self.echo_probability:
            negs[-1] = self.rng.choice(ex.echo)  # in place of an easy negative
            echo = len(negs)  # its index in [pos, *negs]
        return Group(ex.query, [pos, *negs], echo)


def group_loss(logits: torch.Tensor, teacher: torch.Tensor | None = None, distill: float = 0.0) -> torch.Tensor:
    """Listwise CE (positive at column 0) + pointwise BCE (+ distillation) for logits ``(G, 1+k)``.

    ``teacher`` ``(G, 1+k)`` are teacher logits; their softmax is the target of a KL term weighted ``distill``.
    """
    G, K = logits.shape
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    ce = F.cross_entropy(logits, torch.zeros(G, dtype=torch.long, device=logits.device))
    bce = F.binary_cross_entropy_with_logits(logits, labels)
    loss = ce + bce
    if teacher is not None and distill > 0:
        loss = loss + distill * F.kl_div(
            F.log_softmax(logits, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="batchmean"
        )
    return loss


class BiEncoderTeacher:
    """all-MiniLM-L6-v2 as a teacher: ``scale * cos(query embedding, passage embedding)``.

    Passage embeddings are the mean of the cached token states (sentence-transformers' pooling), so the
    teacher costs one short query forward per group.
    """

    def __init__(self, backend, cache: EncodingCache, *, scale: float) -> None:
        self.backend = backend
        self.cache = cache
        self.scale = scale

    @torch.no_grad()
    def logits(self, queries: list[str], passages: list[list[str]]) -> torch.Tensor:
        """Teacher logits ``(G, K)``."""
        q_ids = [[self.backend.cls_id, *self.backend.tokenize_query(q), self.backend.sep_id] for q in queries]
        h, mask = self.backend.encode_segments(q_ids)  # (G, T, d), (G, T)
        w = mask.unsqueeze(-1).to(h.dtype)
        q = F.normalize(((h * w).sum(dim=1) / w.sum(dim=1)).float(), dim=-1)  # (G, d): mean of token states
        p = torch.stack([torch.stack([self.cache.get(t).mean(dim=0) for t in ps]) for ps in passages])  # (G, K, d)
        return self.scale * (F.normalize(p, dim=-1) * q[:, None, :]).sum(-1)

    def group_logits(self, groups: list[Group]) -> torch.Tensor:
        """Teacher logits ``(G, K)`` of training groups; an echo negative gets the group's lowest logit minus 1.

        Cosine similarity rates a passage that repeats the query as relevant, which is the mistake the echo
        negatives are there to unlearn: the teacher must not teach it back.
        """
        logits = self.logits([g.query for g in groups], [g.passages for g in groups])
        for row, g in enumerate(groups):
            if g.echo >= 0:
                logits[row, g.echo] = logits[row].min() - 1.0
        return logits


def ndcg_at_10(scores: list[float], grades: list[int]) -> float:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:10]
    dcg = sum((2 ** grades[i] - 1) / math.log2(r + 2) for r, i in enumerate(order))
    ideal = sorted(grades, reverse=True)[:10]
    idcg = sum((2**g - 1) / math.log2(r + 2) for r, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


class MiniTask:
    """kalm-mini: pooled cached encoder states -> decoder logits, at several ratios."""

    name = "kalm-mini"

    def __init__(self, backend, cache: EncodingCache, cfg: TrainConfig) -> None:
        self.backend = backend
        self.cache = cache
        self.cfg = cfg
        self.rng = random.Random(cfg.seed + 1)
        self.instr, _ = backend.split_prompt(
            backend.prompt_ids("x", instruction=DEFAULT_INSTRUCTION, system_instruction="", max_query_tokens=8)
        )
        self._qcache: dict[str, list[int]] = {}

    def module(self) -> nn.Module:
        return self.backend.decoder

    def param_groups(self) -> list[dict]:
        dec = self.backend.decoder
        new = list(dec.adapters.parameters()) + list(dec.head.parameters())
        layers = list(dec.layers.parameters()) + list(dec.relevance.parameters())  # start useful: the slow LR
        return [
            {"params": layers, "lr": self.cfg.lr},
            {"params": new, "lr": self.cfg.new_module_lr},
            # one scalar on a scale of ~10: Adam moves it by ~lr a step, so it needs its own LR (and no decay)
            {"params": [dec.cosine_weight], "lr": self.cfg.cosine_weight_lr, "weight_decay": 0.0},
        ]

    def _query_segment(self, query: str) -> list[int]:
        if query not in self._qcache:
            ids = self.backend.prompt_ids(
                query, instruction=DEFAULT_INSTRUCTION, system_instruction="", max_query_tokens=128
            )
            self._qcache[query] = self.backend.split_prompt(ids)[1]
        return self._qcache[query]

    def logits(self, queries: list[str], passages: list[list[str]], ratio: int) -> torch.Tensor:
        """Logits ``(G, K)`` for G queries with K passages each, at ``ratio``.

        Each passage is read up to ``cfg.max_passage_tokens`` encoder positions (whole windows, so exactly what
        encoding it at that limit gives). The G*K rows go through the decoder longest first, ``cfg.chunk_rows``
        at a time, so a long passage pads only rows of its own length.
        """
        G, K = len(passages), len(passages[0])
        states = [self.cache.get(p)[: self.cfg.max_passage_tokens] for ps in passages for p in ps]  # (n_i, d) each
        queries_per_row = [self._query_segment(q) for q in queries for _ in range(K)]
        order = sorted(range(G * K), key=lambda i: -states[i].shape[0])
        parts = []
        for start in range(0, G * K, self.cfg.chunk_rows):
            rows = order[start : start + self.cfg.chunk_rows]
            h, m = right_pad_vectors([states[i] for i in rows])  # (R, n, d), (R, n)
            pooled, counts = mep_pool(h, m, ratio)  # (R, W, d), (R, W)
            parts.append(
                self.backend.forward_scores(self.instr, [queries_per_row[i] for i in rows], pooled, (counts > 0).long())
            )
        where = torch.empty(G * K, dtype=torch.long)
        where[torch.tensor(order)] = torch.arange(G * K)  # row i's logit sits at position where[i] of the chunks
        return torch.cat(parts)[where].view(G, K)

    def train_loss(
        self, queries: list[str], passages: list[list[str]], teacher: torch.Tensor | None = None
    ) -> torch.Tensor:
        ratios = list(self.cfg.ratios)
        if self.cfg.extra_ratios:
            ratios.append(self.rng.choice(self.cfg.extra_ratios))
        return sum(group_loss(self.logits(queries, passages, r), teacher, self.cfg.distill) for r in ratios)  # type: ignore[return-value]  # a sum of tensors

    @torch.no_grad()
    def dev_scores(self, dq: DevQuery) -> list[float]:
        return self.logits([dq.query], [dq.candidates], self.cfg.dev_ratio)[0].tolist()

    def save(self, folder: Path) -> None:
        self.backend.save_pretrained(folder)


class CrossEncoderTask:
    """The baseline: all-MiniLM-L6-v2 fine-tuned as a cross-encoder (``[CLS] q [SEP] p [SEP]``, CLS head)."""

    name = "cross-encoder"

    def __init__(self, cfg: TrainConfig, *, max_length: int = 320, init_from: Path | None = None) -> None:
        from kalm_rag.models.mini import MiniConfig
        from kalm_rag.models.mini.backend import load_encoder

        self.cfg = cfg
        self.bert, self.tokenizer = load_encoder(MiniConfig(), device=torch.device("cpu"), dtype=torch.float32)
        self.bert.requires_grad_(True)
        self.head = nn.Linear(MiniConfig().hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.max_length = max_length
        self._module = nn.ModuleDict({"bert": self.bert, "head": self.head})
        if init_from is not None:  # continue an earlier run
            from safetensors.torch import load_file

            self._module.load_state_dict(load_file(str(Path(init_from) / "model.safetensors")))

    def module(self) -> nn.Module:
        return self._module

    def param_groups(self) -> list[dict]:
        return [
            {"params": list(self.bert.parameters()), "lr": self.cfg.lr},
            {"params": list(self.head.parameters()), "lr": self.cfg.new_module_lr},
        ]

    def pair_logits(self, queries: list[str], passages: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            queries, passages, truncation="only_second", max_length=self.max_length, padding=True, return_tensors="pt"
        )
        out = self.bert(**enc).last_hidden_state[:, 0]  # (B, d): [CLS]
        return self.head(out).squeeze(-1)

    def train_loss(
        self, queries: list[str], passages: list[list[str]], teacher: torch.Tensor | None = None
    ) -> torch.Tensor:
        G, K = len(passages), len(passages[0])
        logits = self.pair_logits([q for q in queries for _ in range(K)], [p for ps in passages for p in ps])
        return group_loss(logits.view(G, K), teacher, self.cfg.distill)

    @torch.no_grad()
    def dev_scores(self, dq: DevQuery) -> list[float]:
        return self.pair_logits([dq.query] * len(dq.candidates), dq.candidates).tolist()

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self._module.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(
            json.dumps({"model_type": "minilm-cross-encoder", "max_length": self.max_length})
        )


def _dev_subset(dev: list[DevQuery], cfg: TrainConfig) -> list[DevQuery]:
    """The dev queries model selection uses: at most ``dev_max_queries`` per source, ``dev_candidates`` each."""
    taken: dict[str, int] = {}
    out = []
    for dq in dev:
        taken[dq.source] = taken.get(dq.source, 0) + 1
        if cfg.dev_max_queries is None or taken[dq.source] <= cfg.dev_max_queries:
            out.append(
                DevQuery(dq.query, dq.candidates[: cfg.dev_candidates], dq.grades[: cfg.dev_candidates], dq.source)
            )
    return out


def _mean_by_source(values: list[tuple[str, float]]) -> dict[str, float]:
    per_source: dict[str, list[float]] = {}
    for source, v in values:
        per_source.setdefault(source, []).append(v)
    result = {s: sum(v) / len(v) for s, v in per_source.items()}
    result["mean"] = sum(result.values()) / len(result)
    return result


def _teacher_dev(teacher: BiEncoderTeacher, dev: list[DevQuery], cfg: TrainConfig) -> dict[str, float]:
    return _mean_by_source(
        [
            (dq.source, ndcg_at_10(teacher.logits([dq.query], [dq.candidates])[0].tolist(), dq.grades))
            for dq in _dev_subset(dev, cfg)
        ]
    )


def evaluate_dev(task, dev: list[DevQuery], cfg: TrainConfig) -> dict[str, float]:
    task.module().eval()
    result = _mean_by_source([(dq.source, ndcg_at_10(task.dev_scores(dq), dq.grades)) for dq in _dev_subset(dev, cfg)])
    task.module().train()
    return result


def train(
    task,
    data: TrainingData,
    cfg: TrainConfig,
    out_dir: Path,
    teacher: BiEncoderTeacher | None = None,
    *,
    manifest: dict | None = None,
) -> dict:
    """Run the loop; keep ``out_dir/best`` (dev nDCG@10) and ``out_dir/last``; log JSON lines to ``out_dir/log.jsonl``.

    ``teacher`` (needed when ``cfg.distill > 0``) gives the distillation targets of every group; ``manifest``
    (the training data sets and their licences) is written as ``training.json`` into every saved checkpoint.
    """

    def save(folder: Path) -> None:
        task.save(folder)
        if manifest is not None:
            (folder / "training.json").write_text(
                json.dumps({**manifest, "train_config": asdict(cfg)}, indent=2) + "\n"
            )

    if cfg.distill > 0 and teacher is None:
        raise ValueError("cfg.distill > 0 needs a teacher")
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train-config.json").write_text(json.dumps(asdict(cfg), indent=2))
    sampler = GroupSampler(data.examples, cfg)
    opt = torch.optim.AdamW(task.param_groups(), weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    log = (out_dir / "log.jsonl").open("a")
    if teacher is not None:  # the teacher's own dev score, for reference in the log
        baseline = _teacher_dev(teacher, data.dev, cfg)
        logger.info("teacher dev %s", {k: round(v, 4) for k, v in baseline.items()})
        log.write(json.dumps({"step": 0, "teacher_dev": baseline}) + "\n")
    dev = evaluate_dev(task, data.dev, cfg)  # the start is a candidate too (a continued run's start is a model)
    logger.info("step 0 dev %s", {k: round(v, 4) for k, v in dev.items()})
    log.write(json.dumps({"step": 0, "dev": dev, "minutes": 0.0}) + "\n")
    best, best_step = dev["mean"], 0
    save(out_dir / "best")
    (out_dir / "best" / "dev.json").write_text(json.dumps({"step": 0, "dev": dev}, indent=2))
    start = time.time()
    task.module().train()
    running = 0.0
    for step in range(1, cfg.steps + 1):
        # cosine decay over the step budget, or over the time budget when that runs out first
        frac = step / cfg.steps
        if cfg.max_minutes:
            frac = max(frac, (time.time() - start) / 60 / cfg.max_minutes)
        scale = min(1.0, step / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * scale
        groups = [sampler.group() for _ in range(cfg.groups_per_step)]
        queries, passages = [g.query for g in groups], [g.passages for g in groups]
        targets = teacher.group_logits(groups) if teacher is not None and cfg.distill > 0 else None
        loss = task.train_loss(queries, passages, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.module().parameters(), 1.0)
        opt.step()
        running += loss.item()
        elapsed = (time.time() - start) / 60
        out_of_time = cfg.max_minutes is not None and elapsed >= cfg.max_minutes
        if step % 10 == 0:
            logger.info("step %d loss %.4f (%.1f min)", step, running / 10, elapsed)
            log.write(json.dumps({"step": step, "loss": running / 10, "minutes": round(elapsed, 2)}) + "\n")
            log.flush()
            running = 0.0
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            dev = evaluate_dev(task, data.dev, cfg)
            logger.info("step %d dev %s", step, {k: round(v, 4) for k, v in dev.items()})
            log.write(json.dumps({"step": step, "dev": dev, "minutes": round(elapsed, 2)}) + "\n")
            log.flush()
            save(out_dir / "last")
            if dev["mean"] > best:
                best, best_step = dev["mean"], step
                save(out_dir / "best")
                (out_dir / "best" / "dev.json").write_text(json.dumps({"step": step, "dev": dev}, indent=2))
        if out_of_time:
            logger.info("time budget of %.1f minutes reached at step %d", cfg.max_minutes, step)
            break
    summary = {
        "best_dev_ndcg10": best,
        "best_step": best_step,
        "steps_run": step,
        "minutes": round((time.time() - start) / 60, 2),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.close()
    return summary
