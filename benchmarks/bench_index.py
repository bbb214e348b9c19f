"""Indexing benchmark: ``kalm_rag.index.index_corpus`` passages/s, local vs Ray (1 and 2 workers), SQLite vs Redis.

For each configuration the same corpus slice is indexed twice into a fresh store: once with ``--warmup`` rows
(the fixed cost: model load, Ray actors, store opening) and once with ``--limit`` rows. The report gives the
end-to-end rate of the full run (what ``kalm-rag index`` prints) and the marginal rate
``(limit - warmup) / (t_limit - t_warmup)``, the steady rate a long run tends to, used for the 10M-passage
estimate. Then the store's size per passage: the codec's entry bytes at each storage dtype (from the windows
of the indexed passages), the SQLite file and Redis ``used_memory`` growth per passage (float32).

    python benchmarks/bench_index.py ../shared/data/nfcorpus --limit 1000 --warmup 32

A local Ray is started once (``ray.init(num_cpus=--cpus)``) and shut down at the end; a throwaway
``redis-server`` is started on a free loopback port (when the binary is on PATH) and killed at the end.
Writes ``--out`` (JSON); ``docs/benchmarks/index.md`` is written by hand from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kalm_rag import Reranker
from kalm_rag.data import read_texts
from kalm_rag.index import index_corpus
from kalm_rag.store import open_store, passage_key
from kalm_rag.store.codec import entry_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import RedisProcess  # noqa: E402  (the throwaway redis-server of the store benchmark)

CONFIGS = {"local": ("local", 1), "ray1": ("ray", 1), "ray2": ("ray", 2)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def redis_used_memory(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])  # type: ignore[index]
    finally:
        client.close()


def run_one(args: argparse.Namespace, engine: str, workers: int, target: str, url_for: Any) -> dict[str, Any]:
    """Index ``--warmup`` then ``--limit`` rows into fresh stores; the two reports and the marginal rate."""
    out: dict[str, Any] = {"engine": engine, "workers": workers, "store": target}
    for key, limit in (("warmup", args.warmup), ("full", args.limit)):
        url = url_for(f"{engine}{workers}-{key}")
        before = redis_used_memory(url) if target == "redis" else 0
        report = index_corpus(
            args.corpus,
            model=args.model,
            store=url,
            engine=engine,
            workers=workers,
            batch_size=args.batch_size,
            limit=limit,
            show_progress_bar=False,
        )
        out[key] = report.to_dict()
        if key == "full":
            if target == "sqlite":
                out["store_bytes_per_passage"] = round(
                    Path(url.removeprefix("sqlite:///")).stat().st_size / report.encoded
                )
            else:
                out["store_bytes_per_passage"] = round((redis_used_memory(url) - before) / report.encoded)
        print(f"[bench] {engine} x{workers} -> {target} {key}: {out[key]}", file=sys.stderr, flush=True)
    dt = out["full"]["seconds"] - out["warmup"]["seconds"]
    dn = out["full"]["encoded"] - out["warmup"]["encoded"]
    out["marginal_passages_per_s"] = round(dn / dt, 2) if dt > 0 else None
    return out


def entry_bytes(args: argparse.Namespace, sqlite_url: str) -> dict[str, Any]:
    """Codec bytes per entry at each storage dtype, from the windows of the passages indexed (float32) in SQLite."""
    rr = Reranker.from_pretrained(args.model)
    store = open_store(sqlite_url)
    texts = [t for _, t in read_texts(args.corpus)][: args.limit]
    entries = [e for e in store.get_many(rr.namespace, [passage_key(t) for t in dict.fromkeys(texts)]) if e]
    store.close()
    windows = [e.num_windows for e in entries]
    dim = entries[0].vectors.shape[1]
    sizes = {name: sum(entry_size(w, dim, dt) for w in windows) / len(windows) for name, dt in DTYPES.items()}
    return {
        "passages": len(entries),
        "dim": dim,
        "ratio": entries[0].ratio,
        "mean_windows": round(sum(windows) / len(windows), 2),
        "mean_tokens": round(sum(e.num_tokens for e in entries) / len(entries), 1),
        "codec_bytes_per_entry": {k: round(v) for k, v in sizes.items()},
    }


def steady_rate(args: argparse.Namespace) -> dict[str, Any]:
    """Passages/s of ``Reranker.encode`` alone (model loaded, memory store) at 1 and 2 torch threads."""
    texts = list(dict.fromkeys(t for _, t in read_texts(args.corpus)))[: args.limit]
    out: dict[str, Any] = {"passages": len(texts)}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rr = Reranker.from_pretrained(args.model, store="memory://", batch_size=args.batch_size)
            start = time.monotonic()
            rr.encode(texts)
            out[f"threads_{threads}_passages_per_s"] = round(len(texts) / (time.monotonic() - start), 2)
            print(f"[bench] steady encode, {threads} threads: {out}", file=sys.stderr, flush=True)
            rr.close()
    finally:
        torch.set_num_threads(before)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="A corpus file or folder (e.g. ../shared/data/nfcorpus).")
    parser.add_argument("--model", default="kalm-mini")
    parser.add_argument("--limit", type=int, default=1000, help="Rows indexed per measured run.")
    parser.add_argument("--warmup", type=int, default=32, help="Rows of the fixed-cost run.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--configs", default="local,ray1,ray2", help=f"Among {', '.join(CONFIGS)}.")
    parser.add_argument("--stores", default="sqlite,redis", help="sqlite and/or redis.")
    parser.add_argument("--steady", action="store_true", help="Also time Reranker.encode alone at 1 and 2 threads.")
    parser.add_argument("--cpus", type=int, default=2, help="num_cpus of the local Ray.")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/index.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    redis_server = RedisProcess() if "redis" in args.stores.split(",") else None
    results: list[dict[str, Any]] = []
    ray_started = False
    try:
        db = {"n": 0}

        def url_for(target: str) -> Any:
            def make(name: str) -> str:
                db["n"] += 1
                if target == "sqlite":
                    return f"sqlite:///{work / f'{name}.db'}"
                assert redis_server is not None
                return redis_server.url.rsplit("/", 1)[0] + f"/{db['n'] % 16}"

            return make

        for config in args.configs.split(","):
            engine, workers = CONFIGS[config]
            if engine == "ray" and not ray_started:
                import ray

                ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
                ray_started = True
            for target in args.stores.split(","):
                results.append(run_one(args, engine, workers, target, url_for(target)))
        steady = steady_rate(args) if args.steady else {}
        sizes = entry_bytes(args, f"sqlite:///{work / 'local1-full.db'}") if "local" in args.configs else {}
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        "corpus": str(args.corpus),
        "model": args.model,
        "limit": args.limit,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": results,
        "sizes": sizes,
        "steady_encode": steady,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
