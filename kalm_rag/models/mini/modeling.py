"""kalm-mini's trainable decoder: relevance attention, merged-attention layers and the score head.

The decoder reads the frozen encoder's final states of the instruction (``[CLS] instruction [SEP]``) and of
the query (``[CLS] query [SEP]``, the ``[CLS]`` state dropped), each encoded alone, so that query and passage
states live in one space, and the MEP-pooled passage vectors ``(B, W, d)`` from the store:

1. one more context vector, the whole-passage window (the mean of the real windows), joins the windows;
2. relevance attention: each query token attends, with cosine similarity times a learned temperature, to the
   passage windows next to a learned sink logit; the mass it puts on the passage, carried by the value
   map, is added to its final state. Query/key maps start as the identity, so before training the layer
   already reads "does some window match this token";
3. ``num_layers`` BERT layers (post-LN, initialised from MiniLM's top layers) with merged attention: the query
   tokens attend to the concatenation of the instruction tokens' states, the passage windows (through a
   per-layer LayerNorm + linear adapter) and their own states, with one set of key/value projections, as
   T5Gemma 2 does. The instruction tokens attend only to themselves, so their states are computed once;
4. the head: a linear map of the mean of the query tokens' final states, plus the encoder-cosine skip
   ``cosine_weight * cos(mean of the query's input states, whole-passage window)`` (the frozen encoder's own
   bi-encoder score, so the layers learn what it misses), gives the relevance logit, then the calibration
   ``score_scale * logit + score_bias``.

At inference every layer's passage keys/values come from one fused matrix product
(:func:`fused_passage_kv_weights`). Follows karpathy/nanoGPT ``model.py`` (shape comments) and transformers
``models/bert/modeling_bert.py`` (layer layout, weight names of the copied layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from kalm_rag.models.mini.config import MiniConfig


def linear_rows(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)`` for ``x`` ``(B, T, d)``, computed once when every row is the same (``x`` is an expanded
    ``(1, T, d)``, as the query is at inference before it has read a passage).
    """
    if x.shape[0] > 1 and x.stride(0) == 0:
        return lin(x[:1]).expand(x.shape[0], -1, -1)  # (B, T, d_out)
    return lin(x)


