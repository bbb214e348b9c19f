"""Warm-store reranking vs the official recipe on a Nano-shaped T5Gemma 2 checkpoint (random weights).

The official recipe runs, for every query: the encoder over all passages (one padded batch), MEP
pooling, and the decoder with full-vocabulary logits. The warm-store path reads pooled passages from
the store and runs only the decoder, reading two LM-head rows. Both are timed in the same run.

    python benchmarks/bench_engine.py --tokenizer ../shared/models/gemma3-tokenizer --passages 100
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from kalm_rag import Reranker
from kalm_rag.bench.checkpoints import copy_gemma_tokenizer, make_random_t5gemma2
from kalm_rag.bench.suite import make_passages, official_recipe
from kalm_rag.prompt import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_INSTRUCTION, format_prompt


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="Gemma 3 tokenizer folder (tokenizer.json[.gz])")
    parser.add_argument("--passages", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=256, help="passage length in tokens, prefix included")
    parser.add_argument("--ratio", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shape", default="nano")
    parser.add_argument("--workdir", default=None, help="where to build the checkpoint (default: a temp dir)")
    parser.add_argument("--out", default="docs/benchmarks/engine")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kalm-bench-"))
    ckpt = work / f"{args.shape}-random"
    if not (ckpt / "config.json").exists():
        tok_dir = copy_gemma_tokenizer(args.tokenizer, work / "tokenizer")
        make_random_t5gemma2(ckpt, tokenizer_dir=tok_dir, shape=args.shape, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSeq2SeqLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    query = "What is the effect of river water temperature on protein stability in cells?"
    passages = make_passages(tokenizer, args.passages, args.tokens)
    prompt_tokens = len(
        tokenizer(
            format_prompt(query, instruction=DEFAULT_INSTRUCTION, system_instruction=DEFAULT_SYSTEM_INSTRUCTION),
            add_special_tokens=False,
        )["input_ids"]
    )

    rr = Reranker.from_pretrained(ckpt, dtype="float32", ratio=args.ratio)
    start = time.perf_counter()
    rr.encode(passages)
    encode_s = time.perf_counter() - start
    warm_times, warm = timed(lambda: torch.tensor(rr.score(query, passages, return_margin=True)), args.repeats)
    official_times, official = timed(
        lambda: official_recipe(model, tokenizer, query, passages, args.ratio), args.repeats
    )
    max_diff = float((warm - official).abs().max())
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "shape": args.shape,
        "dtype": "float32",
        "passages": args.passages,
        "passage_tokens": args.tokens,
        "prompt_tokens": prompt_tokens,
        "ratio": args.ratio,
        "repeats": args.repeats,
        "pre_encode_s": encode_s,
        "warm_store_s": statistics.median(warm_times),
        "official_recipe_s": statistics.median(official_times),
        "speedup": statistics.median(official_times) / statistics.median(warm_times),
        "max_abs_margin_diff": max_diff,
        "warm_times": warm_times,
        "official_times": official_times,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = (
        f"| path | time per query ({args.passages} passages x {args.tokens} tokens, r={args.ratio}) |\n|---|---|\n"
        f"| official recipe (encoder + full logits) | {result['official_recipe_s']:.2f} s |\n"
        f"| kalm-rag, warm store | {result['warm_store_s']:.2f} s |\n"
        f"| **speed-up** | **{result['speedup']:.1f}x** |\n"
    )
    out.with_suffix(".md").write_text(
        f"# Engine: warm store vs official recipe\n\n{args.shape}-shaped T5Gemma 2, random weights, fp32, "
        f"prompt {prompt_tokens} tokens; {result['machine']}. Median of {args.repeats} runs; "
        f"pre-encoding took {encode_s:.1f} s once. Max |margin difference| {max_diff:.2e}.\n\n{table}"
    )
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_times")}, indent=2))


if __name__ == "__main__":
    main()
