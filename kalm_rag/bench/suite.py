"""Benchmark suite for the online path (``kalm-rag bench``).

Everything runs in one process on one machine, so the ratios compare like with like:
- warm-store scoring (prompt -> margins for N cached passages), its achieved GFLOP/s and the
  machine's measured matrix-product rate for the decoder's shapes, in fp32 and bf16;
- the official recipe (one padded batch, encoder every call, full-vocabulary logits);
- a same-size cross-encoder (a Gemma-3-270M-shaped causal model reading prompt + passage);
- latency against N, passage length and ratio; cascade reranking against single-pass reranking;
- pre-encoding throughput against the raw encoder forward; peak memory.
The checkpoints have random weights: speed does not depend on the values.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from kalm_rag import Reranker
from kalm_rag.bench.checkpoints import copy_gemma_tokenizer, make_random_t5gemma2, text_config_for_shape
from kalm_rag.errors import MissingDependencyError
from kalm_rag.pooling import mep_pool
from kalm_rag.prompt import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_INSTRUCTION, format_passage, format_prompt
from kalm_rag.store import MemoryStore

QUERY = "What is the effect of river water temperature on protein stability in cells?"
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "had",
    "not",
    "first",
    "one",
    "their",
    "its",
    "new",
    "after",
    "but",
    "who",
    "they",
    "has",
    "have",
    "been",
    "two",
    "her",
    "all",
    "other",
    "more",
    "also",
    "can",
    "into",
    "time",
    "year",
    "only",
    "city",
    "river",
    "water",
    "energy",
    "cell",
    "protein",
    "study",
    "patients",
    "results",
    "method",
    "data",
    "model",
    "system",
    "between",
    "during",
]


@dataclass
class BenchConfig:
    """What to run. Sizes default to the issue's (Nano shape, N=100, 256-token passages)."""

    tokenizer: Path | None  # a Gemma 3 tokenizer folder; None trains a tiny one (the tiny shape only)
    workdir: Path
    out_dir: Path
    shape: str = "nano"
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    n: int = 100
    tokens: int = 256
    ratio: int = 4
    n_official: int = 16
    long_tokens: int = 1024
    sweep_dtype: str = "bfloat16"
    n_sweep: tuple[int, ...] = (10, 30, 100, 300, 1000)
    length_sweep: tuple[int, ...] = (128, 256, 512, 1024)
    ratio_sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    repeats: int = 3
    threads: int | None = None
    batch_size: int = 32
    plots: bool = True  # needs matplotlib (the bench extra)
    log: Callable[[str], None] = print
    results: dict[str, Any] = field(default_factory=dict)


# ----- inputs and timing ---------------------------------------------------------------------------


