"""Small random checkpoints for tests and benchmarks (no download needed); dev tooling, never imported by the engine.

``make_tiny_tokenizer`` trains a byte-level BPE tokenizer with the Gemma special tokens and
single-token ``yes``/``no``; ``make_random_t5gemma2`` writes a random ``T5Gemma2ForConditionalGeneration``
of a named shape (``tiny`` for tests, ``nano``/``small`` for benchmarks with the real Gemma 3 tokenizer).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]

_CORPUS = [
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
    'Note that the answer can only be "yes" or "no".',
    "<Instruct>: Given a query, retrieve documents that answer the query.",
    "<Query>: <Document>: user model",
    "The capital of France is Paris. Paris is a city on the Seine river in northern France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose in plants.",
    "The mitochondria is the powerhouse of the cell and produces most of its energy.",
    "Python is a programming language that lets you work quickly and integrate systems.",
    "A reranker scores query and passage pairs; the best passages come first.",
    "What is the tallest mountain on Earth? Mount Everest rises 8849 metres above sea level.",
    "yes",
    "no",
    "yes no",
    "Yes",
    "No",
]


def make_tiny_tokenizer(out_dir: str | Path, *, vocab_size: int = 512) -> Path:
    """Train and save a tiny byte-level BPE tokenizer with Gemma's special tokens; return its folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=GEMMA_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="right",
    )
    fast.save_pretrained(out)
    return out


def copy_gemma_tokenizer(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy the Gemma 3 tokenizer folder (gunzipping ``tokenizer.json.gz``) into ``out_dir``."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.name == "tokenizer.json.gz":
            with gzip.open(file, "rb") as fin, (out / "tokenizer.json").open("wb") as fout:
                shutil.copyfileobj(fin, fout)
        elif file.is_file():
            shutil.copy(file, out / file.name)
    return out


def text_config_for_shape(shape: str, vocab_size: int) -> dict[str, Any]:
    if shape == "tiny":
        return dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            # a small window so that sliding layers really slide over the ~60-token prompt
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    if shape == "nano":
        layers = 18
        hidden, inter, heads, kv, head_dim = 640, 2048, 4, 1, 256
    elif shape == "small":
        layers = 26
        hidden, inter, heads, kv, head_dim = 1152, 6912, 4, 1, 256
    else:
        raise ValueError(f"unknown shape {shape!r}; expected tiny, nano or small")
    return dict(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    )


def make_random_t5gemma2(
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    shape: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random ``T5Gemma2ForConditionalGeneration`` checkpoint with its tokenizer; return its folder.

    Args:
        out_dir: where to save the checkpoint.
        tokenizer_dir: a tokenizer folder to use (e.g. the Gemma 3 tokenizer); a tiny one is trained if None.
        shape: ``tiny`` (tests), ``nano`` or ``small`` (the official models' text shapes).
        seed: torch seed for the random weights.
        dtype: weights' dtype on disk.
    """
    import torch
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = AutoTokenizer.from_pretrained(make_tiny_tokenizer(out), trust_remote_code=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)  # data, never code
        tokenizer.save_pretrained(out)
    model = random_t5gemma2(tokenizer, shape=shape, seed=seed)
    from kalm_rag.models.t5gemma2 import _quiet_transformers

    with _quiet_transformers():
        model.to(getattr(torch, dtype)).save_pretrained(out)
    return out


def random_t5gemma2(
    tokenizer: Any, *, shape: str = "tiny", seed: int = 0, vocab_size: int | None = None, device: Any = "cpu"
) -> Any:
    """A random ``T5Gemma2ForConditionalGeneration`` (eval mode, fp32) built in memory on ``device``.

    Args:
        tokenizer: its tokenizer (special token ids; the vocabulary size unless ``vocab_size`` is given).
        shape: ``tiny``, ``nano`` or ``small``.
        seed: torch seed for the random weights.
        vocab_size: embedding rows (e.g. Gemma 3's 262,144 with a tiny tokenizer, so that the full-vocabulary
            logits of the official recipe cost what they cost with the real tokenizer).
        device: where to build it (building on a GPU is much faster than building on a CPU and moving).
    """
    import torch
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration

    if vocab_size is None:
        vocab_size = len(tokenizer)
        if shape == "tiny":
            vocab_size = ((vocab_size + 63) // 64) * 64
    text = text_config_for_shape(shape, vocab_size)
    special = dict(
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = T5Gemma2Config(
        encoder=dict(
            text_config={**text, **special},
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=vocab_size - 3,
            eoi_token_index=vocab_size - 2,
            image_token_index=vocab_size - 1,
        ),
        decoder={**text, **special},
        image_token_index=vocab_size - 1,
        **special,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = T5Gemma2ForConditionalGeneration(config).eval()
    _randomize_norms(model, seed)
    return model


def _randomize_norms(model: Any, seed: int) -> None:
    """Give RMSNorm scales and the eoi embedding random values (they start at zero).

    Zero norms would let a bug that skips a norm go unnoticed in parity tests.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
