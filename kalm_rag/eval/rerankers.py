"""The rerankers compared by ``kalm-rag eval``: BM25 (first stage), MiniLM cosine, the cross-encoder, kalm-mini.

Each reranker scores one query's candidate passages (texts) and returns one float per candidate.
Passage-side work that a method can do ahead (kalm-mini's encoder states, the bi-encoder's passage
embeddings) comes from the ``EncodingCache``; only query-time work is done per query.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kalm_rag.models.mini import MiniBackend
from kalm_rag.pooling import mep_pool
from kalm_rag.prompt import DEFAULT_INSTRUCTION
from kalm_rag.train.cache import EncodingCache


class MiniReranker:
    """kalm-mini at one MEP ratio, on cached encoder states (the engine's math, without its store)."""

    def __init__(self, backend: MiniBackend, cache: EncodingCache, ratio: int, *, batch_size: int = 100) -> None:
        self.backend, self.cache, self.ratio, self.batch_size = backend, cache, ratio, batch_size
        self.name = f"kalm-mini r={ratio}"
        self.identity = f"{backend.weights_id}@r{ratio}"

    @torch.inference_mode()
    def __call__(self, query: str, passages: list[str]) -> list[float]:
        prompt = self.backend.prompt_ids(
            query, instruction=DEFAULT_INSTRUCTION, system_instruction="", max_query_tokens=512
        )
        cut = prompt.index(self.backend.sep_id) + 1
        out: list[float] = []
        for s in range(0, len(passages), self.batch_size):
            chunk = passages[s : s + self.batch_size]
            h, m = self.cache.padded(chunk)
            pooled, counts = mep_pool(h, m, self.ratio)  # (B, W, d), (B, W)
            logits = self.backend.forward_scores(prompt[:cut], [prompt[cut:]] * len(chunk), pooled, (counts > 0).long())
            out += logits.float().tolist()
        return out


class CosineReranker:
    """all-MiniLM-L6-v2 as a bi-encoder: cosine of mean-pooled, normalised embeddings (sentence-transformers')."""

    name = "all-MiniLM-L6-v2 cosine"

    def __init__(self, backend: MiniBackend, cache: EncodingCache) -> None:
        self.backend, self.cache = backend, cache
        self.identity = backend.encoder_id
        self._emb: dict[str, torch.Tensor] = {}

    def passage_embedding(self, passage: str) -> torch.Tensor:
        if passage not in self._emb:
            self._emb[passage] = F.normalize(self.cache.get(passage).mean(dim=0), dim=-1)  # (d,)
        return self._emb[passage]

    @torch.inference_mode()
    def query_embedding(self, query: str) -> torch.Tensor:
        ids = self.backend.tokenize_passages([query], 256)[0]
        h = self.backend.encode(torch.tensor([ids]), torch.ones((1, len(ids)), dtype=torch.long))[0]  # (n, d)
        return F.normalize(h.float().mean(dim=0), dim=-1)

    def __call__(self, query: str, passages: list[str]) -> list[float]:
        q = self.query_embedding(query)
        P = torch.stack([self.passage_embedding(p) for p in passages])  # (N, d)
        return (P @ q).tolist()


class CrossEncoderReranker:
    """The same-backbone cross-encoder trained by ``kalm-rag train cross-encoder``."""

    name = "MiniLM cross-encoder"

    def __init__(self, checkpoint: str | Path, *, batch_size: int = 50) -> None:
        from safetensors.torch import load_file

        from kalm_rag.models.mini import MiniConfig

        self.bert, self.tokenizer = MiniBackend.load_encoder(
            MiniConfig(), device=torch.device("cpu"), dtype=torch.float32
        )
        cfg = json.loads((Path(checkpoint) / "config.json").read_text())
        self.max_length = int(cfg.get("max_length", 320))
        weights = Path(checkpoint) / "model.safetensors"
        self.identity = "minilm-cross-encoder-" + hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        state = load_file(str(weights))
        self.bert.load_state_dict({k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")})
        self.head = torch.nn.Linear(self.bert.config.hidden_size, 1)  # type: ignore[arg-type]  # BertConfig.hidden_size: int
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
