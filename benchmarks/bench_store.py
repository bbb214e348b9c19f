"""Passage-store benchmark: bytes per passage, fetch latency at 100k entries, storage-dtype score error.

Sections (``--sections``, all by default):

- ``bytes``: encoded size of one Nano passage (``--tokens`` tokens, d=640) at ratios 1/4/16 for each
  storage dtype, checked against ``ceil(n/r) * d * itemsize + header``, plus what SQLite and Redis
  actually spend per entry.
- ``latency``: time to fetch ``--fetch`` random entries from a store holding ``--entries`` entries,
  for memory, SQLite, SQLite behind a memory tier, and Redis (a throwaway ``redis-server`` is started
  when ``--redis-url`` is not given and the binary is on PATH).
- ``error``: scores of a random Nano-shaped T5Gemma 2 checkpoint (real Gemma 3 tokenizer) with passages
  stored in bfloat16 / float16 vs float32, at several ratios.
- ``second-process``: a second Python process reranks what this one encoded into SQLite: encoder calls
  and score differences.

    python benchmarks/bench_store.py --tokenizer ../shared/models/gemma3-tokenizer \\
        --beir ../shared/data/scifact --work-dir ~/.cache/kalm-rag/bench-store

Writes ``docs/benchmarks/store.json`` and ``docs/benchmarks/store.md`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from kalm_rag.store import PassageStore, PooledPassage, open_store, passage_key
from kalm_rag.store.codec import HEADER_SIZE, encode_entry

NANO_DIM = 640
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NS = "bench:store"


# ----- helpers --------------------------------------------------------------------------------------


def mep_entry(n_tokens: int, ratio: int, dim: int, dtype: torch.dtype, seed: int = 0) -> PooledPassage:
    """A random entry shaped like ``n_tokens`` MEP-pooled at ``ratio``."""
    W = math.ceil(n_tokens / ratio)
    counts = torch.full((W,), ratio, dtype=torch.int32)
    counts[-1] = n_tokens - (W - 1) * ratio
    vectors = torch.randn(W, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return PooledPassage(vectors, counts, ratio)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class RedisProcess:
    """A throwaway ``redis-server`` on a free loopback port, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not on PATH")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_url(args: argparse.Namespace) -> tuple[str | None, RedisProcess | None]:
    if args.redis_url:
        return args.redis_url, None
    try:
        server = RedisProcess()
    except RuntimeError as exc:
        print(f"[bench] Redis skipped: {exc}", file=sys.stderr)
        return None, None
    return server.url, server


# ----- bytes ----------------------------------------------------------------------------------------


