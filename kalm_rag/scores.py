"""One ranking rule and one probability for every surface (engine, service, batcher).

Passages are ranked by their margin ``z_yes - z_no`` (a float32 sigmoid rounds every margin above ~17 to
1.0, so ranking by P(yes) would let input order decide between a margin of 17 and one of 25), and the score
shown is ``P(yes) = sigmoid(margin)`` computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def probabilities(margins: Sequence[float] | torch.Tensor) -> list[float]:
    """``P(yes) = sigmoid(margin)`` of each margin, computed in float32."""
    values = margins if isinstance(margins, torch.Tensor) else torch.tensor(list(margins), dtype=torch.float32)
    return torch.sigmoid(values.to(torch.float32)).tolist()


def rank_order(margins: Sequence[float]) -> list[int]:
    """Indices of ``margins`` best first: by margin, descending; equal margins keep their input order."""
    return sorted(range(len(margins)), key=lambda i: -margins[i])
