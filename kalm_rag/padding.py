"""Right padding into a batch: token id lists for the encoders, per-passage vectors for the decoders.

The two helpers every module pads with (engine, models, training cache, evaluation): real positions come
first in each row and the mask is 1 there, 0 after.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def right_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(B, n)`` ids (``pad_id`` after each end) and a ``(B, n)`` 0/1 mask."""
    n = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), n), pad_id, dtype=torch.long, device=device)  # (B, n)
    mask = torch.zeros((len(sequences), n), dtype=torch.long, device=device)  # (B, n)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def right_pad_vectors(
    vectors: Sequence[torch.Tensor], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(n_i, d)`` tensors into ``(B, n, d)`` (zeros after each end, in ``dtype``, default the first's)
    and a ``(B, n)`` 0/1 mask.
    """
    n = max(v.shape[0] for v in vectors)
    d = vectors[0].shape[1]
    out = torch.zeros((len(vectors), n, d), dtype=dtype or vectors[0].dtype)  # (B, n, d)
    mask = torch.zeros((len(vectors), n), dtype=torch.long)  # (B, n)
    for row, v in enumerate(vectors):
        out[row, : v.shape[0]] = v.to(out.dtype)
        mask[row, : v.shape[0]] = 1
    return out, mask
