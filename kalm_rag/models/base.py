"""The interface between the engine and a model backend.

A backend turns passages into encoder states (the offline side) and, given a tokenised prompt and
pooled passage vectors, returns the yes/no margin (the online side). Pooling, caching and batching
live in the engine; a backend never sees the store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kalm_rag.errors import EvidenceUnsupportedError
from kalm_rag.evidence import Offset


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

    @property
    def passage_encoder_id(self) -> str:
        """Identity of everything in the model that shapes the cached passage vectors (part of the store namespace).

        By default the whole weights: a backend whose passage encoder is frozen and separate from the rest
        (kalm-mini) narrows it to that encoder, so that its stored passages stay valid across decoder versions.
        """
        return self.weights_id

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
        prompt_ids: Sequence[int],
        passage_vectors: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Yes/no margins ``(B,)`` in fp32 of one prompt against B passages.

        Args:
            prompt_ids: the prompt's token ids (from :meth:`prompt_ids`), shared by every passage.
            passage_vectors: pooled passage vectors ``(B, W, d)`` in the model dtype.
            passage_mask: 1 for real windows, 0 for padding ``(B, W)``.
        """

    # ----- evidence (optional) ---------------------------------------------------------------------

    def passage_offsets(self, passages: Sequence[str], max_tokens: int) -> list[list[Offset]]:
        """Each encoder position's character span in its passage, aligned with :meth:`tokenize_passages`.

        ``None`` marks a position that holds no passage text (a prefix token, ``[CLS]``, ``[SEP]``). Only the
        positions the encoder reads are listed (the passage as cut at ``max_tokens``).
        """
        raise EvidenceUnsupportedError(f"the {self.family} backend cannot map its tokens back to the passage text")

    def margins_and_window_weights(
        self, prompt_ids: Sequence[int], passage_vectors: torch.Tensor, passage_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`margins` ``(B,)`` and, from the same pass, a relevance weight per passage window ``(B, W)``.

        The margins must equal :meth:`margins`' exactly (asking for evidence never changes a score); the
        weights are higher for windows that made the passage relevant (padding windows: any value).
        """
        raise EvidenceUnsupportedError(f"the {self.family} backend has no evidence readout")
