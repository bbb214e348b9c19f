"""The interface between the engine and a model backend.

A backend turns passages into encoder states (the offline side) and, given a tokenised prompt and
pooled passage vectors, returns the yes/no margin (the online side). Pooling, caching and batching
live in the engine; a backend never sees the store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class FBNLBackend(ABC):
    """An FBNL model: passage encoder + prompt decoder attending to pooled passage vectors."""

    #: A short name for the model family, used in store namespaces (e.g. ``"t5gemma2"``).
    family: str
    #: Width of the cached passage vectors.
    hidden_size: int
    #: Device and dtype the model runs in.
    device: torch.device
    dtype: torch.dtype
    #: Token id used to right-pad encoder inputs.
    pad_token_id: int
    #: Identity of the weights (content-derived), part of the store namespace.
    weights_id: str

    @abstractmethod
    def tokenize_passages(self, passages: Sequence[str], max_tokens: int) -> list[list[int]]:
        """Encoder token ids of each passage (prefix added, no special tokens, cut to ``max_tokens``)."""

    @abstractmethod
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder final hidden states ``(B, n, d)`` for right-padded ids ``(B, n)``."""

    @abstractmethod
    def prompt_ids(self, query: str, *, instruction: str, system_instruction: str, max_query_tokens: int) -> list[int]:
        """Decoder token ids of the prompt for ``query``."""

    @abstractmethod
    def margins(
        self,
        prompt_ids: torch.Tensor,
        prompt_lengths: torch.Tensor,
        passage_vectors: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Yes/no margins ``(B,)`` in fp32.

        Args:
            prompt_ids: right-padded prompt ids ``(B, T)``.
            prompt_lengths: real length of each prompt ``(B,)``.
            passage_vectors: pooled passage vectors ``(B, W, d)`` in the model dtype.
            passage_mask: 1 for real windows, 0 for padding ``(B, W)``.
        """