def bench_bytes(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Encoded size per passage for each ratio x dtype, and the real cost per entry in SQLite / Redis."""
    rows = []
    url, server = redis_url(args)
    for ratio in (1, 4, 16):
        for name, dtype in DTYPES.items():
            entry = mep_entry(args.tokens, ratio, NANO_DIM, dtype)
            blob = encode_entry(NS, passage_key("x"), entry)
            itemsize = torch.empty((), dtype=dtype).element_size()
            payload = math.ceil(args.tokens / ratio) * NANO_DIM * itemsize
            row = {
                "ratio": ratio,
                "dtype": name,
                "windows": entry.num_windows,
                "payload_bytes": payload,
                "encoded_bytes": len(blob),
                "header_bytes": len(blob) - payload,
                "matches_formula": len(blob) == payload + HEADER_SIZE,
            }
            row["sqlite_bytes_per_entry"] = sqlite_bytes_per_entry(work, entry, n=64)
            if url is not None:
                row["redis_bytes_per_entry"] = redis_bytes_per_entry(url, entry)
            rows.append(row)
            print(
                f"[bytes] r={ratio:2d} {name:9s} {len(blob):>9,d} B "
                f"(payload {payload:,d} + header {len(blob) - payload})",
                file=sys.stderr,
            )
    if server is not None:
        server.stop()
    return {"tokens": args.tokens, "dim": NANO_DIM, "header_bytes": HEADER_SIZE, "rows": rows}


def sqlite_bytes_per_entry(work: Path, entry: PooledPassage, *, n: int) -> float:
    """File growth per entry (WAL checkpointed) when ``n`` such entries are stored."""
    path = work / "bytes.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    store = open_store(f"sqlite:///{path}")
    store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    empty = path.stat().st_size
    for start in range(0, n, 16):
        store.put_many(NS, {f"k{i}": entry for i in range(start, start + 16)})
    store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    store.close()
    return (size - empty) / n


def redis_bytes_per_entry(url: str, entry: PooledPassage) -> int:
    """``MEMORY USAGE`` of one entry's key in Redis."""
    store = open_store(url)
    store.put_many(NS, {"probe": entry})
    used = store._client.memory_usage(store._entry_key(NS, "probe"), samples=0)
    store.clear(NS)
    store.close()
    return int(used)


# ----- latency --------------------------------------------------------------------------------------


def bench_latency(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Fetch ``--fetch`` random keys from stores of ``--entries`` entries; median and p95 per backend."""
    n, W = args.entries, args.latency_windows
    dtype = DTYPES[args.latency_dtype]
    keys = [passage_key(f"passage {i}") for i in range(n)]
    # a few distinct entries reused: filling 100k distinct random tensors would dominate the run
    templates = [mep_entry(W * 4, 4, NANO_DIM, dtype, seed=s) for s in range(16)]
    url, server = redis_url(args)
    backends: dict[str, str] = {
        "memory": f"memory://?max_bytes={(n + 1000) * templates[0].nbytes}",
        "sqlite": f"sqlite:///{work}/latency.db",
        "sqlite+memory_tier": f"sqlite:///{work}/latency.db?memory_tier={(n + 1000) * templates[0].nbytes}",
    }
    if url is not None:
        backends["redis"] = url
    results = []
    for name, store_url in backends.items():
        if name == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{work}/latency.db{suffix}").unlink(missing_ok=True)
        store = open_store(store_url)
        t0 = time.perf_counter()
        if name != "sqlite+memory_tier":  # the tier's backend is the file just filled
            fill(store, keys, templates)
        fill_s = time.perf_counter() - t0
        if name == "sqlite+memory_tier":  # warm the tier as a long-running process would have
            for start in range(0, n, 1000):
                store.get_many(NS, keys[start : start + 1000])
        rng = random.Random(0)
        times = []
        for _ in range(args.repeats):
            batch = rng.sample(keys, args.fetch)
            t = time.perf_counter()
            got = store.get_many(NS, batch)
            times.append(time.perf_counter() - t)
            assert all(e is not None for e in got), f"{name}: missing entries"
        t = time.perf_counter()
        stats = store.stats()
        stats_s = time.perf_counter() - t
        row = {
            "backend": name,
            "entries": stats["entries"],
            "fill_seconds": round(fill_s, 2),
            "stats_ms": round(stats_s * 1000, 1),
            "median_ms": round(statistics.median(times) * 1000, 3),
            "p95_ms": round(percentile(times, 0.95) * 1000, 3),
            "min_ms": round(min(times) * 1000, 3),
        }
        results.append(row)
        print(
            f"[latency] {name:20s} median {row['median_ms']:.2f} ms  p95 {row['p95_ms']:.2f} ms "
            f"(fill {fill_s:.1f}s, {stats['entries']:,d} entries)",
            file=sys.stderr,
        )
        if name == "redis":
            store.clear()
        store.close()
        del store
    if server is not None:
        server.stop()
    entry_bytes = len(encode_entry(NS, keys[0], templates[0]))
    return {
        "entries": n,
        "fetch": args.fetch,
        "repeats": args.repeats,
        "windows": W,
        "dim": NANO_DIM,
        "dtype": args.latency_dtype,
        "entry_bytes": entry_bytes,
        "rows": results,
        "note": "warm OS page cache; one process, one thread; includes decoding and checksum verification",
    }


def fill(store: PassageStore, keys: list[str], templates: list[PooledPassage]) -> None:
    for start in range(0, len(keys), 1000):
        store.put_many(
            NS, {k: templates[(start + i) % len(templates)] for i, k in enumerate(keys[start : start + 1000])}
        )


# ----- score error of the storage dtype -------------------------------------------------------------


def nano_checkpoint(args: argparse.Namespace, work: Path) -> Path:
    """The random Nano-shaped checkpoint, built once into ``--work-dir`` and reused."""
    from kalm_rag.bench.checkpoints import copy_gemma_tokenizer, make_random_t5gemma2

    out = work / "nano"
    if not (out / "config.json").exists():
        t0 = time.perf_counter()
        tok = copy_gemma_tokenizer(args.tokenizer, work / "gemma-tokenizer")
        make_random_t5gemma2(out, tokenizer_dir=tok, shape="nano", seed=0)
        print(f"[nano] built the random Nano checkpoint in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return out


def texts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``--queries`` queries and ``--passages`` passages: from a BEIR folder, else generated."""
    if args.beir:
        beir = Path(args.beir)
        with gzip.open(beir / "corpus.jsonl.gz", "rt") as f:
            docs = [json.loads(line) for _, line in zip(range(args.passages), f)]
        with gzip.open(beir / "queries.jsonl.gz", "rt") as f:
            queries = [json.loads(line)["text"] for _, line in zip(range(args.queries), f)]
        return queries, [f"{d.get('title', '')}. {d['text']}".strip(". ") for d in docs]
    words = [
        "cells",
        "protein",
        "energy",
        "river",
        "city",
        "light",
        "plant",
        "mountain",
        "language",
        "model",
        "tumour",
        "survival",
    ]
    passages = [" ".join(words[(i * 5 + j) % len(words)] for j in range(40 + 10 * i)) for i in range(args.passages)]
    queries = [f"what does the {w} do?" for w in words[: args.queries]]
    return queries, passages


def bench_error(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """|score(dtype storage) - score(fp32 storage)| on the random Nano checkpoint, per ratio."""
    from kalm_rag import Reranker
    from kalm_rag.store import MemoryStore

    ckpt = nano_checkpoint(args, work)
    queries, passages = texts(args)
    fp32 = Reranker.from_pretrained(ckpt, device="cpu", dtype="float32", show_progress_bar=False)
    fp32.encode(passages)
    keys = [passage_key(p) for p in passages]
    entries = fp32.store.get_many(fp32.namespace, keys)
    max_abs = max(float(e.vectors.abs().max()) for e in entries)
    n_tokens = [e.num_tokens for e in entries]
    variants = {}
    for name in ("bfloat16", "float16"):
        # the same fp32 encodings, rounded to the storage dtype, under a reranker sharing the backend
        store = MemoryStore()
        rr = Reranker(fp32.backend, store=store)
        store.put_many(
            rr.namespace,
            {k: PooledPassage(e.vectors.to(DTYPES[name]), e.counts, e.ratio) for k, e in zip(keys, entries)},
        )
        variants[name] = rr
    rows = []
    for ratio in args.ratios:
        ref_m = [fp32.score(q, passages, ratio=ratio, return_margin=True) for q in queries]
        for name, rr in variants.items():
            m = [rr.score(q, passages, ratio=ratio, return_margin=True) for q in queries]
            dm = [abs(a - b) for qa, qb in zip(ref_m, m) for a, b in zip(qa, qb)]
            ds = [abs(_sigmoid(a) - _sigmoid(b)) for qa, qb in zip(ref_m, m) for a, b in zip(qa, qb)]
            ref = [a for q in ref_m for a in q]
            rows.append(
                {
                    "ratio": ratio,
                    "dtype": name,
                    "max_abs_score_diff": max(ds),
                    "mean_abs_score_diff": statistics.mean(ds),
                    "max_abs_margin_diff": max(dm),
                    "mean_abs_margin_diff": statistics.mean(dm),
                    "fp32_margin_abs_mean": statistics.mean(abs(a) for a in ref),
                    "fp32_score_range": [_sigmoid(min(ref)), _sigmoid(max(ref))],
                }
            )
            print(
                f"[error] r={ratio:2d} {name:9s} max|dscore| {max(ds):.2e} max|dmargin| {max(dm):.2e}", file=sys.stderr
            )
        assert all(rr.counters["encoded_passages"] == 0 for rr in variants.values())
    return {
        "checkpoint": "random Nano-shaped T5Gemma 2 (seed 0), Gemma 3 tokenizer, fp32 compute",
        "queries": len(queries),
        "passages": len(passages),
        "passage_tokens_mean": statistics.mean(n_tokens),
        "max_abs_stored_value": max_abs,
        "float16_max": 65504.0,
        "rows": rows,
    }


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


SECOND = textwrap.dedent("""
    import json, sys, time
    from kalm_rag import Reranker

    t0 = time.perf_counter()
    rr = Reranker.from_pretrained(sys.argv[1], store=sys.argv[2], device="cpu", dtype="float32")
    load = time.perf_counter() - t0
    calls = []
    encode = rr.backend.encode
    rr.backend.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    queries, passages = json.loads(sys.argv[3]), json.loads(sys.argv[4])
    t0 = time.perf_counter()
    scores = [rr.score(q, passages) for q in queries]
    print(json.dumps({"scores": scores, "encoder_calls": len(calls), "load_s": load,
                      "score_s": time.perf_counter() - t0, "stats": rr.store.stats()}))
""")


def bench_second_process(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Encode + score here into SQLite; a fresh process scores the same pairs from the store."""
    from kalm_rag import Reranker

    ckpt = nano_checkpoint(args, work)
    queries, passages = texts(args)
    db = work / "second.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    rr = Reranker.from_pretrained(ckpt, store=url, device="cpu", dtype="float32", show_progress_bar=False)
    t0 = time.perf_counter()
    rr.encode(passages)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = [rr.score(q, passages) for q in queries]
    score_s = time.perf_counter() - t0
    rr.close()
    out = subprocess.run(
        [sys.executable, "-c", SECOND, str(ckpt), url, json.dumps(queries), json.dumps(passages)],
        capture_output=True,
        text=True,
        check=True,
    )
    second = json.loads(out.stdout.strip().splitlines()[-1])
    diff = max(abs(a - b) for qa, qb in zip(scores, second["scores"]) for a, b in zip(qa, qb))
    result = {
        "queries": len(queries),
        "passages": len(passages),
        "first_encode_s": round(encode_s, 2),
        "first_score_s": round(score_s, 2),
        "second_score_s": round(second["score_s"], 2),
        "second_encoder_calls": second["encoder_calls"],
        "max_abs_score_diff": diff,
        "second_store_hits": second["stats"]["hits"],
        "second_store_misses": second["stats"]["misses"],
    }
    print(f"[second-process] {result}", file=sys.stderr)
    return result


# ----- report ---------------------------------------------------------------------------------------


def _run_line(section: dict[str, Any]) -> list[str]:
    run = section.get("run")
    if not run:
        return []
    load = f" (1-minute load average at the end: {run['load_average_1min']})" if "load_average_1min" in run else ""
    return [f"Run {run['date']}{load}: `{run['command']}`", ""]


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# Passage-store benchmark",
        "",
        f"Generated by `benchmarks/bench_store.py` on {env['date']} ({env['machine']}, {env['cpus']} CPUs, "
        f"torch {env['torch']}, Python {env['python']}, SQLite {env['sqlite']}, "
        f"redis-server {env['redis_server']}).",
        "Each section names the command that produced it (sections can be rerun on their own).",
        "Timings depend on the machine and on what else runs on it: compare rows of one run, not runs.",
        "",
    ]
    if "bytes" in results:
        b = results["bytes"]
        lines += [
            f"## Bytes per passage ({b['tokens']} tokens, d = {b['dim']}, header {b['header_bytes']} B)",
            "",
            *_run_line(b),
            "| ratio | dtype | windows | payload ceil(n/r)·d·itemsize | encoded | = payload + header "
            "| SQLite file / entry | Redis MEMORY USAGE |",
            "|---:|---|---:|---:|---:|:-:|---:|---:|",
        ]
        for r in b["rows"]:
            in_redis = r.get("redis_bytes_per_entry")
            lines.append(
                f"| {r['ratio']} | {r['dtype']} | {r['windows']} | {r['payload_bytes']:,} | "
                f"{r['encoded_bytes']:,} | "
                f"{'yes' if r['matches_formula'] else '**NO**'} | {r['sqlite_bytes_per_entry']:,.0f} | "
                f"{'n/a' if in_redis is None else format(in_redis, ',')} |"
            )
        lines.append("")
    if "latency" in results:
        lat = results["latency"]
        lines += [
            f"## Fetch {lat['fetch']} random entries from {lat['entries']:,} ({lat['repeats']} draws)",
            "",
            *_run_line(lat),
            f"Each entry: {lat['windows']} windows x {lat['dim']} in {lat['dtype']} = {lat['entry_bytes']:,} B. "
            f"{lat['note']}.",
            "",
            "| backend | median ms | p95 ms | min ms | fill s | stats() ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in lat["rows"]:
            lines.append(
                f"| {r['backend']} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} | {r['min_ms']:.2f} | "
                f"{r['fill_seconds']:.1f} | {r.get('stats_ms', float('nan')):.1f} |"
            )
        lines.append("")
    if "error" in results:
        e = results["error"]
        lines += [
            "## Score error of the storage dtype vs float32 storage",
            "",
            *_run_line(e),
            f"{e['checkpoint']}; {e['queries']} queries x {e['passages']} passages "
            f"(mean {e['passage_tokens_mean']:.0f} tokens); "
            f"largest stored |value| {e['max_abs_stored_value']:.2f}.",
            "",
            "| ratio | storage | max abs score diff | mean abs score diff | max abs margin diff "
            "| mean abs fp32 margin |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for r in e["rows"]:
            lines.append(
                f"| {r['ratio']} | {r['dtype']} | {r['max_abs_score_diff']:.2e} | "
                f"{r['mean_abs_score_diff']:.2e} | "
                f"{r['max_abs_margin_diff']:.2e} | {r['fp32_margin_abs_mean']:.2f} |"
            )
        lines.append("")
    if "second_process" in results:
        s = results["second_process"]
        lines += [
            "## A second process reranking what the first encoded (SQLite, Nano shape)",
            "",
            *_run_line(s),
            f"{s['queries']} queries x {s['passages']} passages. First process: encode {s['first_encode_s']} s, "
            f"score {s['first_score_s']} s. Second process: score {s['second_score_s']} s with "
            f"**{s['second_encoder_calls']} encoder calls**, {s['second_store_hits']} store hits / "
            f"{s['second_store_misses']} misses, max |score difference| {s['max_abs_score_diff']:.1e}.",
            "",
        ]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import sqlite3

    redis_version = "n/a"
    if shutil.which("redis-server"):
        redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "redis_server": redis_version.removeprefix("v="),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sections",
        default="bytes,latency,error,second-process",
        help="comma-separated: bytes, latency, error, second-process",
    )
    ap.add_argument("--tokens", type=int, default=1024, help="passage tokens for the bytes section")
    ap.add_argument("--entries", type=int, default=100_000, help="entries in each store for the latency section")
    ap.add_argument("--fetch", type=int, default=100, help="entries per fetch")
    ap.add_argument("--repeats", type=int, default=200, help="fetches timed per backend")
    ap.add_argument("--latency-windows", type=int, default=16, help="windows per entry in the latency section")
    ap.add_argument("--latency-dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--redis-url", default=None, help="an existing Redis to use (default: start redis-server)")
    ap.add_argument("--tokenizer", default=None, help="Gemma 3 tokenizer folder (error and second-process sections)")
    ap.add_argument("--beir", default=None, help="a BEIR folder to take queries and passages from")
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--passages", type=int, default=20)
    ap.add_argument("--ratios", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--work-dir", default=None, help="scratch folder (databases, the Nano checkpoint; reused)")
    ap.add_argument("--out-dir", default="docs/benchmarks")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    needs_model = {"error", "second-process"} & set(sections)
    if needs_model and not args.tokenizer:
        ap.error(f"--tokenizer is required for the {sorted(needs_model)} section(s)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": environment()}
    previous = out / "store.json"
    if previous.exists():  # keep sections not rerun this time
        results = {**json.loads(previous.read_text()), "environment": results["environment"]}
    runners = {
        "bytes": bench_bytes,
        "latency": bench_latency,
        "error": bench_error,
        "second-process": bench_second_process,
    }
    for section in sections:
        result = runners[section](args, work)
        result["run"] = {
            "date": results["environment"]["date"],
            "command": results["environment"]["command"],
            "load_average_1min": round(os.getloadavg()[0], 2),
        }
        results[section.replace("-", "_")] = result
    (out / "store.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "store.md").write_text(markdown(results) + "\n")
    print(f"wrote {out / 'store.json'} and {out / 'store.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
