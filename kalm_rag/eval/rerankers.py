"""The rerankers compared by ``kalm-rag eval``: any FBNL model through ``Reranker``, MiniLM cosine, a cross-encoder.

Each scorer takes one query and its candidate passages (texts) and returns one float per candidate, with an
``identity`` that names exactly what produced the scores (a saved run of another model is never reused).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kalm_rag.engine import Reranker
from kalm_rag.models.mini import MiniConfig
from kalm_rag.models.mini.backend import encoder_dir, encoder_version, load_encoder


class RerankerScorer:
    """A ``Reranker`` at one MEP ratio, through its public API: the relevance logit (``return_margin=True``).

    The logit ranks exactly as ``P(yes)`` and keeps the calibration measurable (``sigmoid`` of it is the score
    the engine reports).
    """

    def __init__(self, reranker: Reranker, ratio: int, *, label: str) -> None:
        self.reranker, self.ratio = reranker, ratio
        self.name = f"{label} r={ratio}"
        self.identity = f"{reranker.backend.weights_id}@r{ratio}|{reranker.instruction}"

    def __call__(self, query: str, passages: list[str]) -> list[float]:
        return self.reranker.score(query, passages, ratio=self.ratio, return_margin=True)


class CosineScorer:
    """all-MiniLM-L6-v2 as a bi-encoder: cosine of mean-pooled, normalised embeddings (sentence-transformers' recipe).

    Passages and queries are cut to 256 tokens (the model's ``max_seq_length``). Passage embeddings are kept in
    memory, so each passage is encoded once per process.
    """

    name = "all-MiniLM-L6-v2 cosine"

    def __init__(self, *, batch_size: int = 32) -> None:
        config = MiniConfig()
        self.encoder, self.tokenizer = load_encoder(config, device=torch.device("cpu"), dtype=torch.float32)
        self.identity = f"cosine:{config.encoder_spec.distribution}=={encoder_version(config.encoder_spec)}"
        self.batch_size = batch_size
        self._emb: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Normalised embeddings ``(N, d)``."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[s : s + self.batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            h = self.encoder(**enc).last_hidden_state  # (B, n, d)
            w = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, n, 1)
            out.append(F.normalize((h * w).sum(dim=1) / w.sum(dim=1), dim=-1))
        return torch.cat(out)

    def __call__(self, query: str, passages: list[str]) -> list[float]:
        todo = sorted({p for p in passages if p not in self._emb}, key=len)
        if todo:
            for text, e in zip(todo, self.embed(todo)):
                self._emb[text] = e
        q = self.embed([query])[0]  # (d,)
        return (torch.stack([self._emb[p] for p in passages]) @ q).tolist()


class CrossEncoderReranker:
    """A same-backbone cross-encoder: all-MiniLM-L6-v2 reading ``[CLS] query [SEP] passage [SEP]``, a head on ``[CLS]``.

    Weights from ``kalm-rag train cross-encoder`` (``checkpoint``), or a random head when ``checkpoint`` is
    ``None`` (for speed measurements: the cost does not depend on the weights).
    """

    name = "MiniLM cross-encoder"

    def __init__(self, checkpoint: str | Path | None, *, batch_size: int = 50, max_length: int = 320) -> None:
        from safetensors.torch import load_file

        self.bert, self.tokenizer = load_encoder(MiniConfig(), device=torch.device("cpu"), dtype=torch.float32)
        self.head = torch.nn.Linear(MiniConfig().hidden_size, 1)
        self.max_length = max_length
        self.identity = "minilm-cross-encoder-random"
        if checkpoint is not None:
            cfg = json.loads((Path(checkpoint) / "config.json").read_text())
            self.max_length = int(cfg.get("max_length", max_length))
            weights = Path(checkpoint) / "model.safetensors"
            self.identity = "minilm-cross-encoder-" + hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
            state = load_file(str(weights))
            self.bert.load_state_dict({k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")})
            self.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
        self.bert.eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, query: str, passages: list[str]) -> list[float]:
        out: list[float] = []
        for s in range(0, len(passages), self.batch_size):
            chunk = passages[s : s + self.batch_size]
            enc = self.tokenizer(
                [query] * len(chunk),
                chunk,
                truncation="only_second",
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            out += self.head(self.bert(**enc).last_hidden_state[:, 0]).squeeze(-1).tolist()
        return out


__all__ = ["CosineScorer", "CrossEncoderReranker", "RerankerScorer", "encoder_dir"]
