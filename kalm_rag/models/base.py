"""The interface between the engine and a model backend.

A backend turns passages into encoder states (the offline side) and, given tokenised prompts and
pooled passage vectors, returns the yes/no margins (the online side). Pooling, caching and batching
live in the engine; a backend never sees the store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kalm_rag.errors import EvidenceUnsupportedError
from kalm_rag.evidence import Offset, SentenceReadout, SentenceWindows


@dataclass(frozen=True)
class Prompt:
    """A tokenised decoder prompt, kept in two parts so that user text can never move from one to the other.

    The backend builds both parts from separately tokenised texts (user text is tokenised with its
    special-token look-alikes kept as text), so an instruction holding the text ``"[SEP]"`` stays in the
    instruction part. The decoder reads ``instruction + query``.

    Attributes:
        instruction: ids of everything before the query: the backend's framing, the system and task
            instructions (shared by every query with the same instructions).
        query: ids of the query and whatever follows it.
        query_cut: whether the query was longer than the query token limit (its end was not read).
    """

    instruction: tuple[int, ...]
    query: tuple[int, ...]
    query_cut: bool = False

    @property
    def ids(self) -> tuple[int, ...]:
        """The whole prompt, as the decoder reads it."""
        return self.instruction + self.query

    def __len__(self) -> int:
        return len(self.instruction) + len(self.query)


def cut_for_tokenizer(text: str, max_tokens: int, chars_per_token: int) -> str:
    """``text`` cut to a character bound that holds more than ``max_tokens`` tokens (nothing tokenised yet).

    A token covers at most ``chars_per_token`` characters, so the first ``max_tokens + 1`` tokens of
    ``text`` lie inside its first ``(max_tokens + 1) * chars_per_token`` characters; the cut goes back to the
    last whitespace inside that bound (when there is one in the last token's span), so no word is split.
    Tokenising the cut text and keeping ``max_tokens`` tokens then gives the same ids as tokenising the whole
    text, for a fraction of the work on a huge input (an 8 MB query would otherwise hold the model's worker).
    """
    bound = (max_tokens + 1) * chars_per_token
    if len(text) <= bound:
        return text
    head = text[:bound]
    space = max(head.rfind(" ", bound - chars_per_token), head.rfind("\n", bound - chars_per_token))
    return head[:space] if space > 0 else head


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
        Computed when the backend is loaded (from what was loaded), never from files read later.
        """
        return self.weights_id

    @abstractmethod
    def tokenize_passages(self, passages: Sequence[str], max_tokens: int) -> list[list[int]]:
        """Encoder token ids of each passage (prefix added, no special tokens, cut to ``max_tokens``).

        Text that looks like a special token (``"[CLS]"``, ``"<bos>"``) is tokenised as text.
        """

    @abstractmethod
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder final hidden states ``(B, n, d)`` for right-padded ids ``(B, n)``."""

    @abstractmethod
    def prompt_ids(self, query: str, *, instruction: str, system_instruction: str, max_query_tokens: int) -> Prompt:
        """The decoder prompt for ``query``: user text tokenised as text, the query cut to ``max_query_tokens``."""

    @abstractmethod
    def margins(self, prompt: Prompt, passage_vectors: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
        """Yes/no margins ``(B,)`` in fp32 of one prompt against B passages.

        Args:
            prompt: the prompt (from :meth:`prompt_ids`), shared by every passage.
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

    #: A trained sentence readout (kalm-mini ships one); ``None``: sentences score their best window's weight.
    evidence_readout: SentenceReadout | None = None

    def passage_offsets_and_ids(
        self, passages: Sequence[str], max_tokens: int
    ) -> tuple[list[list[Offset]], list[list[int]] | None]:
        """:meth:`passage_offsets` and, where the backend gives them from the same tokenizer call, the token ids
        at those positions (default: none).
        """
        return self.passage_offsets(passages, max_tokens), None

    def sentence_columns(
        self,
        prompt: Prompt,
        sentences: Sequence[str],
        sentence_vectors: torch.Tensor,
        *,
        pieces: Sequence[Sequence[int]] | None = None,
        windows: SentenceWindows | None = None,
    ) -> dict[str, list[float]]:
        """The backend's own sentence features for its :attr:`evidence_readout` (feature name -> one value per
        sentence), from each sentence's text, pooled vector ``(S, d)``, token ids and windows (default: none).

        ``windows``, when given, holds the pooled window vectors ``(N, d)`` of the sentences' passages and the
        (sentence, window) pairs of the windows overlapping each sentence.
        """
        return {}

    def margins_and_window_weights(
        self, prompt: Prompt, passage_vectors: torch.Tensor, passage_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`margins` ``(B,)`` and, from the same pass, a relevance weight per passage window ``(B, W)``.

        The margins must equal :meth:`margins`' exactly (asking for evidence never changes a score); the
        weights are higher for windows that made the passage relevant (padding windows: any value).
        """
        raise EvidenceUnsupportedError(f"the {self.family} backend has no evidence readout")

    def prepare_prompts(self, prompts: Sequence[Prompt]) -> None:
        """Compute ahead, in one go, what the decoder calls over ``prompts`` will need (a hint; default: nothing).

        kalm-mini encodes the prompts' new queries in one encoder call here, so that a batch of many small
        requests pays one query-encoder call instead of one per request.
        """
        del prompts

    def margins_many(
        self,
        prompts: Sequence[Prompt],
        prompt_index: torch.Tensor,
        passage_vectors: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Yes/no margins ``(B,)`` fp32 of B rows, row ``b`` scoring ``prompts[prompt_index[b]]`` (one decoder call
        over several queries: what cross-request batching needs).

        Each margin equals :meth:`margins` of its prompt alone up to float rounding. This default calls
        :meth:`margins` once per prompt; the backends override it with one call over padded prompts.

        Args:
            prompts: the distinct prompts.
            prompt_index: ``(B,)`` long, the prompt of each row.
            passage_vectors: pooled passage vectors ``(B, W, d)`` in the model dtype.
            passage_mask: 1 for real windows ``(B, W)``.
        """
        out = torch.empty(passage_vectors.shape[0], dtype=torch.float32)
        for p, prompt in enumerate(prompts):
            rows = (prompt_index == p).nonzero().flatten()
            if len(rows):
                out[rows] = self.margins(prompt, passage_vectors[rows], passage_mask[rows]).float().cpu()
        return out
