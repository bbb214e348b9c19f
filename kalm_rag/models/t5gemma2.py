"""KaLM-Reranker-V1 (T5Gemma 2) backend: loads official checkpoints through transformers.

Follows ``transformers/models/t5gemma2/modeling_t5gemma2.py`` and the official KaLM recipe:
- passage side: ``"<Document>: " + passage``, no special tokens, right padding, the encoder's final
  (normed) hidden states; pooling happens in the engine (``kalm_rag.pooling``);
- query side: the decoder reads the prompt and, in every layer, attends to its own tokens (causal,
  RoPE) and to the pooled passage vectors (T5Gemma 2 "merged attention", no RoPE on passages);
- score: margin = z_yes - z_no at the last real position. Only the two LM-head rows are used:
  the 262k-row projection of every position is never computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kalm_rag.errors import ModelLoadError
from kalm_rag.models.base import FBNLBackend
from kalm_rag.prompt import format_passage, format_prompt, truncate_query

MODEL_TYPE = "t5gemma2"
_HASH_EDGE_BYTES = 1 << 20  # bytes hashed at each end of a weight file (with its size) for its identity


class T5Gemma2Backend(FBNLBackend):
    """A loaded ``T5Gemma2ForConditionalGeneration`` used as an FBNL reranker.

    Args:
        model: the seq2seq model (eval mode, on its device and dtype).
        tokenizer: its tokenizer; ``yes`` and ``no`` must each be one token.
        weights_id: content-derived identity of the weights (see :func:`weights_identity`).
    """

    family = MODEL_TYPE

    def __init__(self, model: Any, tokenizer: Any, *, weights_id: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.weights_id = weights_id
        decoder_config = model.config.decoder
        self.hidden_size = int(decoder_config.hidden_size)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pad_token_id = _pad_id(tokenizer)
        self.yes_id = single_token_id(tokenizer, "yes")
        self.no_id = single_token_id(tokenizer, "no")
        self.final_logit_softcapping = decoder_config.final_logit_softcapping
        # The two LM-head rows the score needs, in fp32: (2, d)
        head = model.get_output_embeddings()
        rows = head.weight[[self.yes_id, self.no_id]].detach().to(torch.float32)
        bias = getattr(head, "bias", None)
        self._yes_no_rows = rows
        self._yes_no_bias = None if bias is None else bias[[self.yes_id, self.no_id]].detach().float()
        self._encoder = model.get_encoder()
        self._decoder = model.get_decoder()

    # ----- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str], *, device: torch.device, dtype: torch.dtype
    ) -> "T5Gemma2Backend":
        """Load a checkpoint from a local directory or a hub id, refusing anything but ``t5gemma2``."""
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

        source = str(name_or_path)
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as exc:  # transformers raises OSError/ValueError/... depending on the cause
            raise ModelLoadError(f"cannot read a model config from {source!r}: {exc}") from exc
        if getattr(config, "model_type", None) != MODEL_TYPE:
            raise ModelLoadError(
                f"{source!r} is a {getattr(config, 'model_type', 'unknown')!r} checkpoint; "
                f"a KaLM-Reranker-V1 checkpoint has model_type {MODEL_TYPE!r}"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            with _quiet_transformers():
                model = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the checkpoint at {source!r}: {exc}") from exc
        model.to(device).eval()
        return cls(model, tokenizer, weights_id=weights_identity(source))

    # ----- passage side ----------------------------------------------------------------------------

    def tokenize_passages(self, passages: Sequence[str], max_tokens: int) -> list[list[int]]:
        texts = [format_passage(p) for p in passages]
        batch = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)
        return [list(ids) for ids in batch["input_ids"]]

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self._encoder(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state  # (B, n, d), after the encoder's final norm

    # ----- query side ------------------------------------------------------------------------------

    def prompt_ids(self, query: str, *, instruction: str, system_instruction: str, max_query_tokens: int) -> list[int]:
        query = truncate_query(self.tokenizer, query, max_query_tokens)
        text = format_prompt(query, instruction=instruction, system_instruction=system_instruction)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def margins(
        self,
        prompt_ids: torch.Tensor,
        prompt_lengths: torch.Tensor,
        passage_vectors: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        B, T = prompt_ids.shape
        prompt_ids = prompt_ids.to(self.device)
        positions = torch.arange(T, device=self.device)
        lengths = prompt_lengths.to(self.device)
        prompt_mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, T)
        hidden = self._decoder(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            encoder_hidden_states=passage_vectors.to(self.device, self.dtype),
            encoder_attention_mask=passage_mask.to(self.device),
            use_cache=False,
        ).last_hidden_state  # (B, T, d), after the decoder's final norm
        last = hidden[torch.arange(B, device=self.device), lengths - 1].float()  # (B, d)
        logits = last @ self._yes_no_rows.to(self.device).T  # (B, 2): z_yes, z_no
        if self._yes_no_bias is not None:
            logits = logits + self._yes_no_bias.to(self.device)
        if self.final_logit_softcapping is not None:
            cap = float(self.final_logit_softcapping)
            logits = torch.tanh(logits / cap) * cap
        return (logits[:, 0] - logits[:, 1]).cpu()  # (B,)


# ----- helpers -------------------------------------------------------------------------------------


def single_token_id(tokenizer: Any, word: str) -> int:
    """The id of ``word`` if the tokenizer encodes it as exactly one token, else ``ModelLoadError``."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ModelLoadError(
            f"the tokenizer encodes {word!r} as {len(ids)} tokens {ids}; an FBNL reranker needs "
            "'yes' and 'no' to be single tokens"
        )
    return int(ids[0])


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is None:
        raise ModelLoadError("the tokenizer has no pad token; T5Gemma 2 tokenizers define <pad>")
    return int(tokenizer.pad_token_id)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' weight-loading progress bar (the library is quiet by default)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def weights_identity(name_or_path: str) -> str:
    """A content-derived identity of a checkpoint's weights (for store namespaces).

    Hashes ``config.json`` and, for each weight file, its name, size and first and last MiB: cheap for
    multi-GB checkpoints, and any re-save or fine-tune changes it. A hub id is resolved to its local
    cached snapshot when there is one; otherwise the id itself (with its revision) is used.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(name_or_path), local_files_only=True))
        except Exception:
            return "hub:" + str(name_or_path)
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    weight_files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})
    for file in weight_files:
        size = file.stat().st_size
        digest.update(json.dumps([file.name, size]).encode())
        with file.open("rb") as fh:
            digest.update(fh.read(_HASH_EDGE_BYTES))
            if size > _HASH_EDGE_BYTES:
                fh.seek(max(size - _HASH_EDGE_BYTES, _HASH_EDGE_BYTES))
                digest.update(fh.read())
    return digest.hexdigest()[:32]
