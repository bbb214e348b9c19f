"""GPU check of the FBNL engine (issue 26): one command, JSON out, about 5 minutes on one H100.

Nano- and Small-shaped random T5Gemma 2 models in bf16 (the real Gemma 3 tokenizer when its folder is found,
else a tiny tokenizer with Gemma 3's vocabulary size): the official recipe vs the engine's lean decoder vs the
cascade at ~256 and ~1024 tokens with 100 passages per query, the service's batcher at concurrency 1/16/64
with batching on and off, and peak memory (see kalm_rag/bench/gpu.py).

    python benchmarks/gpu_check.py --out gpu_check.json [--tokenizer ../shared/models/gemma3-tokenizer] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kalm_rag.bench.gpu import GpuCheckConfig, run_gpu_check

#: Where the Gemma 3 tokenizer is looked for when --tokenizer is not given.
TOKENIZER_CANDIDATES = ("shared/models/gemma3-tokenizer", "../shared/models/gemma3-tokenizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here (it is printed too)")
    ap.add_argument("--tokenizer", default=None, help="the Gemma 3 tokenizer folder (default: shared/ if present)")
    ap.add_argument("--shapes", default="nano,small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quick", action="store_true", help="Nano only, fewer repeats (a smoke run)")
    args = ap.parse_args()
    tokenizer = args.tokenizer or next((c for c in TOKENIZER_CANDIDATES if Path(c).is_dir()), None)
    cfg = GpuCheckConfig(
        shapes=tuple(args.shapes.split(",")), device=args.device, dtype=args.dtype, tokenizer_dir=tokenizer
    )
    if args.quick:
        cfg.shapes, cfg.repeats, cfg.service_requests = ("nano",), 2, (8, 32, 64)
    result = run_gpu_check(cfg)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"done in {result['total_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
