"""Decode time of 100 stored passages per storage, next to a measured rerank call (from bench_storage.py JSON).

Decoding does not depend on the values, so each set's passages are stood in for by random 384-d vectors of
its mean length; the rerank call time is the one bench_storage.py measured on the set's real passages.

    OMP_NUM_THREADS=1 python benchmarks/bench_storage_decode.py storage.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
import time

import torch

from kalm_rag.store import MemoryStore, PooledPassage
from kalm_rag.store.codec import decode_entry, encode_entry
from kalm_rag.store.quantize import residual_bits, train_codebook

STORAGES = ["float32", "int8", "res4", "res2", "res1"]


def main() -> None:
    torch.set_num_threads(1)
    sets = []
    for path in sys.argv[1:]:
        with open(path) as fh:
            sets += json.load(fh)["sets"]
    sample = torch.randn(20000, 384)
    books = {b: train_codebook(sample, bits=b) for b in (4, 2, 1)}
    print("| set | base ratio | rerank call (100) | " + " | ".join(STORAGES) + " |")
    print("|" + "---|" * (len(STORAGES) + 3))
    for row in sets:
        for base in (1, 4):
            windows = max(1, round(row["tokens_per_passage"] / base))
            cells = []
            for storage in STORAGES:
                book = books.get(residual_bits(storage))
                blobs = {}
                for i in range(100):
                    entry = PooledPassage(
                        torch.randn(windows, 384), torch.full((windows,), base, dtype=torch.int32), base, storage, book
                    )
                    blobs[f"k{i}"] = encode_entry("ns", f"k{i}", entry)
                memory = MemoryStore(max_bytes="4GB")
                memory._entries.update({("ns", k): b for k, b in blobs.items()})  # the tier's own bytes
                best_disk = best_memory = float("inf")
                for _ in range(5):
                    t = time.perf_counter()
                    for k, b in blobs.items():
                        decode_entry(b, namespace="ns", key=k)  # SQLite/Redis reads: CRC and finiteness checked
                    best_disk = min(best_disk, time.perf_counter() - t)
                    t = time.perf_counter()
                    memory.get_many("ns", list(blobs))
                    best_memory = min(best_memory, time.perf_counter() - t)
                rerank = row[f"rerank100_s_b{base}"]
                cells.append(
                    f"{1000 * best_disk:.0f} / {1000 * best_memory:.0f} ms "
                    f"({100 * best_disk / rerank:.0f}% / {100 * best_memory / rerank:.0f}%)"
                )
            print(f"| {row['dataset']} | {base} | {rerank * 1000:.0f} ms | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
