"""Max |margin error| of each storage on the T5Gemma2 test fixture (a tiny random checkpoint, no download).

The official checkpoints keep exact float32 storage by default; this measures what ``storage=`` costs in score
on the T5Gemma2 code path. Passages: the first ``--passages`` abstracts of a BEIR corpus (e.g. SciFact); the
codebook is trained on all of them (as ``Reranker.encode`` does for a new store).

    OMP_NUM_THREADS=1 python benchmarks/bench_storage_fixture.py /work/shared/data/scifact/corpus.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path

import torch

from kalm_rag import Reranker
from kalm_rag.bench.checkpoints import make_random_t5gemma2
from kalm_rag.store import MemoryStore

QUERIES = ["What causes the disease?", "How is the protein regulated?", "Which treatment works best?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--passages", type=int, default=60)
    parser.add_argument("--shape", default="tiny")
    args = parser.parse_args()
    torch.set_num_threads(1)
    texts = []
    with gzip.open(args.corpus, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            texts.append(f"{row.get('title', '')} {row['text']}".strip())
            if len(texts) == args.passages:
                break
    ckpt = make_random_t5gemma2(Path(tempfile.mkdtemp()) / "ckpt", shape=args.shape, seed=0)
    exact = Reranker.from_pretrained(ckpt, store=MemoryStore(max_bytes="4GB"), base_ratio=1, storage="float32")
    print(f"T5Gemma2 fixture ({args.shape}), {len(texts)} passages")
    reference = {r: [exact.score(q, texts, ratio=r, return_margin=True) for q in QUERIES] for r in (1, 4)}
    for storage in ("bfloat16", "int8", "res4", "res2", "res1"):
        rr = Reranker(exact.backend, store=MemoryStore(max_bytes="4GB"), base_ratio=1, storage=storage)
        rr.codebook_passages = len(texts)
        rr.encode(texts)
        row = [storage]
        for r in (1, 4):
            got = [rr.score(q, texts, ratio=r, return_margin=True) for q in QUERIES]
            err = max(abs(a - b) for g, ref in zip(got, reference[r]) for a, b in zip(g, ref))
            row.append(f"r={r}: {err:.4f}")
        spread = max(max(m) - min(m) for m in reference[4])
        print(" | ".join(row), f"| margin spread at r=4: {spread:.3f}", flush=True)


if __name__ == "__main__":
    main()
