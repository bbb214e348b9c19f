"""Speed of kalm-mini vs the same-backbone cross-encoder: one query, 100 passages of ~256 tokens.

kalm-mini runs through ``Reranker.score`` with the passages pre-encoded in the store (query-time work
only: the decoder). The cross-encoder (all-MiniLM-L6-v2 reading query + passage, the architecture of
``kalm-rag train cross-encoder``; speed does not depend on its weights) must read all 100 pairs.

    python benchmarks/bench_mini.py --threads 2 --repeats 15 \\
        [--cross-encoder ~/.cache/kalm-rag/kalm-mini/runs/cross-encoder/best]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

WORDS = [
    "the",
    "study",
    "measured",
    "protein",
    "expression",
    "in",
    "tumour",
    "cells",
    "after",
    "treatment",
    "with",
    "a",
    "kinase",
    "inhibitor",
    "and",
    "found",
    "that",
    "survival",
    "improved",
    "in",
    "mice",
    "while",
    "side",
    "effects",
    "remained",
    "mild",
    "across",
    "all",
    "dose",
    "groups",
]


def passages(n: int, tokens: int, tokenizer) -> list[str]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(tokens)]
        text = f"passage {i}: " + " ".join(words)
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=tokens)["input_ids"]
        out.append(tokenizer.decode(ids[1:-1]))
    return out


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passages", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--model", default="kalm-mini", help="kalm-mini (embedded) or a kalm-mini checkpoint folder")
    ap.add_argument("--cross-encoder", default=None, help="checkpoint of kalm-rag train cross-encoder (optional)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kalm_rag import Reranker
    from kalm_rag.models.mini import MiniConfig
    from kalm_rag.models.mini.backend import load_encoder

    rr = Reranker.from_pretrained(args.model, device="cpu", dtype="float32", batch_size=args.passages)
    texts = passages(args.passages, args.tokens, rr.backend.tokenizer)
    n_tok = statistics.mean(len(x) for x in rr.backend.tokenize_passages(texts, 1024))
    query = "does the kinase inhibitor improve survival of mice with tumours?"
    t = time.perf_counter()
    rr.encode(texts)
    encode_s = time.perf_counter() - t
    results = {
        "model": args.model,
        "threads": args.threads,
        "passages": args.passages,
        "mean_passage_tokens": n_tok,
        "offline_encode_s": encode_s,
    }
    for r in (1, 4, 16):
        results[f"kalm-mini r={r} ms"] = median_ms(lambda r=r: rr.score(query, texts, ratio=r), args.repeats)
    assert rr.counters["encoded_passages"] == args.passages

    if args.cross_encoder:
        from kalm_rag.eval.rerankers import CrossEncoderReranker

        ce = CrossEncoderReranker(args.cross_encoder, batch_size=args.passages)
    else:
        from kalm_rag.eval.rerankers import CrossEncoderReranker

        ce = CrossEncoderReranker.__new__(CrossEncoderReranker)
        ce.bert, ce.tokenizer = load_encoder(MiniConfig(), device=torch.device("cpu"), dtype=torch.float32)
        ce.head = torch.nn.Linear(384, 1)
        ce.max_length, ce.batch_size = 320, args.passages
    results["cross-encoder ms"] = median_ms(lambda: ce(query, texts), max(3, args.repeats // 3))
    for r in (1, 4, 16):
        results[f"speed-up r={r}"] = results["cross-encoder ms"] / results[f"kalm-mini r={r} ms"]
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
