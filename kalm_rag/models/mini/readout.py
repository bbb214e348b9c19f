"""kalm-mini's evidence readout: window weights and a trained token-level sentence match.

The relevance attention (:class:`~kalm_rag.models.mini.modeling.RelevanceAttention`) already asks, for every
query token, "which window matches me"; averaged over the query's tokens its probabilities say which windows
the score read (:func:`relevance_readout`). :class:`SentenceMatch` asks it per sentence with weights trained for
evidence: how well each query token is matched somewhere in the sentence. The engine turns these, the windows'
vectors and the sentences' word pieces into sentence features, and the trained
:class:`~kalm_rag.evidence.SentenceReadout` shipped with the weights (``evidence.json``, fitted by
``kalm-rag train evidence``) weighs them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kalm_rag.errors import ModelLoadError
from kalm_rag.evidence import SentenceWindows

#: The trained sentence match shipped next to ``evidence.json``.
MATCH_FILE = "evidence_match.safetensors"


def relevance_readout(probe: dict[str, torch.Tensor], query_mask: torch.Tensor) -> torch.Tensor:
    """Window weights ``(B, W)``: relevance attention ``(B, Tq, 1+W)`` averaged over real query tokens (mask
    ``(B, Tq)``), the whole-passage window dropped.
    """
    attn = probe["relevance_attention"][..., 1:]  # (B, Tq, W)
    m = query_mask.to(attn.dtype).unsqueeze(-1)  # (B, Tq, 1)
    return (attn * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, W)


class SentenceMatch(nn.Module):
    """A trained token-level match of the query and each sentence (the readout's ``match`` feature).

    Each query token's frozen-encoder state is mapped by ``proj`` (a ``d x d`` matrix that starts as the
    identity) and compared, by cosine, with every pooled window of the sentence; the token's best window counts.
    A sentence's match is the mean of its tokens' best cosines, weighted by ``softplus(idf_scale * idf +
    idf_bias)`` (rare words count more; special tokens not at all). Only the query side is mapped, so the cost is
    one ``(Tq, d) x (d, N)`` product for all the windows of a call. Trained with the readout on SQuAD's answer
    sentences (``kalm-rag train evidence``).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.idf_scale = nn.Parameter(torch.tensor(1.0))
        self.idf_bias = nn.Parameter(torch.tensor(0.0))
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(hidden_size))

    def token_weights(self, idf: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Each query token's share ``(..., Tq)`` of the match from its IDF and realness ``(..., Tq)`` (sums to 1)."""
        w = F.softplus(self.idf_scale * idf + self.idf_bias) * real
        return w / w.sum(dim=-1, keepdim=True).clamp(min=1e-6)

    def token_window_cosines(self, query_states: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Cosines ``(..., Tq, N)`` of the mapped query states ``(..., Tq, d)`` and the windows ``(..., N, d)``."""
        q = F.normalize(self.proj(query_states), dim=-1)
        return q @ F.normalize(windows, dim=-1).transpose(-1, -2)

    def forward(
        self, query_states: torch.Tensor, idf: torch.Tensor, real: torch.Tensor, windows: SentenceWindows
    ) -> torch.Tensor:
        """Match ``(S,)`` of one query (states ``(Tq, d)``, token IDF and 0/1 realness ``(Tq,)``) with each sentence
        of ``windows`` (the call's window vectors and sentence-window pairs).
        """
        vectors = windows.vectors.to(query_states.device, query_states.dtype)  # (N, d)
        cos = self.token_window_cosines(query_states, vectors)  # (Tq, N)
        pairs = windows.sentence.to(cos.device).expand(cos.shape[0], -1)  # (Tq, P)
        best = torch.full((cos.shape[0], windows.num_sentences), -1.0, dtype=cos.dtype, device=cos.device)
        best = best.scatter_reduce(1, pairs, cos[:, windows.window.to(cos.device)], "amax")  # (Tq, S): cos >= -1
        return self.token_weights(idf, real) @ best  # (S,)

    def save(self, folder: str | Path) -> Path:
        """Write :data:`MATCH_FILE` (float32) into ``folder``."""
        path = Path(folder) / MATCH_FILE
        save_file({k: v.detach().float().contiguous() for k, v in self.state_dict().items()}, str(path))
        return path

    @classmethod
    def load(cls, folder: str | Path, hidden_size: int) -> SentenceMatch | None:
        """The match in ``folder`` (``None`` when it ships none); refuses a file of another shape."""
        path = Path(folder) / MATCH_FILE
        if not path.is_file():
            return None
        match = cls(hidden_size)
        state = load_file(str(path))
        expected = {k: tuple(v.shape) for k, v in match.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            raise ModelLoadError(f"{path}: tensors {got} do not match a {hidden_size}-wide sentence match {expected}")
        match.load_state_dict(state)
        return match.eval()
