"""kalm-mini's window readout for evidence: one relevance weight per pooled passage window.

The relevance attention (:class:`~kalm_rag.models.mini.modeling.RelevanceAttention`) already asks, for every
query token, "which window matches me"; averaged over the query's tokens its probabilities say which windows
the score read. The engine turns these window weights, the windows' vectors and the sentences' word pieces into
sentence features, and the trained :class:`~kalm_rag.evidence.SentenceReadout` shipped with the weights
(``evidence.json``, fitted by ``kalm-rag train evidence``) weighs them.
"""

from __future__ import annotations

import torch


def relevance_readout(probe: dict[str, torch.Tensor], query_mask: torch.Tensor) -> torch.Tensor:
    """Window weights ``(B, W)``: relevance attention ``(B, Tq, 1+W)`` averaged over real query tokens (mask
    ``(B, Tq)``), the whole-passage window dropped.
    """
    attn = probe["relevance_attention"][..., 1:]  # (B, Tq, W)
    m = query_mask.to(attn.dtype).unsqueeze(-1)  # (B, Tq, 1)
    return (attn * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, W)
