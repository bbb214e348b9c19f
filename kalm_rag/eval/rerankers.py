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
from kalm_rag.models.mini.backend import MiniBackend, encoder_dir, encoder_version, load_encoder
from kalm_rag.store.base import passage_key


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

    Given ``stored_from``, a kalm-mini reranker whose store holds MiniLM's token states (``base_ratio`` 1,
    float32), passage embeddings are read from that store instead of encoding every passage a second time:
    kalm-mini's first 256-position window, ``[CLS] <= 254 tokens [SEP]``, is exactly the input the recipe's
    truncation gives MiniLM, so the mean of its stored states is the same embedding (checked in the tests).
    Passages missing from the store are encoded directly.
    """

    name = "all-MiniLM-L6-v2 cosine"
    window = 256

    def __init__(self, *, batch_size: int = 32, stored_from: Reranker | None = None) -> None:
        config = MiniConfig()
        self.encoder, self.tokenizer = load_encoder(config, device=torch.device("cpu"), dtype=torch.float32)
        self.identity = f"cosine:{config.encoder_spec.distribution}=={encoder_version(config.encoder_spec)}"
        self.batch_size = batch_size
        self._emb: dict[str, torch.Tensor] = {}
        self._stored = stored_from if stored_from is not None and _holds_minilm_states(stored_from, config) else None

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Normalised embeddings ``(N, d)``."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[s : s + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.window,
                return_tensors="pt",
            )
            h = self.encoder(**enc).last_hidden_state  # (B, n, d)
            w = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, n, 1)
            out.append(F.normalize((h * w).sum(dim=1) / w.sum(dim=1), dim=-1))
        return torch.cat(out)

    def stored_embeddings(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Normalised embeddings ``(d,)`` of the ``texts`` whose token states are in ``stored_from``'s store."""
        if self._stored is None or not texts:
            return {}
        rr = self._stored
        entries = rr.store.get_many(rr.namespace, [passage_key(t) for t in texts])
        return {
            t: F.normalize(e.vectors[: self.window].float().mean(dim=0), dim=-1)  # (W, d) token states -> (d,)
            for t, e in zip(texts, entries)
            if e is not None and e.ratio == 1
        }

    def __call__(self, query: str, passages: list[str]) -> list[float]:
        todo = sorted({p for p in passages if p not in self._emb}, key=len)
        self._emb.update(self.stored_embeddings(todo))
        todo = [p for p in todo if p not in self._emb]
        if todo:
            for text, e in zip(todo, self.embed(todo)):
                self._emb[text] = e
        q = self.embed([query])[0]  # (d,)
        return (torch.stack([self._emb[p] for p in passages]) @ q).tolist()


def _holds_minilm_states(reranker: Reranker, config: MiniConfig) -> bool:
    """Whether ``reranker``'s store entries are MiniLM's unpooled float32 states in windows of at least 256."""
    backend = reranker.backend
    return (
        isinstance(backend, MiniBackend)
        and backend.config.encoder_spec == config.encoder_spec
        and backend.config.encoder_window >= CosineScorer.window
        and reranker.base_ratio == 1
        and reranker.storage_dtype == "float32"
    )


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
