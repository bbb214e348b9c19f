"""kalm-mini's evidence readouts: one relevance weight per pooled passage window.

- Training-free: the relevance attention's probabilities over the windows, averaged over the query's tokens
  (``relevance_readout``).
- Trained (:class:`EvidenceHead`, ``evidence_head.safetensors`` next to the weights): a small per-window head on
  what the decoder computes anyway: the relevance attention's cosine logits and probabilities of each query
  token over each window, and a low-rank bilinear match between the mean of the query's final states and the
  (LayerNorm-ed) window vector. It reads the same forward pass as the score, so evidence costs a few small
  products. Trained with :mod:`kalm_rag.train.evidence` on SQuAD (the gold sentence holds the answer span).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kalm_rag.errors import ModelLoadError

HEAD_FILE = "evidence_head.safetensors"
HEAD_CONFIG = "evidence_head.json"
NUM_FEATURES = 5


def relevance_readout(probe: dict[str, torch.Tensor], query_mask: torch.Tensor) -> torch.Tensor:
    """Training-free window weights ``(B, W)``: relevance attention ``(B, Tq, 1+W)`` averaged over real query
    tokens (mask ``(B, Tq)``), the whole-passage window dropped.
    """
    attn = probe["relevance_attention"][..., 1:]  # (B, Tq, W)
    m = query_mask.to(attn.dtype).unsqueeze(-1)  # (B, Tq, 1)
    return (attn * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, W)


def window_features(probe: dict[str, torch.Tensor], query_mask: torch.Tensor) -> torch.Tensor:
    """Per-window features ``(B, W, 5)`` from the relevance attention: the log of the training-free readout
    (:func:`relevance_readout`), then the max and mean over the query tokens of its cosine logits and of the log
    of its probabilities (the whole-passage window dropped).
    """
    logits = probe["relevance_logits"][..., 1:].float()  # (B, Tq, W)
    log_attn = torch.log(probe["relevance_attention"][..., 1:].float().clamp(min=1e-9))  # (B, Tq, W)
    real = query_mask.bool().unsqueeze(-1)  # (B, Tq, 1)
    n = real.sum(dim=1).clamp(min=1)  # (B, 1)
    finite = torch.isfinite(logits) & real  # padded windows hold -inf
    logits = logits.masked_fill(~finite, 0.0)
    feats = [
        torch.log(relevance_readout(probe, query_mask).float().clamp(min=1e-9)),  # (B, W)
        logits.masked_fill(~real, -1e4).max(dim=1).values,
        logits.sum(dim=1) / n,
        log_attn.masked_fill(~real, -1e4).max(dim=1).values,
        (log_attn * real).sum(dim=1) / n,
    ]
    return torch.stack(feats, dim=-1)  # (B, W, 5)


class EvidenceHead(nn.Module):
    """Per-window evidence logits from the relevance attention's features and a query/window bilinear match.

    ``logit = log(readout) + MLP(features) + (U q) . (V LN(p))``: the MLP's last layer starts at zero and the
    bilinear maps near it, so an untrained head ranks windows exactly as the training-free readout does and
    training learns a correction.

    Args:
        hidden_size: width of the query states and passage vectors (384 for kalm-mini).
        rank: rank of the bilinear match.
        mlp_hidden: hidden width of the feature MLP.
    """

    def __init__(self, hidden_size: int = 384, rank: int = 32, mlp_hidden: int = 16, token_rank: int = 0) -> None:
        super().__init__()
        self.hidden_size, self.rank, self.mlp_hidden, self.token_rank = hidden_size, rank, mlp_hidden, token_rank
        # features are logits (about -10..10) and log-probabilities (about -20..0): a fixed 0.1 brings them near 1
        self.mlp = nn.Sequential(nn.Linear(NUM_FEATURES, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, 1))
        self.query_map = nn.Linear(hidden_size, rank, bias=False)
        self.window_map = nn.Linear(hidden_size, rank, bias=False)
        # token-level match (optional): max over the query's tokens of (U' h_t) . (V' LN(p_w))
        self.token_query_map = nn.Linear(hidden_size, token_rank, bias=False) if token_rank else None
        self.token_window_map = nn.Linear(hidden_size, token_rank, bias=False) if token_rank else None
        with torch.no_grad():  # the query-side maps start at zero: every correction term starts at exactly 0
            for lin in (self.token_window_map, self.window_map):
                if lin is not None:
                    lin.weight.normal_(0.0, 0.02)
            for lin in (self.token_query_map, self.query_map):
                if lin is not None:
                    lin.weight.zero_()
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()

    def forward(
        self,
        features: torch.Tensor,
        query_states: torch.Tensor,
        query_mask: torch.Tensor,
        passages: torch.Tensor,
    ) -> torch.Tensor:
        """Window logits ``(B, W)``.

        Args:
            features: :func:`window_features` ``(B, W, 5)``.
            query_states: the decoder's final query states ``(B, Tq, d)``.
            query_mask: 1 for real query positions ``(B, Tq)``.
            passages: pooled passage vectors ``(B, W, d)``.
        """
        m = query_mask.to(query_states.dtype).unsqueeze(-1)  # (B, Tq, 1)
        q = (query_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, d)
        p = F.layer_norm(passages.float(), passages.shape[-1:])  # (B, W, d)
        bilinear = (self.window_map(p) @ self.query_map(q.float()).unsqueeze(-1)).squeeze(-1)  # (B, W)
        features = features.float()
        logits = features[..., 0] + self.mlp(0.1 * features).squeeze(-1) + bilinear  # (B, W)
        if self.token_query_map is not None and self.token_window_map is not None:
            t = self.token_query_map(query_states.float())  # (B, Tq, k)
            match = self.token_window_map(p) @ t.transpose(1, 2)  # (B, W, Tq)
            match = match.masked_fill(~query_mask.bool()[:, None, :], float("-inf"))
            logits = logits + match.max(dim=-1).values  # (B, W)
        return logits

    def config(self) -> dict[str, int]:
        """The constructor arguments (``evidence_head.json``)."""
        return {
            "hidden_size": self.hidden_size,
            "rank": self.rank,
            "mlp_hidden": self.mlp_hidden,
            "token_rank": self.token_rank,
        }

    def save(self, folder: str | Path) -> None:
        """Write ``evidence_head.safetensors`` (fp32, small) and ``evidence_head.json`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / HEAD_FILE), metadata={"format": "pt", "model_type": "kalm-mini-evidence"})
        (folder / HEAD_CONFIG).write_text(json.dumps(self.config(), indent=2) + "\n")


def load_evidence_head(folder: str | Path) -> EvidenceHead | None:
    """The trained head in ``folder``, or ``None`` if it holds none (the training-free readout is used)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / HEAD_FILE).is_file():
        return None
    try:
        config = json.loads((folder / HEAD_CONFIG).read_text())
        head = EvidenceHead(
            **{k: int(config[k]) for k in ("hidden_size", "rank", "mlp_hidden")},
            token_rank=int(config.get("token_rank", 0)),
        )
        head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    except Exception as exc:  # safetensors raises its own error types for a damaged file; json/torch others
        raise ModelLoadError(f"{folder / HEAD_FILE}: not a usable kalm-mini evidence head ({exc})") from exc
    return head.eval().requires_grad_(False)
