"""Matryoshka embedding pooling (MEP) and exact re-pooling: pure tensor functions.

MEP splits a passage's ``n`` encoder positions into consecutive windows of ``ratio`` tokens from
position 0. Each window becomes the mean of its *real* tokens; a window with no real token is masked.
Keeping each window's real-token count makes any coarser ratio ``k * ratio`` derivable exactly
(a count-weighted mean of ``k`` consecutive windows), without the encoder.

>>> import torch
>>> h = torch.tensor([[[1.0], [3.0], [5.0], [0.0]]])   # (B=1, n=4, d=1); last position is padding
>>> m = torch.tensor([[1, 1, 1, 0]])
>>> pooled, counts = mep_pool(h, m, 2)
>>> pooled[0, :, 0].tolist(), counts[0].tolist()
([2.0, 5.0], [2, 1])
>>> coarse, c2 = repool(pooled[0], counts[0], 2)
>>> coarse[:, 0].tolist(), c2.tolist()
([3.0], [3])
"""

from __future__ import annotations

import math

import torch

MIN_RATIO = 1
MAX_RATIO = 32


def num_windows(n_tokens: int, ratio: int) -> int:
    """Number of MEP windows for ``n_tokens`` positions at ``ratio``: ``ceil(n / ratio)``."""
    return math.ceil(n_tokens / ratio)


def mep_pool(hidden: torch.Tensor, mask: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool encoder states into windows of ``ratio`` tokens, averaging only real tokens.

    Args:
        hidden: encoder final hidden states, shape ``(B, n, d)``.
        mask: 1 for real tokens and 0 for padding, shape ``(B, n)``.
        ratio: window size in tokens (``>= 1``).

    Returns:
        ``(pooled, counts)``: pooled vectors ``(B, W, d)`` in ``hidden``'s dtype, with ``W = ceil(n / ratio)``,
        and the real-token count of each window ``(B, W)`` (int32). Windows with count 0 hold zeros.
    """
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    B, n, d = hidden.shape
    W = num_windows(n, ratio)
    pad = W * ratio - n
    weights = mask.to(torch.float32)
    values = hidden.to(torch.float32) * weights.unsqueeze(-1)  # (B, n, d), padding zeroed
    if pad:
        values = torch.nn.functional.pad(values, (0, 0, 0, pad))  # (B, W*r, d)
        weights = torch.nn.functional.pad(weights, (0, pad))  # (B, W*r)
    sums = values.view(B, W, ratio, d).sum(dim=2)  # (B, W, d)
    counts = weights.view(B, W, ratio).sum(dim=2)  # (B, W)
    pooled = sums / counts.clamp(min=1.0).unsqueeze(-1)  # (B, W, d)
    return pooled.to(hidden.dtype), counts.to(torch.int32)


def repool(vectors: torch.Tensor, counts: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Derive a coarser pooling exactly: merge ``factor`` consecutive windows by count-weighted mean.

    Args:
        vectors: pooled window means of one passage, shape ``(W, d)``.
        counts: real-token count of each window, shape ``(W,)``.
        factor: how many windows merge into one (``>= 1``).

    Returns:
        ``(vectors, counts)`` of shapes ``(ceil(W / factor), d)`` and ``(ceil(W / factor),)``; the
        vectors are in fp32 (the weighted sums are taken in fp32 whatever the stored dtype).
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    W, d = vectors.shape
    c = counts.to(torch.float32)
    if factor == 1:
        return vectors.to(torch.float32), counts.to(torch.int32)
    W2 = num_windows(W, factor)
    pad = W2 * factor - W
    sums = vectors.to(torch.float32) * c.unsqueeze(-1)  # (W, d): window means back to sums
    if pad:
        sums = torch.nn.functional.pad(sums, (0, 0, 0, pad))
        c = torch.nn.functional.pad(c, (0, pad))
    sums = sums.view(W2, factor, d).sum(dim=1)  # (W2, d)
    c = c.view(W2, factor).sum(dim=1)  # (W2,)
    return sums / c.clamp(min=1.0).unsqueeze(-1), c.to(torch.int32)