def make_passages(tokenizer: Any, n: int, tokens: int, *, seed: int = 0) -> list[str]:
    """``n`` distinct passages whose encoder input is at most ``tokens`` tokens (prefix included)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [_WORDS[j] for j in torch.randint(len(_WORDS), (tokens,), generator=gen).tolist()]
        while True:
            text = f"Passage {i}: " + " ".join(words)
            extra = len(tokenizer(format_passage(text), add_special_tokens=False)["input_ids"]) - tokens
            if extra <= 0:
                break
            words = words[: -max(1, extra // 2)]
        out.append(text)
    return out


def median_time(fn: Callable[[], Any], repeats: int, *, warmup: bool = True) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (after one warm-up run)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- reference paths -----------------------------------------------------------------------------


@torch.inference_mode()
def official_recipe(
    model: Any, tokenizer: Any, query: str, passages: list[str], ratio: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """The official recipe: one padded batch, the encoder every call, MEP, decoder with full logits (on ``device``
    when given: the model's device; else the tensors stay on the CPU).
    """
    enc = tokenizer(
        [format_passage(p) for p in passages],
        add_special_tokens=False,
        padding=True,
        truncation=True,
        max_length=1024,
        return_tensors="pt",
    )
    if device is not None:
        enc = enc.to(device)
    states = model.get_encoder()(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    pooled, counts = mep_pool(states, enc.attention_mask, ratio)
    prompt = format_prompt(query, instruction=DEFAULT_INSTRUCTION, system_instruction=DEFAULT_SYSTEM_INSTRUCTION)
    dec = tokenizer([prompt] * len(passages), add_special_tokens=False, return_tensors="pt")
    if device is not None:
        dec = dec.to(device)
    logits = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=pooled),
        attention_mask=(counts > 0).long(),
        decoder_input_ids=dec.input_ids,
        use_cache=False,
    ).logits  # (N, T, V)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    return (logits[:, -1, yes] - logits[:, -1, no]).float()


def build_cross_encoder(shape: str, tokenizer: Any, dtype: torch.dtype) -> Any:
    """A random Gemma-3-shaped causal LM of the same size as the FBNL decoder (the LLM-reranker layout)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    text = text_config_for_shape(shape, len(tokenizer))
    config = Gemma3TextConfig(
        **text,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma3ForCausalLM(config).to(dtype).eval()  # type: ignore[arg-type]  # transformers types .to() oddly


@torch.inference_mode()
def cross_encoder_margins(model: Any, tokenizer: Any, query: str, passages: list[str], batch_size: int) -> torch.Tensor:
    """Cross-encoder scoring: prompt and passage read together; margin from two LM-head rows (no full logits)."""
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    rows = model.get_output_embeddings().weight[[yes, no]].float()  # (2, d)
    out = []
    for start in range(0, len(passages), batch_size):
        texts = [
            format_prompt(
                f"{query}\n<Document>: {p}",
                instruction=DEFAULT_INSTRUCTION,
                system_instruction=DEFAULT_SYSTEM_INSTRUCTION,
            )
            for p in passages[start : start + batch_size]
        ]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        hidden = model.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0]), enc.attention_mask.sum(1) - 1].float()
        logits = last @ rows.T
        out.append(logits[:, 0] - logits[:, 1])
    return torch.cat(out)


# ----- arithmetic ----------------------------------------------------------------------------------


def decoder_flops(model: Any, prompt_tokens: int, windows: int, n: int) -> dict[str, float]:
    """FLOPs of scoring ``n`` passages: the issue's formula and what the lean path executes.

    formula: 2 x decoder non-embedding parameters x prompt tokens x N + attention (QK and AV over T + W keys).
    executed: as run by the lean path: every layer projects q/k/v for all prompt tokens, the last layer
    runs the output projection and MLP for the last position only, plus the passages' k/v projections.
    """
    cfg = model.config.decoder
    d, H, Hkv, hd, inter, L = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
    )
    decoder = model.get_decoder()
    params = sum(p.numel() for name, p in decoder.named_parameters() if "embed_tokens" not in name)
    T, W = prompt_tokens, windows
    attention = 2 * 2 * H * hd * T * (T + W) * L * n
    formula = 2 * params * T * n + attention
    qkv = 2 * d * (H + 2 * Hkv) * hd
    o_mlp = 2 * H * hd * d + 2 * 3 * d * inter
    passage_kv = 2 * d * 2 * Hkv * hd * W
    executed = n * (L * (qkv * T + passage_kv) + (L - 1) * o_mlp * T + o_mlp) + attention
    return {"formula": float(formula), "executed": float(executed), "decoder_params": float(params)}


