"""Single-request latency of kalm-mini at 1 and 2 intra-op threads, with and without an extra busy process.

One cached passage, a new query every call (the query encoder runs) and the same query every call (cached
query states): the median and p90 over ``--calls`` calls. "as found" is the machine as it is (on a shared
machine, whatever else runs); "+ busy" adds one process spinning on one core for the measurement.

    python benchmarks/bench_threads.py --out docs/benchmarks/threads.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import torch

from kalm_rag import Reranker
from kalm_rag.bench.suite import cpu_name

PASSAGE = ["Paris is the capital of France, a city on the river Seine with many museums and bridges."]


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x += i


def _latencies(rr: Reranker, calls: int, *, new_query: bool, tag: str) -> dict[str, float]:
    times = []
    for i in range(calls):
        query = f"What is the capital of France? ({tag} {i})" if new_query else "What is the capital of France?"
        t = time.perf_counter()
        rr.score(query, PASSAGE)
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median_ms": 1000 * statistics.median(times), "p90_ms": 1000 * times[int(0.9 * (len(times) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    rr = Reranker.from_pretrained("kalm-mini", device="cpu")
    rr.score("warm up", PASSAGE)
    out: dict = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, shared with other work", "results": {}}
    for load in ("as found", "+ busy"):
        stop = multiprocessing.Event()
        spinner = multiprocessing.Process(target=_spin, args=(stop,), daemon=True) if load == "+ busy" else None
        if spinner is not None:
            spinner.start()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                rr.score("warm up", PASSAGE)
                row = {
                    "new query": _latencies(rr, args.calls, new_query=True, tag=f"{load}{threads}"),
                    "same query": _latencies(rr, args.calls, new_query=False, tag=""),
                }
                out["results"][f"{load}, {threads} thread(s)"] = row
                print(load, threads, json.dumps(row), flush=True)
        finally:
            if spinner is not None:
                stop.set()
                spinner.join()
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
