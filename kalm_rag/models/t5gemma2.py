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
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kalm_rag.errors import EvidenceUnsupportedError, ModelLoadError
from kalm_rag.evidence import Offset, passage_offsets_from_prefixed
from kalm_rag.models.base import FBNLBackend, Prompt
from kalm_rag.models.fingerprint import checkpoint_identity
from kalm_rag.models.sources import refuse_custom_code, resolve_checkpoint
from kalm_rag.padding import right_pad
from kalm_rag.prompt import PASSAGE_PREFIX, check_control_tokens, cut_query, format_passage, prompt_token_ids
from kalm_rag.threads import tokenizer_lock

MODEL_TYPE = "t5gemma2"


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
        check_control_tokens(tokenizer)
        #: The most characters one token covers: a huge query is cut to a character bound before tokenising.
        self.chars_per_token = max(map(len, tokenizer.get_vocab())) + 1
        # The two LM-head rows the score needs, in fp32: (2, d)
        head = model.get_output_embeddings()
        rows = head.weight[[self.yes_id, self.no_id]].detach().to(torch.float32)
        bias = getattr(head, "bias", None)
        self._yes_no_rows = rows
        self._yes_no_bias = None if bias is None else bias[[self.yes_id, self.no_id]].detach().float()
        self._encoder = model.get_encoder()
        self._decoder = model.get_decoder()
        #: Use the lean decoder forward (one prompt or several, see margins_many) when the config allows it.
        self.lean = LeanT5Gemma2Decoder.supports(decoder_config)
        self._lean = LeanT5Gemma2Decoder(self._decoder) if self.lean else None

    # ----- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str], *, device: torch.device, dtype: torch.dtype
    ) -> T5Gemma2Backend:
        """Load a checkpoint from a local folder or a hub id (offline first), refusing anything but ``t5gemma2``.

        The checkpoint is data only: ``trust_remote_code`` is always off, a config or tokenizer config that
        names code (``auto_map``) is refused before transformers reads it, and only safetensors weights are
        loaded (pickle files such as ``pytorch_model.bin`` can run code when loaded).

        Raises:
            ModelLoadError: not found, not a ``t5gemma2`` checkpoint, asks for its own code, has no safetensors
                weights, or transformers cannot load it.
        """
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

        folder = resolve_checkpoint(name_or_path)
        refuse_custom_code(folder)
        source = str(folder)
        safe: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
        try:
            config = AutoConfig.from_pretrained(source, **safe)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... depending on the cause
            raise ModelLoadError(f"cannot read a model config from {source!r}: {exc}") from exc
        if getattr(config, "model_type", None) != MODEL_TYPE:
            raise ModelLoadError(
                f"{source!r} is a {getattr(config, 'model_type', 'unknown')!r} checkpoint; "
                f"a KaLM-Reranker-V1 checkpoint has model_type {MODEL_TYPE!r}"
            )
        if not any(folder.glob("*.safetensors")):
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
            raise ModelLoadError(
                f"{source!r} has no safetensors weights"
                + (f" (only {', '.join(pickled[:3])}: pickle files, which can run code when loaded)" if pickled else "")
                + "; kalm-rag loads *.safetensors only"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **safe)
            with _quiet_transformers():
                model = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **safe)
        except Exception as exc:  # transformers raises OSError/ValueError/RuntimeError/... depending on the cause
            raise ModelLoadError(f"cannot load the checkpoint at {source!r}: {exc}") from exc
        model.to(device).eval()
        return cls(model, tokenizer, weights_id=weights_identity(folder))

    # ----- passage side ----------------------------------------------------------------------------

    def tokenize_passages(self, passages: Sequence[str], max_tokens: int) -> list[list[int]]:
        texts = [format_passage(p) for p in passages]
        with tokenizer_lock(self.tokenizer):
            batch = self.tokenizer(
                texts, add_special_tokens=False, truncation=True, max_length=max_tokens, split_special_tokens=True
            )
        return [list(ids) for ids in batch["input_ids"]]

    def passage_offsets(self, passages: Sequence[str], max_tokens: int) -> list[list[Offset]]:
        """Each encoder position's character span in its passage (``None`` for the prefix's tokens), for the
        same tokens as :meth:`tokenize_passages` (cut at ``max_tokens``).
        """
        texts = [format_passage(p) for p in passages]
        with tokenizer_lock(self.tokenizer):
            batch = self.tokenizer(
                texts,
                add_special_tokens=False,
                truncation=True,
                max_length=max_tokens,
                return_offsets_mapping=True,
                split_special_tokens=True,  # as tokenize_passages: user text never becomes control tokens
            )
        prefix = len(PASSAGE_PREFIX)
        return [
            passage_offsets_from_prefixed(offsets, prefix, len(p))
            for offsets, p in zip(batch["offset_mapping"], passages)
        ]

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self._encoder(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state  # (B, n, d), after the encoder's final norm

    # ----- query side ------------------------------------------------------------------------------

    def prompt_ids(self, query: str, *, instruction: str, system_instruction: str, max_query_tokens: int) -> Prompt:
        """The official template's ids (:func:`~kalm_rag.prompt.prompt_token_ids`): the query cut as the official
        recipe cuts it, special-token text in any user text kept as text.
        """
        query, cut = cut_query(self.tokenizer, query, max_query_tokens, chars_per_token=self.chars_per_token)
        head, rest = prompt_token_ids(
            self.tokenizer, query, instruction=instruction, system_instruction=system_instruction
        )
        return Prompt(tuple(head), tuple(rest), query_cut=cut)

    @torch.inference_mode()
    def margins(self, prompt: Prompt, passage_vectors: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(prompt.ids, dtype=torch.long, device=self.device)  # (T,)
        passage_vectors = passage_vectors.to(self.device, self.dtype)
        passage_mask = passage_mask.to(self.device)
        if self.lean and self._lean is not None:
            last = self._lean.last_hidden(ids, passage_vectors, passage_mask).float()  # (B, d)
        else:
            last = self._reference_last_hidden(ids, passage_vectors, passage_mask)
        return self._margin_from_hidden(last)

    @torch.inference_mode()
    def margins_many(
        self,
        prompts: Sequence[Prompt],
        prompt_index: torch.Tensor,
        passage_vectors: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Margins ``(B,)`` of rows scoring different prompts in one decoder call (see ``FBNLBackend.margins_many``).

        The prompts are right-padded to the longest: the decoder is causal, so a real position never reads
        the padding after its prompt's end, and each row's margin is read at its own prompt's last position.
        """
        if len(prompts) == 1:
            return self.margins(prompts[0], passage_vectors, passage_mask)
        ids, mask = right_pad([p.ids for p in prompts], self.pad_token_id, self.device)  # (P, T)
        rows = prompt_index.to(self.device)  # (B,)
        last_position = (mask.sum(dim=1) - 1)[rows]  # (B,)
        passage_vectors = passage_vectors.to(self.device, self.dtype)
        passage_mask = passage_mask.to(self.device)
        if self.lean and self._lean is not None:
            last = self._lean.last_hidden_many(ids, rows, last_position, passage_vectors, passage_mask).float()
        else:
            hidden = self._decoder(
                input_ids=ids[rows],
                attention_mask=mask[rows],
                encoder_hidden_states=passage_vectors,
                encoder_attention_mask=passage_mask,
                use_cache=False,
            ).last_hidden_state  # (B, T, d)
            last = hidden[torch.arange(len(rows), device=self.device), last_position].float()  # (B, d)
        return self._margin_from_hidden(last)

    @torch.inference_mode()
    def margins_and_window_weights(
        self, prompt: Prompt, passage_vectors: torch.Tensor, passage_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`margins` and, from the same pass, the training-free evidence readout ``(B, W)``: the last
        position's attention over the passage windows, averaged over heads and layers (windows sum to at
        most 1; the rest of the mass is on the prompt).
        """
        if not (self.lean and self._lean is not None):
            raise EvidenceUnsupportedError(
                "evidence needs the lean decoder path (no attention softcapping, GeGLU-tanh MLP); "
                "this T5Gemma 2 config does not support it"
            )
        ids = torch.as_tensor(prompt.ids, dtype=torch.long, device=self.device)  # (T,)
        probe: list[torch.Tensor] = []
        last = self._lean.last_hidden(
            ids, passage_vectors.to(self.device, self.dtype), passage_mask.to(self.device), probe
        ).float()  # (B, d)
        weights = torch.stack(probe).mean(dim=0)  # (L, B, W) -> (B, W)
        weights = weights.masked_fill(~passage_mask.to(self.device).bool(), 0.0)
        return self._margin_from_hidden(last), weights.cpu()

    def _reference_last_hidden(
        self, prompt: torch.Tensor, passage_vectors: torch.Tensor, passage_mask: torch.Tensor
    ) -> torch.Tensor:
        """Last-position states ``(B, d)`` through transformers' own decoder (the prompt ``(T,)`` in every row)."""
        B, T = passage_vectors.shape[0], prompt.shape[0]
        hidden = self._decoder(
            input_ids=prompt.expand(B, T),
            attention_mask=torch.ones((B, T), dtype=torch.long, device=self.device),
            encoder_hidden_states=passage_vectors,
            encoder_attention_mask=passage_mask,
            use_cache=False,
        ).last_hidden_state  # (B, T, d), after the decoder's final norm
        return hidden[:, -1].float()  # (B, d)

    def _margin_from_hidden(self, last: torch.Tensor) -> torch.Tensor:
        """z_yes - z_no from final-normed states ``(B, d)`` (fp32), with the checkpoint's softcapping."""
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
    with tokenizer_lock(tokenizer):
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


def weights_identity(folder: str | os.PathLike[str]) -> str:
    """A content-derived identity of a checkpoint (for store namespaces): every byte of its files.

    The sha256 of every config, tokenizer and safetensors file, whole, so that two checkpoints that differ
    anywhere get different identities (see :mod:`kalm_rag.models.fingerprint`; each file's digest is cached
    by size and modification time, so a multi-GB checkpoint is hashed once). A hub id is resolved to its
    cached snapshot (offline first, see :func:`~kalm_rag.models.sources.resolve_checkpoint`).

    Raises:
        ModelLoadError: the checkpoint cannot be found or read.
    """
    return checkpoint_identity(resolve_checkpoint(folder))


# ----- lean decoder: one prompt against B cached passages -----------------------------------------


class LeanT5Gemma2Decoder:
    """Inference-only T5Gemma 2 decoder forward for one prompt scored against ``B`` passages.

    Same arithmetic as ``T5Gemma2Decoder`` (embeddings and RoPE tables come from its modules), written
    for the reranking case:
    - q/k/v and gate/up projections are fused into single matmuls (the model's weights become views
      of the fused tensors, so nothing is duplicated); RMSNorm runs as one fused kernel in fp32;
    - the first layer's projections of the prompt are computed once: they do not depend on the passage;
    - masks are built once per call (one per layer type), as booleans for scaled-dot-product attention;
    - in the last layer only the last position's query, output projection and MLP are computed;
    - the final norm runs on the last position only, and the caller reads two LM-head rows.

    Args:
        decoder: a loaded ``T5Gemma2Decoder`` (eval mode).
    """

    def __init__(self, decoder: Any) -> None:
        config = decoder.config
        self.decoder = decoder
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.eps = config.rms_norm_eps
        self.layer_types = list(config.layer_types)
        self.sliding_window = config.sliding_window
        self.layers = [self._fuse(layer) for layer in decoder.layers]
        self.final_norm = _norm_scale(decoder.norm)

    @staticmethod
    def supports(config: Any) -> bool:
        """Whether the lean path reproduces this config exactly (no attention softcapping, GeGLU-tanh MLP)."""
        return config.attn_logit_softcapping is None and config.hidden_activation == "gelu_pytorch_tanh"

    @staticmethod
    @torch.no_grad()
    def _fuse(layer: Any) -> dict[str, torch.Tensor]:
        """Fuse q/k/v and gate/up weights; re-point the original modules at views of the fused tensors."""
        attn, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous()
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
        q_rows, k_rows = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        inter = mlp.gate_proj.weight.shape[0]
        attn.q_proj.weight = nn.Parameter(qkv[:q_rows], requires_grad=False)
        attn.k_proj.weight = nn.Parameter(qkv[q_rows : q_rows + k_rows], requires_grad=False)
        attn.v_proj.weight = nn.Parameter(qkv[q_rows + k_rows :], requires_grad=False)
        mlp.gate_proj.weight = nn.Parameter(gate_up[:inter], requires_grad=False)
        mlp.up_proj.weight = nn.Parameter(gate_up[inter:], requires_grad=False)
        return {
            "qkv": qkv,
            "kv": qkv[q_rows:],
            "o": attn.o_proj.weight,
            "gate_up": gate_up,
            "down": mlp.down_proj.weight,
            "q_norm": _norm_scale(attn.q_norm),
            "k_norm": _norm_scale(attn.k_norm),
            "pre_attn": _norm_scale(layer.pre_self_attn_layernorm),
            "post_attn": _norm_scale(layer.post_self_attn_layernorm),
            "pre_ff": _norm_scale(layer.pre_feedforward_layernorm),
            "post_ff": _norm_scale(layer.post_feedforward_layernorm),
        }

    def _masks(self, T: int, passage_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean merged masks ``(B, 1, T, T + W)`` per layer type: causal (sliding) self part, passage part."""
        device = passage_mask.device
        q_idx = torch.arange(T, device=device).unsqueeze(1)  # (T, 1)
        kv_idx = torch.arange(T, device=device).unsqueeze(0)  # (1, T)
        causal = kv_idx <= q_idx  # (T, T)
        B, W = passage_mask.shape
        cross = passage_mask.bool()[:, None, None, :].expand(B, 1, T, W)  # (B, 1, T, W)
        masks = {}
        for layer_type in set(self.layer_types):
            self_part = causal
            if layer_type == "sliding_attention":
                self_part = causal & (kv_idx > q_idx - self.sliding_window)
            masks[layer_type] = torch.cat([self_part.expand(B, 1, T, T), cross], dim=-1)
        return masks

    @torch.inference_mode()
    def last_hidden(
        self,
        prompt_ids: torch.Tensor,
        passages: torch.Tensor,
        passage_mask: torch.Tensor,
        probe: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Final-normed decoder state at the prompt's last position for each passage.

        Args:
            prompt_ids: the prompt, shape ``(T,)``.
            passages: pooled passage vectors ``(B, W, d)`` in the model dtype.
            passage_mask: 1 for real windows ``(B, W)``.
            probe: if given, each layer appends the last position's head-averaged attention over the
                passage windows ``(B, W)`` to it (see :meth:`T5Gemma2Backend.margins_and_window_weights`).

        Returns:
            ``(B, d)`` hidden states (model dtype).
        """
        return self._forward(prompt_ids.unsqueeze(0), None, None, passages, passage_mask, probe)

    @torch.inference_mode()
    def last_hidden_many(
        self,
        prompt_ids: torch.Tensor,
        rows: torch.Tensor,
        last_position: torch.Tensor,
        passages: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`last_hidden` of several prompts at once: row ``b`` reads prompt ``rows[b]``.

        Args:
            prompt_ids: the distinct prompts, right-padded ``(P, T)``.
            rows: ``(B,)`` the prompt of each row.
            last_position: ``(B,)`` the last real position of each row's prompt.
            passages: pooled passage vectors ``(B, W, d)`` in the model dtype.
            passage_mask: 1 for real windows ``(B, W)``.

        Returns:
            ``(B, d)`` hidden states (model dtype).
        """
        return self._forward(prompt_ids, rows, last_position, passages, passage_mask)

    def _forward(
        self,
        prompt_ids: torch.Tensor,
        rows: torch.Tensor | None,
        last_position: torch.Tensor | None,
        passages: torch.Tensor,
        passage_mask: torch.Tensor,
        probe: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Prompts ``(P, T)`` (P = 1: shared by every row; else ``rows`` picks each row's) -> ``(B, d)``."""
        T = prompt_ids.shape[1]
        positions = torch.arange(T, device=prompt_ids.device).unsqueeze(0)  # (1, T)
        x = self.decoder.embed_tokens(prompt_ids)  # (P, T, d): per prompt until the first attention
        rope = {t: self.decoder.rotary_emb(x, positions, t) for t in set(self.layer_types)}  # (1, T, hd) each
        masks = self._masks(T, passage_mask)
        shape = (self.num_heads, self.num_kv_heads, self.head_dim)
        last = len(self.layers) - 1
        for i, (weights, layer_type) in enumerate(zip(self.layers, self.layer_types)):
            cos, sin = rope[layer_type]
            x = _lean_layer(
                x,
                passages,
                masks[layer_type],
                cos,
                sin,
                weights,
                shape,
                self.scaling,
                self.eps,
                i == last,
                probe,
                rows=rows if i == 0 else None,  # after the first layer every row has its own states
                last_position=last_position,
            )
        return _rms_norm(x[:, -1], self.final_norm, self.eps)  # (B, d)


def _norm_scale(norm: Any) -> torch.Tensor:
    """T5Gemma 2 RMSNorm scales by ``1 + weight``, in fp32."""
    return (1.0 + norm.weight.detach().float()).contiguous()


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 (as the model does: low-precision squares would lose range), cast back."""
    return F.rms_norm(x.float(), (x.shape[-1],), scale, eps).to(x.dtype)


def _lean_layer(
    x: torch.Tensor,
    passages: torch.Tensor,
    mask: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    w: dict[str, torch.Tensor],
    shape: tuple[int, int, int],
    scaling: float,
    eps: float,
    last: bool,
    probe: list[torch.Tensor] | None = None,
    *,
    rows: torch.Tensor | None = None,
    last_position: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoder layer: merged attention over [prompt; passages], then the GeGLU MLP.

    Args:
        x: prompt states ``(Bx, T, d)``; before the first attention ``Bx`` is the number of distinct prompts
            (1: shared by every row), else ``B``.
        passages: pooled passage vectors ``(B, W, d)``.
        mask: boolean merged mask ``(B, 1, T, T + W)``.
        cos: RoPE cosine table ``(1, T, hd)``.
        sin: RoPE sine table ``(1, T, hd)``.
        w: the layer's fused weights and norm scales.
        shape: ``(H, Hkv, hd)``.
        scaling: attention scale.
        eps: RMSNorm epsilon.
        last: only the last position's output is needed.
        probe: if given, the last position's attention over the passage windows, averaged over heads
            ``(B, W)`` fp32, is appended to it (the evidence readout; the layer's output is unchanged).
        rows: ``(B,)`` the prompt of each row when ``x`` holds several distinct prompts.
        last_position: ``(B,)`` each row's last real position (prompts right-padded); ``None``: position ``T-1``.

    Returns:
        ``(B, T, d)``, or ``(B, 1, d)`` when ``last``.
    """
    H, Hkv, hd = shape
    Bx, T, _ = x.shape
    B, W, _ = passages.shape
    h = _rms_norm(x, w["pre_attn"], eps)
    qkv = h @ w["qkv"].T  # (Bx, T, (H + 2 Hkv) hd)
    q = qkv[..., : H * hd].view(Bx, T, H, hd)
    k = qkv[..., H * hd : (H + Hkv) * hd].view(Bx, T, Hkv, hd)
    v = qkv[..., (H + Hkv) * hd :].view(Bx, T, Hkv, hd).transpose(1, 2)  # (Bx, Hkv, T, hd)
    q = _rms_norm(q, w["q_norm"], eps).transpose(1, 2)  # (Bx, H, T, hd)
    k = _rms_norm(k, w["k_norm"], eps).transpose(1, 2)  # (Bx, Hkv, T, hd)
    q, k = _apply_rope(q, k, cos, sin)
    if rows is not None:  # several prompts: each row takes its prompt's states (computed once per prompt)
        q, k, v, x = q[rows], k[rows], v[rows], x[rows]

    pkv = passages @ w["kv"].T  # (B, W, 2 Hkv hd): passages get the k/v projections and k-norm, no RoPE
    pk = _rms_norm(pkv[..., : Hkv * hd].view(B, W, Hkv, hd), w["k_norm"], eps).transpose(1, 2)  # (B, Hkv, W, hd)
    pv = pkv[..., Hkv * hd :].view(B, W, Hkv, hd).transpose(1, 2)  # (B, Hkv, W, hd)
    keys = torch.cat([k.expand(B, -1, -1, -1), pk], dim=2)  # (B, Hkv, T + W, hd)
    values = torch.cat([v.expand(B, -1, -1, -1), pv], dim=2)
    if last and last_position is None:  # only the last position is read: skip the other queries' work
        q, mask, x = q[:, :, -1:], mask[:, :, -1:], x[:, -1:]
    elif last:  # each row's own last position
        assert last_position is not None
        at = torch.arange(B, device=x.device)
        x = x.expand(B, -1, -1)[at, last_position].unsqueeze(1)  # (B, 1, d)
        q = q.expand(B, -1, -1, -1)[at, :, last_position].unsqueeze(2)  # (B, H, 1, hd)
        mask = mask[at, :, last_position].unsqueeze(2)  # (B, 1, 1, T + W)
    q = q.expand(B, -1, -1, -1)
    Tq = q.shape[2]
    if probe is not None:
        probe.append(_last_position_passage_attention(q[:, :, -1:], keys, mask[:, :, -1:], scaling, T))
    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    attn = attn.transpose(1, 2).reshape(B, Tq, H * hd) @ w["o"].T  # (B, Tq, d)
    x = x + _rms_norm(attn, w["post_attn"], eps)  # broadcasts (1, T, d) -> (B, T, d) in the first layer

    h = _rms_norm(x, w["pre_ff"], eps)
    gate, up = (h @ w["gate_up"].T).chunk(2, dim=-1)  # (B, Tq, I) each
    mlp = F.gelu(gate, approximate="tanh") * up
    return x + _rms_norm(mlp @ w["down"].T, w["post_ff"], eps)


def _last_position_passage_attention(
    q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scaling: float, T: int
) -> torch.Tensor:
    """Attention probabilities of the last query ``(B, H, 1, hd)`` on the passage part of ``keys``
    ``(B, Hkv, T + W, hd)`` (merged mask ``(B, 1, 1, T + W)``), averaged over heads: ``(B, W)`` fp32.
    """
    H, Hkv = q.shape[1], keys.shape[1]
    k = keys.repeat_interleave(H // Hkv, dim=1)  # (B, H, T + W, hd): grouped key/value heads shared
    logits = (q.float() @ k.float().transpose(-1, -2)) * scaling  # (B, H, 1, T + W)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)  # (B, H, 1, T + W)
    return probs[:, :, 0, T:].mean(dim=1)  # (B, W)


def _apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding on ``(B, H, T, hd)`` queries/keys with ``(1, T, hd)`` cos/sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, T, hd)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