def matmul_rate(model: Any, rows: int, dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of plain matrix products with the decoder's shapes (qkv, o, gate/up, down) for ``rows`` tokens."""
    cfg = model.config.decoder
    d, inter = cfg.hidden_size, cfg.intermediate_size
    qkv_out = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    shapes = [(d, qkv_out), (cfg.num_attention_heads * cfg.head_dim, d), (d, 2 * inter), (inter, d)]
    mats = [(torch.randn(rows, k, dtype=dtype), torch.randn(k, m, dtype=dtype)) for k, m in shapes]
    flops = sum(2 * rows * k * m for k, m in shapes)

    def run() -> None:
        for a, b in mats:
            a @ b

    return flops / median_time(run, repeats) / 1e9


# ----- the suite -----------------------------------------------------------------------------------


def run_suite(cfg: BenchConfig) -> dict[str, Any]:
    """Run every measurement, write JSON, markdown and plots into ``cfg.out_dir``, return the results."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = _checkpoint(cfg)
    tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=False)
    res = cfg.results
    res["machine"] = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": cfg.shape,
    }
    passages = make_passages(tokenizer, max(cfg.n, cfg.n_official), cfg.tokens)
    prompt_tokens = len(
        tokenizer(
            format_prompt(QUERY, instruction=DEFAULT_INSTRUCTION, system_instruction=DEFAULT_SYSTEM_INSTRUCTION),
            add_special_tokens=False,
        )["input_ids"]
    )
    res["prompt_tokens"] = prompt_tokens
    for dtype_name in cfg.dtypes:
        dtype = getattr(torch, dtype_name)
        cfg.log(f"[{dtype_name}] loading")
        rr = Reranker.from_pretrained(
            ckpt, dtype=dtype_name, ratio=cfg.ratio, batch_size=cfg.batch_size, store=MemoryStore(max_bytes=8 << 30)
        )
        model = AutoModelForSeq2SeqLM.from_pretrained(
            ckpt, dtype=dtype, trust_remote_code=False, use_safetensors=True
        ).eval()
        res[dtype_name] = _dtype_block(cfg, rr, model, tokenizer, passages, prompt_tokens, dtype)
        res[dtype_name]["peak_rss_mib"] = peak_rss_mib()
        if dtype_name == cfg.sweep_dtype:
            res["sweeps"] = _sweeps(cfg, rr, tokenizer)
        del rr, model
    if "float32" in res and "bfloat16" in res:
        res["bf16_vs_fp32"] = dtype_error(res["float32"]["margins"], res["bfloat16"]["margins"])
        cfg.log(f"bf16 vs fp32 margins: {res['bf16_vs_fp32']}")
    _write(cfg, res)
    return res


def _dtype_block(
    cfg: BenchConfig,
    rr: Reranker,
    model: Any,
    tokenizer: Any,
    passages: list[str],
    prompt_tokens: int,
    dtype: torch.dtype,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    warm = passages[: cfg.n]
    # pre-encoding throughput vs the raw encoder forward over the same batches
    start = time.perf_counter()
    rr.encode(warm)
    out["encode_passages_per_s"] = len(warm) / (time.perf_counter() - start)
    out["raw_encoder_passages_per_s"] = len(warm) / _raw_encoder_time(model, tokenizer, warm, cfg.batch_size)
    cfg.log(f"  encode {out['encode_passages_per_s']:.1f}/s vs raw encoder {out['raw_encoder_passages_per_s']:.1f}/s")

    # efficiency of warm-store scoring at N
    t_warm = median_time(lambda: rr.score(QUERY, warm), cfg.repeats)
    windows = -(-cfg.tokens // cfg.ratio)
    flops = decoder_flops(model, prompt_tokens, windows, len(warm))
    rate = matmul_rate(model, prompt_tokens * cfg.batch_size, dtype, cfg.repeats)
    out.update(
        {
            "warm_n": len(warm),
            "warm_s": t_warm,
            "warm_ms_per_passage": 1e3 * t_warm / len(warm),
            "gflops_formula": flops["formula"] / t_warm / 1e9,
            "gflops_executed": flops["executed"] / t_warm / 1e9,
            "matmul_gflops": rate,
            "decoder_params": flops["decoder_params"],
        }
    )
    out["efficiency_formula"] = out["gflops_formula"] / rate
    out["efficiency_executed"] = out["gflops_executed"] / rate
    cfg.log(
        f"  warm N={len(warm)}: {t_warm:.2f}s, {out['gflops_executed']:.0f} GFLOP/s executed "
        f"({out['gflops_formula']:.0f} by formula) vs matmul {rate:.0f} -> {out['efficiency_executed']:.0%}"
    )

    # versus the official recipe, per query, at the short and the long passage length
    for tokens in (cfg.tokens, cfg.long_tokens):
        ps = make_passages(tokenizer, cfg.n_official, tokens, seed=tokens)
        rr.encode(ps)
        t_fbnl = median_time(partial(rr.score, QUERY, ps), cfg.repeats)
        t_off = median_time(
            partial(official_recipe, model, tokenizer, QUERY, ps, cfg.ratio), max(1, cfg.repeats - 1), warmup=False
        )
        got = torch.tensor(rr.score(QUERY, ps, return_margin=True))
        ref = official_recipe(model, tokenizer, QUERY, ps, cfg.ratio)
        out[f"official_{tokens}"] = {
            "n": len(ps),
            "warm_s": t_fbnl,
            "official_s": t_off,
            "speedup": t_off / t_fbnl,
            "max_abs_margin_diff": float((got - ref).abs().max()),
        }
        cfg.log(f"  vs official @{tokens} tokens, N={len(ps)}: {t_off:.2f}s / {t_fbnl:.2f}s = {t_off / t_fbnl:.1f}x")

    # versus a same-size cross-encoder reading prompt + passage
    ce = build_cross_encoder(cfg.shape, tokenizer, dtype)
    ps = passages[: cfg.n_official]
    t_ce = median_time(
        partial(cross_encoder_margins, ce, tokenizer, QUERY, ps, cfg.batch_size),
        max(1, cfg.repeats - 1),
        warmup=False,
    )
    t_fbnl = median_time(lambda: rr.score(QUERY, ps), cfg.repeats)
    out["cross_encoder"] = {"n": len(ps), "cross_encoder_s": t_ce, "warm_s": t_fbnl, "speedup": t_ce / t_fbnl}
    out["margins"] = rr.score(QUERY, warm, return_margin=True)  # for the bf16-vs-fp32 error
    cfg.log(f"  vs same-size cross-encoder, N={len(ps)}: {t_ce:.2f}s / {t_fbnl:.2f}s = {t_ce / t_fbnl:.1f}x")
    del ce

    # cascade (top-N at r=32, then top-20 at r=2) vs single pass at r=2 over N
    t_cascade = median_time(lambda: rr.rerank_cascade(QUERY, warm, stages=[(32, len(warm)), (2, 20)]), cfg.repeats)
    t_single = median_time(lambda: rr.rerank(QUERY, warm, ratio=2), cfg.repeats)
    out["cascade"] = {"n": len(warm), "cascade_s": t_cascade, "single_r2_s": t_single, "speedup": t_single / t_cascade}
    cfg.log(f"  cascade 32->2: {t_cascade:.2f}s vs single pass r=2 {t_single:.2f}s")
    return out


def dtype_error(reference: list[float], other: list[float]) -> dict[str, float]:
    """Margin error of ``other`` against ``reference`` (same passages): absolute, relative to the spread, ranks."""
    ref, oth = torch.tensor(reference), torch.tensor(other)
    diff = (ref - oth).abs()
    top10_ref = set(ref.argsort(descending=True)[:10].tolist())
    top10_oth = set(oth.argsort(descending=True)[:10].tolist())
    ranks = torch.stack([ref.argsort().argsort().float(), oth.argsort().argsort().float()])
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_abs_over_std": float(diff.max() / ref.std()),
        "spearman": float(torch.corrcoef(ranks)[0, 1]),
        "top10_overlap": len(top10_ref & top10_oth) / 10,
        "prob_max_abs": float((torch.sigmoid(ref) - torch.sigmoid(oth)).abs().max()),
    }


def _sweeps(cfg: BenchConfig, rr: Reranker, tokenizer: Any) -> dict[str, Any]:
    sweeps: dict[str, Any] = {"dtype": cfg.sweep_dtype, "n": [], "length": [], "ratio": []}
    pool = make_passages(tokenizer, max(cfg.n_sweep), cfg.tokens, seed=7)
    rr.encode(pool)
    for n in cfg.n_sweep:
        t = median_time(partial(rr.score, QUERY, pool[:n]), 1 if n >= 300 else cfg.repeats)
        sweeps["n"].append({"n": n, "s": t})
        cfg.log(f"  sweep N={n}: {t:.2f}s")
    for tokens in cfg.length_sweep:
        ps = make_passages(tokenizer, cfg.n, tokens, seed=100 + tokens)
        rr.encode(ps)
        t = median_time(partial(rr.score, QUERY, ps), cfg.repeats)
        sweeps["length"].append({"tokens": tokens, "s": t})
        cfg.log(f"  sweep length={tokens}: {t:.2f}s")
    for r in cfg.ratio_sweep:
        t = median_time(partial(rr.score, QUERY, pool[: cfg.n], ratio=r), cfg.repeats)
        sweeps["ratio"].append({"ratio": r, "s": t})
        cfg.log(f"  sweep ratio={r}: {t:.2f}s")
    return sweeps


@torch.inference_mode()
def _raw_encoder_time(model: Any, tokenizer: Any, passages: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(passages), batch_size):
        enc = tokenizer(
            [format_passage(p) for p in passages[i : i + batch_size]],
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        )
        model.get_encoder()(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    return time.perf_counter() - start


def _checkpoint(cfg: BenchConfig) -> Path:
    """The random checkpoint of ``cfg.shape`` in ``cfg.workdir``, built on first use.

    It is built in a temporary folder and renamed when complete; a failed build leaves nothing behind
    (not even ``cfg.workdir``, if this call created it).
    """
    ckpt = cfg.workdir / f"{cfg.shape}-random"
    if (ckpt / "config.json").exists():
        return ckpt
    if cfg.tokenizer is None and cfg.shape != "tiny":
        raise ValueError(f"the {cfg.shape} shape needs a tokenizer folder (the Gemma 3 tokenizer)")
    created = not cfg.workdir.exists()
    tmp = cfg.workdir / f".{cfg.shape}-random.partial"
    cfg.log(f"building a random {cfg.shape}-shaped checkpoint in {ckpt}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tok = None if cfg.tokenizer is None else copy_gemma_tokenizer(cfg.tokenizer, tmp / "tokenizer")
        make_random_t5gemma2(tmp / "model", tokenizer_dir=tok, shape=cfg.shape, seed=0)
        shutil.rmtree(ckpt, ignore_errors=True)
        (tmp / "model").rename(ckpt)
        shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(cfg.workdir if created else tmp, ignore_errors=True)
        raise
    return ckpt


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what platform knows), for benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----- reports -------------------------------------------------------------------------------------


def _write(cfg: BenchConfig, res: dict[str, Any]) -> None:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "bench.json").write_text(json.dumps(res, indent=1))
    (cfg.out_dir / "bench.md").write_text(render_markdown(cfg, res))
    if cfg.plots:
        _plots(cfg, res)


def render_markdown(cfg: BenchConfig, res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Online scoring benchmark (`kalm-rag bench`)",
        "",
        f"Machine: {m['cpu']}, {m['threads']} torch threads, torch {m['torch']}. Model: {m['shape']}-shaped "
        f"T5Gemma 2 with random weights; prompt {res['prompt_tokens']} tokens; MEP ratio {cfg.ratio}; "
        f"passages of {cfg.tokens} tokens unless stated; medians of {cfg.repeats} runs.",
        "",
        "| measure | " + " | ".join(cfg.dtypes) + " |",
        "|---|" + "---|" * len(cfg.dtypes),
    ]

    def row(label: str, fn: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(res[d]) for d in cfg.dtypes) + " |")

    row(
        f"warm store, N={cfg.n}: time per query",
        lambda b: f"{b['warm_s']:.2f} s ({b['warm_ms_per_passage']:.1f} ms/passage)",
    )
    row(
        "achieved GFLOP/s (executed / issue formula)",
        lambda b: f"{b['gflops_executed']:.0f} / {b['gflops_formula']:.0f}",
    )
    row("matrix-product rate, decoder shapes", lambda b: f"{b['matmul_gflops']:.0f} GFLOP/s")
    row(
        "**efficiency** (executed / formula)",
        lambda b: f"**{b['efficiency_executed']:.0%}** / {b['efficiency_formula']:.0%}",
    )
    for tokens in (cfg.tokens, cfg.long_tokens):
        row(
            f"official recipe vs warm, {tokens}-token passages (N={cfg.n_official})",
            partial(_official_cell, key=f"official_{tokens}"),
        )
        row(
            f"max abs margin diff vs official, {tokens} tokens",
            partial(_margin_diff_cell, key=f"official_{tokens}"),
        )
    row(
        f"same-size cross-encoder vs warm (N={cfg.n_official})",
        lambda b: (
            f"{b['cross_encoder']['cross_encoder_s']:.2f} s vs {b['cross_encoder']['warm_s']:.2f} s = "
            f"**{b['cross_encoder']['speedup']:.1f}x**"
        ),
    )
    row(
        "cascade (N at r=32, top-20 at r=2) vs single pass r=2",
        lambda b: (
            f"{b['cascade']['cascade_s']:.2f} s vs {b['cascade']['single_r2_s']:.2f} s = {b['cascade']['speedup']:.1f}x"
        ),
    )
    row(
        "pre-encoding vs raw encoder forward",
        lambda b: f"{b['encode_passages_per_s']:.1f} vs {b['raw_encoder_passages_per_s']:.1f} passages/s",
    )
    row("peak RSS after this block", lambda b: f"{b['peak_rss_mib']:.0f} MiB")
    if "bf16_vs_fp32" in res:
        e = res["bf16_vs_fp32"]
        lines += [
            "",
            f"bf16 vs fp32 on the same {cfg.n} passages: max |margin diff| {e['max_abs']:.3g} "
            f"(mean {e['mean_abs']:.3g}; {e['max_abs_over_std']:.2f} x the margins' std), max |P(yes) diff| "
            f"{e['prob_max_abs']:.3g}, Spearman {e['spearman']:.4f}, top-10 overlap {e['top10_overlap']:.0%}.",
        ]
    if "sweeps" in res:
        s = res["sweeps"]
        lines += [
            "",
            f"## Latency sweeps ({s['dtype']}, warm store)",
            "",
            "| N | " + " | ".join(str(x["n"]) for x in s["n"]) + " |",
            "|---|" + "---|" * len(s["n"]),
            "| s/query | " + " | ".join(f"{x['s']:.2f}" for x in s["n"]) + " |",
            "",
            f"| passage tokens (N={cfg.n}) | " + " | ".join(str(x["tokens"]) for x in s["length"]) + " |",
            "|---|" + "---|" * len(s["length"]),
            "| s/query | " + " | ".join(f"{x['s']:.2f}" for x in s["length"]) + " |",
            "",
            f"| ratio (N={cfg.n}) | " + " | ".join(str(x["ratio"]) for x in s["ratio"]) + " |",
            "|---|" + "---|" * len(s["ratio"]),
            "| s/query | " + " | ".join(f"{x['s']:.2f}" for x in s["ratio"]) + " |",
        ]
        if cfg.plots:
            lines += [
                "",
                "![latency vs N](latency_vs_n.png) ![latency vs length](latency_vs_length.png) "
                "![latency vs ratio](latency_vs_ratio.png) ![comparison](comparison.png)",
            ]
    return "\n".join(lines) + "\n"


def _official_cell(b: dict[str, Any], *, key: str) -> str:
    return f"{b[key]['official_s']:.2f} s vs {b[key]['warm_s']:.2f} s = **{b[key]['speedup']:.1f}x**"


def _margin_diff_cell(b: dict[str, Any], *, key: str) -> str:
    return f"{b[key]['max_abs_margin_diff']:.1e}"


def _plots(cfg: BenchConfig, res: dict[str, Any]) -> None:
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise MissingDependencyError('the benchmark plots need matplotlib: pip install "kalm-rag[bench]"') from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "sweeps" in res:
        s = res["sweeps"]
        for key, x_key, title, fname, logx in (
            ("n", "n", "passages per query (N)", "latency_vs_n.png", True),
            ("length", "tokens", "passage length (tokens)", "latency_vs_length.png", True),
            ("ratio", "ratio", "MEP ratio", "latency_vs_ratio.png", True),
        ):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot([p[x_key] for p in s[key]], [p["s"] for p in s[key]], marker="o")
            ax.set_xlabel(title)
            ax.set_ylabel("seconds per query")
            ax.set_title(f"warm-store scoring ({s['dtype']}, {res['machine']['threads']} threads)")
            if logx:
                ax.set_xscale("log", base=2 if key != "n" else 10)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(cfg.out_dir / fname, dpi=110)
            plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, values = [], []
    for d in cfg.dtypes:
        b = res[d]
        for name, v in (
            (f"FBNL warm\n{d}", b[f"official_{cfg.tokens}"]["warm_s"]),
            (f"official\n{d}", b[f"official_{cfg.tokens}"]["official_s"]),
            (f"cross-enc.\n{d}", b["cross_encoder"]["cross_encoder_s"]),
        ):
            labels.append(name)
            values.append(v)
    ax.bar(labels, values, color=["tab:green", "tab:red", "tab:orange"] * len(cfg.dtypes))
    ax.set_ylabel(f"seconds per query (N={cfg.n_official}, {cfg.tokens} tokens)")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(cfg.out_dir / "comparison.png", dpi=110)
    plt.close(fig)
