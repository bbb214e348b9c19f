"""Settings of a training run (no torch import: the command line reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """One training run's settings. The defaults are the shipped kalm-mini's recipe (``kalm-rag train mini`` uses them);
    :meth:`cross_encoder` gives the cross-encoder baseline's.
    """

    steps: int = 1500
    groups_per_step: int = 4
    negatives: int = 7
    random_negatives: int = 2  # of the negatives, drawn from the source's whole pool instead of the hard ones
    echo_probability: float = 0.5  # chance that a group whose query has an echo negative includes it
    ratios: list[int] = field(default_factory=lambda: [1, 4])  # every step: ratio 1 must work as well as 4
    extra_ratios: list[int] = field(default_factory=lambda: [2, 8, 16, 32])  # one of them, at random, each step
    distill: float = 1.0  # weight of the bi-encoder distillation term (0: labels only)
    teacher_scale: float = 20.0  # cosine -> teacher logit
    lr: float = 1e-4
    new_module_lr: float = 1e-3  # adapters and head start from scratch
    cosine_weight_lr: float = 2e-2  # the decoder's encoder-cosine weight (one scalar, starts at 10)
    warmup: int = 100
    weight_decay: float = 0.01
    source_weights: dict[str, float] = field(default_factory=lambda: {"squad": 0.6, "medquad": 0.25, "wiki": 0.15})
    max_passage_tokens: int = 512  # encoder positions read per passage in training (two windows)
    chunk_rows: int = 24  # rows per decoder call, longest first (a long passage pads only its own chunk)
    eval_every: int = 300
    dev_ratio: int = 4
    dev_max_queries: int | None = 50  # per source
    dev_candidates: int = 100  # BM25 candidates per dev query, as many as at test time
    max_minutes: float | None = None
    seed: int = 0
    threads: int | None = None

    @classmethod
    def cross_encoder(cls, **overrides: Any) -> TrainConfig:
        """The cross-encoder baseline's recipe: no ratios, fewer steps, a smaller dev set (it is ~30x slower)."""
        recipe: dict[str, Any] = dict(
            steps=1200, ratios=[], extra_ratios=[], eval_every=100, dev_max_queries=20, dev_candidates=20
        )
        return cls(**{**recipe, **overrides})