class MergedAttentionLayer(nn.Module):
    """A BERT layer (post-LN) whose tokens also attend to extra context vectors.

    Keys/values come from the layer's own projections of ``cat(context, x)``; queries only from ``x``.
    With no context it is exactly a BERT encoder layer.
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
        context: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, T, d)`` with mask ``(B, T)``; optional context ``[(keys, values), ...]``, each ``(B, M_i, d)``,
        whose concatenation ``(B, M, d)`` has mask ``context_mask`` ``(B, M)``.

        The context keys/values are this layer's ``key``/``value`` projections of the context vectors,
        computed by the caller so that shared or fused parts are computed once; the parts are joined here in
        one copy.
        """
        B, T, C = x.shape
        hs = C // self.n_head
        k, v = linear_rows(self.key, x), linear_rows(self.value, x)  # (B, T, d)
        src_mask = x_mask
        if context:
            assert context_mask is not None, "context needs its mask"
            k = torch.cat([*(ck.expand(B, -1, -1) for ck, _ in context), k], dim=1)  # (B, M+T, d)
            v = torch.cat([*(cv.expand(B, -1, -1) for _, cv in context), v], dim=1)  # (B, M+T, d)
            src_mask = torch.cat([context_mask, x_mask], dim=1)  # (B, M+T)
        S = k.shape[1]
        q = linear_rows(self.query, x).reshape(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, S, self.n_head, hs).transpose(1, 2)  # (B, nh, S, hs)
        v = v.view(B, S, self.n_head, hs).transpose(1, 2)  # (B, nh, S, hs)
        allowed = src_mask.bool()[:, None, None, :]  # (B, 1, 1, S): bidirectional, padding hidden
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, nh, T, hs)
        return self.finish(x, y)

    def forward_folded(
        self,
        x: torch.Tensor,
        x_mask: torch.Tensor,
        instruction: tuple[torch.Tensor, torch.Tensor],
        passages_hat: torch.Tensor,
        passage_mask: torch.Tensor,
        passage_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """:meth:`forward` with context ``[instruction, (K p, V p)]``, without forming the passage keys/values.

        ``passage_kv = (Wk, bk, Wv, bv)`` map the normalised passage vectors ``passages_hat`` ``(B, P, d)`` to
        this layer's keys/values (:func:`fused_passage_kv_weights`). Per head, ``q . (Wk p + bk) =
        (Wk^T q) . p + q . bk`` and ``sum_p a_p (Wv p + bv) = Wv (sum_p a_p p) + (sum_p a_p) bv``: the query
        side is folded into the weights (cheaper for short queries against many passage vectors; the decoder
        picks it with :meth:`MiniDecoder.folding_pays`). Inference only.
        """
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        P = passages_hat.shape[1]
        Wk, bk, Wv, bv = passage_kv
        heads = lambda t: t.reshape(t.shape[0], -1, nh, hs).transpose(1, 2)  # noqa: E731  (N, S, d) -> (N, nh, S, hs)
        shared = B > 1 and x.stride(0) == 0  # every row the same query (the first layer): its side once
        x1 = x[:1] if shared else x  # (B', T, d), B' = 1 or B
        q = heads(self.query(x1) * hs**-0.5)  # (B', nh, T, hs): the attention scale applied here
        k_i, v_i = (heads(t) for t in instruction)  # (1, nh, Ti, hs)
        k_x, v_x = heads(self.key(x1)), heads(self.value(x1))  # (B', nh, T, hs)
        u = torch.einsum("bhts,hsd->bhtd", q, Wk.view(nh, hs, C))  # (B', nh, T, d): the key map folded in
        if shared:  # one product against every passage vector of the batch
            s_p = (u.reshape(nh * T, C) @ passages_hat.reshape(B * P, C).T).view(nh, T, B, P).permute(2, 0, 1, 3)
        else:
            s_p = (u.reshape(B, nh * T, C) @ passages_hat.transpose(1, 2)).view(B, nh, T, P)  # (B, nh, T, P)
        s_p = s_p + (q * bk.view(1, nh, 1, hs)).sum(-1, keepdim=True)  # + q . bk
        s_i, s_x = q @ k_i.transpose(-1, -2), q @ k_x.transpose(-1, -2)  # (B', nh, T, Ti), (B', nh, T, T)
        scores = torch.cat([s_i.expand(B, -1, -1, -1), s_p, s_x.expand(B, -1, -1, -1)], dim=-1)  # (B, nh, T, S)
        Ti = k_i.shape[2]
        allowed = torch.cat(
            [torch.ones_like(x_mask[:, :1]).expand(B, Ti), passage_mask.to(x_mask.dtype), x_mask], dim=1
        ).bool()[:, None, None, :]  # (B, 1, 1, S)
        a = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # (B, nh, T, S)
        a_i, a_p, a_x = a.split([Ti, P, T], dim=-1)
        read = (a_p.reshape(B, nh * T, P) @ passages_hat).view(B, nh, T, C)  # (B, nh, T, d): sum_p a_p p
        y = a_i @ v_i + a_x @ v_x.expand(B, -1, -1, -1)  # (B, nh, T, hs)
        y = (
            y
            + torch.einsum("bhtd,hsd->bhts", read, Wv.view(nh, hs, C))
            + a_p.sum(-1, keepdim=True) * bv.view(1, nh, 1, hs)
        )
        return self.finish(x, y)

    def finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Attention output ``y`` ``(B, nh, T, hs)`` -> output projection, residual, LayerNorm, FFN ``(B, T, d)``."""
        B, T, C = x.shape
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, d)
        x = self.attn_norm(x + self.dropout(self.attn_out(y)))
        x = self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))
        return x


class PassageAdapter(nn.Module):
    """Per-layer map of pooled passage vectors into the layer's input space: LayerNorm then linear.

    The LayerNorm undoes the norm shrinkage of averaging (so every ratio looks alike); the linear starts
    as the identity and its bias acts as a learned "passage" type embedding.
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
        """Pooled passage vectors ``(B, W, d)`` -> the layer's input space ``(B, W, d)``."""
        return self.proj(self.norm(p))  # (B, W, d)


class RelevanceAttention(nn.Module):
    """Cross-attention of the query tokens over the passage vectors, cosine-scaled, with a sink (one head).

    For token ``t``: ``a_tw = softmax_w([s, tau * cos(Q x_t, K p_w)])`` over the sink logit ``s`` and every
    window ``w``; the output ``sum_w a_tw V p_w`` has, through ``V``'s bias, a component proportional to the
    mass ``sum_w a_tw`` the token did not leave on the sink. Q and K start as the identity and V as its
    bias alone, so at step 0 that mass is a soft "does some window match this token".
    """

    def __init__(self, config: MiniConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.temperature = nn.Parameter(torch.full((1,), config.relevance_temperature_init))
        self.sink = nn.Parameter(torch.full((1,), config.relevance_sink_init))
        with torch.no_grad():
            for lin in (self.query, self.key):
                lin.weight.copy_(torch.eye(d))
                lin.bias.zero_()
            self.value.weight.zero_()
            self.value.bias.zero_()  # set by the decoder, aligned with its head

    def forward(
        self,
        x: torch.Tensor,
        passages: torch.Tensor,
        passage_mask: torch.Tensor,
        probe: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Query states ``(B, T, d)`` and passage vectors ``(B, W, d)`` with mask ``(B, W)`` -> ``(B, T, d)``.

        ``probe``, if given, receives ``relevance_logits`` and ``relevance_attention`` ``(B, T, W)`` (the
        evidence readout; the output is unchanged).
        """
        B, T, _ = x.shape
        q = F.normalize(linear_rows(self.query, x), dim=-1)  # (B, T, d)
        k = F.normalize(self.key(passages), dim=-1)  # (B, W, d)
        logits = self.temperature * (q @ k.transpose(-1, -2))  # (B, T, W)
        logits = logits.masked_fill(~passage_mask.bool()[:, None, :], float("-inf"))
        sink = self.sink.to(logits.dtype).expand(B, T, 1)  # (B, T, 1)
        attn = torch.softmax(torch.cat([sink, logits], dim=-1), dim=-1)[..., 1:]  # (B, T, W): sink dropped
        if probe is not None:
            probe["relevance_logits"], probe["relevance_attention"] = logits, attn
        # attn @ value(passages), mapped after the mixing: T query tokens are far fewer than W windows
        read = attn @ passages  # (B, T, d)
        return F.linear(read, self.value.weight) + attn.sum(dim=-1, keepdim=True) * self.value.bias  # (B, T, d)


def with_summary_window(passages: torch.Tensor, passage_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the mean of the real windows to the pooled passage vectors: ``(B, W, d)`` -> ``(B, 1+W, d)``.

    Computed from the cached vectors alone (it depends on the passage only), so caching is unchanged.
    """
    w = passage_mask.to(passages.dtype).unsqueeze(-1)  # (B, W, 1)
    summary = (passages * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1, d)
    ones = torch.ones_like(passage_mask[:, :1])  # (B, 1)
    return torch.cat([summary, passages], dim=1), torch.cat([ones, passage_mask], dim=1)


def encoder_cosine(h_query: torch.Tensor, query_mask: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """Cosine ``(B,)`` of the mean query state ``(B, Tq, d)`` (mask ``(B, Tq)``) and the passage summary ``(B, d)``.

    Mean pooling of MiniLM's states is how all-MiniLM-L6-v2 embeds text, so this is (up to the query's dropped
    ``[CLS]``) the encoder's own bi-encoder score.
    """
    w = query_mask.to(h_query.dtype).unsqueeze(-1)  # (B, Tq, 1)
    q = (h_query * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # (B, d)
    return F.cosine_similarity(q, summary, dim=-1)  # (B,)


@torch.no_grad()
def fused_passage_kv_weights(layers: nn.ModuleList, adapters: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's passage key/value map folded into one linear map of the *normalised* passage vectors.

    ``key(proj(gamma * x_hat + beta))`` is linear in ``x_hat`` (LayerNorm without its affine part), so all
    ``2 * L`` maps stack into one ``(2*L*d, d)`` weight: at inference one matrix product per passage vector
    replaces ``L`` LayerNorms and ``4 * L`` products. Rows are ordered ``[k_0, v_0, k_1, v_1, ...]``.
    """
    weights, biases = [], []
    for layer, adapter in zip(
        cast(list[MergedAttentionLayer], layers), cast(list[PassageAdapter], adapters), strict=True
    ):
        A = adapter.proj.weight * adapter.norm.weight[None, :]  # (d, d): proj after the LayerNorm's scale
        a = adapter.proj.weight @ adapter.norm.bias + adapter.proj.bias  # (d,)
        for lin in (layer.key, layer.value):
            weights.append(lin.weight @ A)  # (d, d)
            biases.append(lin.weight @ a + lin.bias)  # (d,)
    return torch.cat(weights), torch.cat(biases)  # (2*L*d, d), (2*L*d,)


class MiniDecoder(nn.Module):
    """The trainable part of kalm-mini: relevance attention, merged-attention layers, adapters and the head."""

    def __init__(self, config: MiniConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MergedAttentionLayer(config) for _ in range(config.num_layers))
        self.adapters = nn.ModuleList(PassageAdapter(config) for _ in range(config.num_layers))
        self.relevance = RelevanceAttention(config)
        self.head = nn.Linear(config.hidden_size, 1)
        self.cosine_weight = nn.Parameter(torch.full((1,), config.cosine_weight_init))
        # (parameter versions, fused passage K/V weights): rebuilt by fused_weights() when a parameter changes
        self._fused: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.02)
            self.head.bias.zero_()
            w = self.head.weight[0]  # (d,): value bias along the head's weight, head(mass * bias) = scale * mass
            self.relevance.value.bias.copy_(config.relevance_scale_init * w / w.pow(2).sum())

    def forward(
        self,
        h_instr: torch.Tensor,
        h_query: torch.Tensor,
        query_mask: torch.Tensor,
        passages: torch.Tensor,
        passage_mask: torch.Tensor,
        probe: dict[str, torch.Tensor] | None = None,
        instruction_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Calibrated relevance logits ``(B,)`` fp32.

        Args:
            h_instr: encoder states of ``[CLS] instruction [SEP]``, shared by the batch ``(1, Ti, d)``.
            h_query: encoder states of each row's query tokens and ``[SEP]``, right-padded ``(B, Tq, d)``.
            query_mask: 1 for real query positions ``(B, Tq)``.
            passages: pooled passage vectors ``(B, W, d)``.
            passage_mask: 1 for real windows ``(B, W)``.
            probe: if given, receives what the evidence readout needs (the relevance attention's logits and
                probabilities over ``[summary; windows]`` ``(B, Tq, 1+W)``, the query's final states
                ``query_states`` ``(B, Tq, d)``); the logits are unchanged.
            instruction_kv: :meth:`instruction_kvs` of ``h_instr`` when the caller keeps them (inference).
        """
        passages, passage_mask = with_summary_window(passages, passage_mask)  # (B, 1+W, d), (B, 1+W)
        cosine = encoder_cosine(h_query, query_mask, passages[:, 0])  # (B,): before any layer reads the query
        relevance = self.relevance(h_query, passages, passage_mask, probe)  # (B, Tq, d): what each token read
        B = h_query.shape[0]
        Ti = h_instr.shape[1]
        instr_mask = torch.ones((1, Ti), dtype=query_mask.dtype, device=query_mask.device)  # (1, Ti)
        kvs = self.instruction_kvs(h_instr) if instruction_kv is None else instruction_kv  # [(1, Ti, d) x 2]
        if not torch.is_grad_enabled() and self.folding_pays(h_query.shape[1], passages.shape[1]):
            x_hat = F.layer_norm(passages, passages.shape[-1:], eps=self.config.layer_norm_eps)  # (B, 1+W, d)
            W, b = self.fused_weights()
            d = self.config.hidden_size
            W, b = W.view(len(self.layers), 2, d, d), b.view(len(self.layers), 2, d)  # [layer, k/v]
            for i, folded in enumerate(cast(list[MergedAttentionLayer], self.layers)):
                h_query = folded.forward_folded(
                    h_query, query_mask, kvs[i], x_hat, passage_mask, (W[i, 0], b[i, 0], W[i, 1], b[i, 1])
                )  # (B, Tq, d)
        else:
            ctx_mask = torch.cat([instr_mask.expand(B, -1), passage_mask.to(query_mask.dtype)], dim=1)  # (B, Ti+1+W)
            for layer, kv_i, (k_p, v_p) in zip(self.layers, kvs, self.passage_kvs(passages), strict=True):
                h_query = layer(h_query, query_mask, [kv_i, (k_p, v_p)], ctx_mask)  # (B, Tq, d)
        h_query = h_query + relevance  # (B, Tq, d)
        if probe is not None:
            probe["query_states"] = h_query
        w = query_mask.to(h_query.dtype).unsqueeze(-1)  # (B, Tq, 1)
        h_out = (h_query * w).sum(dim=1) / w.sum(dim=1)  # (B, d): mean of the query tokens
        logits = (self.head(h_out).squeeze(-1) + self.cosine_weight * cosine).float()  # (B,)
        return self.config.score_scale * logits + self.config.score_bias

    def instruction_kvs(self, h_instr: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values ``(1, Ti, d)`` of the instruction's tokens.

        The instruction attends only to itself (it never sees a passage or the query), so these depend on the
        instruction alone: computed once per call and shared by every row, and kept by the backend across
        calls at inference (most calls use the default instruction).
        """
        instr_mask = torch.ones(h_instr.shape[:2], dtype=torch.long, device=h_instr.device)  # (1, Ti)
        out = []
        for i, layer in enumerate(cast(list[MergedAttentionLayer], self.layers)):
            out.append((layer.key(h_instr), layer.value(h_instr)))  # (1, Ti, d) each
            if i < len(self.layers) - 1:  # the last layer's instruction states are never read
                h_instr = layer(h_instr, instr_mask)  # (1, Ti, d)
        return out

    def weights_version(self) -> tuple:
        """Changes whenever a parameter is updated in place or moved (what caches of derived weights check)."""
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def folding_pays(self, query_tokens: int, passage_vectors: int) -> bool:
        """Whether :meth:`MergedAttentionLayer.forward_folded` costs fewer products than forming passage keys/values.

        Per row and layer, folded: ``2 * nh * Tq * P * d + 2 * Tq * d^2`` multiply-adds; explicit: ``2 * P * d^2``.
        """
        nh, d = self.config.num_attention_heads, self.config.hidden_size
        return nh * query_tokens * passage_vectors + query_tokens * d < passage_vectors * d

    def passage_kvs(self, passages: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's passage keys and values ``(B, W, d)``; one fused product at inference."""
        if torch.is_grad_enabled():
            out = []
            for layer, adapter in zip(self.layers, self.adapters, strict=True):
                p = adapter(passages)  # (B, W, d)
                out.append((layer.key(p), layer.value(p)))
            return out
        W, b = self.fused_weights()
        x_hat = F.layer_norm(
            passages, passages.shape[-1:], eps=self.config.layer_norm_eps
        )  # (B, W, d), shared by every layer
        kv = F.linear(x_hat, W, b).unflatten(-1, (len(self.layers), 2, -1))  # (B, W, L, 2, d)
        return [(kv[:, :, i, 0], kv[:, :, i, 1]) for i in range(len(self.layers))]

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`fused_passage_kv_weights` of this decoder, rebuilt only when a parameter changed (or moved)."""
        params = [*self.layers.parameters(), *self.adapters.parameters()]
        version = tuple((p.data_ptr(), p._version) for p in params)  # in-place updates bump _version
        if self._fused is None or self._fused[0] != version:
            self._fused = (version, fused_passage_kv_weights(self.layers, self.adapters))
        return self._fused[1]

    @torch.no_grad()
    def init_from_bert(self, bert: nn.Module) -> None:
        """Copy MiniLM layers ``config.init_layers`` into the decoder layers (a fresh decoder's start)."""
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
        for layer, src_index in zip(self.layers, self.config.init_layers, strict=True):
            src = cast(Any, bert).encoder.layer[src_index]
            for ours, theirs in names.items():
                mod_src = src.get_submodule(theirs)
                mod_dst = getattr(layer, ours)
                mod_dst.weight.copy_(mod_src.weight)
                mod_dst.bias.copy_(mod_src.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
