"""Storage codecs on the shared eval sets: nDCG@10, bytes per passage, encode and query overheads (kalm-mini).

Each set's candidates are encoded ONCE with kalm-mini at base ratio 1 in float32 (the exact reference); every
codec then quantises and decodes those vectors in memory (through the store's entry codec, so the bytes are
exactly what a store holds) and the same queries are rescored. Base ratio 4 entries are the exact re-pooling
of the ratio-1 vectors, quantised. Codebooks are trained per set on the first
``DEFAULT_TRAIN_PASSAGES`` passages, as ``kalm-rag index`` does.

    OMP_NUM_THREADS=1 nice python benchmarks/bench_storage.py /work/shared/data/{scifact,nfcorpus,...} \\
        --max-queries 30 --out /tmp/storage.json

Writes a JSON file after every set (a run can be read while it goes on).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kalm_rag.bench.suite import cpu_name
from kalm_rag.engine import Reranker
from kalm_rag.eval.run import load_eval_set, metrics
from kalm_rag.pooling import repool
from kalm_rag.store.base import PooledPassage, passage_key
from kalm_rag.store.codec import decode_entry, encode_entry
from kalm_rag.store.quantize import DEFAULT_TRAIN_PASSAGES, residual_bits, train_codebook

NS = "bench"
R4_CODECS = {1: ["float32", "bfloat16", "int8", "res4", "res2", "res1"], 4: ["int8", "res4", "res2", "res1"]}
R1_CODECS = ["float32", "int8", "res4"]


def compact(entries: dict[str, PooledPassage], storage: str, book) -> tuple[dict[str, bytes], float]:  # type: ignore[no-untyped-def]
    """Encoded blobs of ``entries`` in ``storage`` and the seconds it took."""
    t = time.perf_counter()
    blobs = {
        k: encode_entry(NS, k, PooledPassage(e.vectors, e.counts, e.ratio, storage=storage, codebook=book))
        for k, e in entries.items()
    }
    return blobs, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--max-queries", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rr1 = Reranker.from_pretrained("kalm-mini", base_ratio=1, storage_dtype="float32")
    rr4 = Reranker(rr1.backend, base_ratio=4, storage_dtype="float32")
    result: dict = {"machine": f"{cpu_name()}, {args.threads} torch thread(s), shared", "sets": []}
    for folder in args.datasets:
        es = load_eval_set(folder)
        qids = [q for q in es.ds.queries if q in es.candidates][: args.max_queries]
        docs = list(dict.fromkeys(d for q in qids for d in es.candidates[q]))
        texts = {d: es.ds.corpus[d] for d in docs}
        keys = {d: passage_key(t) for d, t in texts.items()}
        t0 = time.perf_counter()
        base1: dict[str, PooledPassage] = {}
        for start in range(0, len(docs), 64):
            chunk = [texts[d] for d in docs[start : start + 64]]
            for text, e in zip(chunk, rr1._pooled(chunk)):
                base1[passage_key(text)] = PooledPassage(e.vectors, e.counts, 1)
        encode_s = time.perf_counter() - t0
        base4 = {k: PooledPassage(*repool(e.vectors.float(), e.counts, 4), 4) for k, e in base1.items()}
        bases = {1: base1, 4: base4}
        sample_keys = [keys[d] for d in docs[:DEFAULT_TRAIN_PASSAGES]]
        row: dict = {"dataset": es.name, "queries": len(qids), "passages": len(docs), "encode_s": encode_s}
        row["tokens_per_passage"] = sum(e.num_tokens for e in base1.values()) / len(base1)
        configs = []
        for base, codecs in R4_CODECS.items():
            for storage in codecs:
                configs.append((base, storage, 4))
                if base == 1 and storage in R1_CODECS:
                    configs.append((base, storage, 1))
        blobs_cache: dict[tuple[int, str], dict[str, bytes]] = {}
        books = {}
        for base, storage in dict.fromkeys((b, s) for b, s, _ in configs):
            book = None
            if residual_bits(storage):
                sample = torch.cat([bases[base][k].vectors for k in sample_keys])
                t = time.perf_counter()
                book = train_codebook(sample, bits=residual_bits(storage))
                row[f"train_s_b{base}_{storage}"] = time.perf_counter() - t
                row[f"centroids_b{base}_{storage}"] = book.num_centroids
            books[(base, storage)] = book
            blobs, seconds = compact(bases[base], storage, book)
            blobs_cache[(base, storage)] = blobs
            row[f"bytes_b{base}_{storage}"] = sum(map(len, blobs.values())) / len(blobs)
            row[f"quantise_s_b{base}_{storage}"] = seconds
        scores: dict[str, dict[str, dict[str, float]]] = {}
        for base, storage, ratio in configs:
            rr = rr1 if base == 1 else rr4
            blobs = blobs_cache[(base, storage)]
            run: dict[str, dict[str, float]] = {}
            err = 0.0
            for q in qids:
                cand = es.candidates[q]
                entries = [decode_entry(blobs[keys[d]], namespace=NS, key=keys[d]) for d in cand]
                margins = rr._decode(
                    es.ds.queries[q],
                    entries,
                    instruction=rr.instruction,
                    system_instruction=rr.system_instruction,
                    ratio=ratio,
                )
                run[q] = {d: float(m) for d, m in zip(cand, margins)}
            label = f"b{base}_{storage}_r{ratio}"
            scores[label] = run
            ref = scores.get(f"b1_float32_r{ratio}")
            if ref is not None:
                err = max(abs(run[q][d] - ref[q][d]) for q in qids for d in run[q])
            qrels = {q: es.ds.qrels[q] for q in qids}
            row[f"ndcg_{label}"] = metrics(qrels, run)["ndcg@10"]
            row[f"maxerr_{label}"] = err
            print(es.name, label, round(row[f"ndcg_{label}"], 4), round(err, 4), flush=True)
        # query time: decoding 100 cached passages vs one rerank call over them (ratio 4)
        hundred = [keys[d] for d in es.candidates[qids[0]]][:100]
        query = es.ds.queries[qids[0]]
        entries = [base1[k] for k in hundred]
        t = time.perf_counter()
        for _ in range(3):
            rr1._decode(query, entries, instruction=rr1.instruction, system_instruction=rr1.system_instruction, ratio=4)
        row["rerank100_s_b1"] = (time.perf_counter() - t) / 3
        entries = [base4[k] for k in hundred]
        t = time.perf_counter()
        for _ in range(3):
            rr4._decode(query, entries, instruction=rr4.instruction, system_instruction=rr4.system_instruction, ratio=4)
        row["rerank100_s_b4"] = (time.perf_counter() - t) / 3
        for (base, storage), blobs in blobs_cache.items():
            t = time.perf_counter()
            for _ in range(3):
                for k in hundred:
                    decode_entry(blobs[k], namespace=NS, key=k)
            row[f"decode100_s_b{base}_{storage}"] = (time.perf_counter() - t) / 3
        result["sets"].append(row)
        args.out.write_text(json.dumps(result, indent=1))
        del base1, base4, bases, blobs_cache


if __name__ == "__main__":
    main()
