"""kalm-rag serve under concurrent load: requests/s and latency, batching on and off, and a cross-encoder server.

Three servers, each its own process on a free 127.0.0.1 port with 1 uvicorn worker: (a) ``kalm-rag serve``
(kalm-mini) with dynamic batching (``--max-batch-passages 1600``: up to 16 requests per batch); (b) the same
with ``--no-batching``; (c) the same app (``create_app``, uvicorn, batcher) serving a same-backbone
cross-encoder: all-MiniLM-L6-v2 reading query + passage, a linear head on [CLS] (speed does not depend on its
weights; this script's ``--serve-cross-encoder`` mode). (a) and (b) run side by side and take turns at each
concurrency, so that the shared machine's drift hits both alike; (c) runs after them. A load generator in
this process (async httpx, loopback only) sends a bounded number of Cohere v2 requests at each concurrency;
each request has its own query and 100 passages of ~200 tokens drawn from a corpus that is in the store
before timing starts (warm store: SQLite with a memory tier). The cross-encoder's levels stop waiting after
``--ce-deadline`` seconds (unanswered requests count as slower than that; the server drops them).

    python benchmarks/bench_serve.py --out docs/benchmarks/serve.json [--threads 2] [--quick]

``--small`` measures the common RAG shape instead (issue 26): requests of 10 and 20 passages of ~200 tokens,
concurrency 1/4/16/64, (a) batching on (cross-request decoder calls) and (b) off, taking turns; requests/s,
p50/p95/p99 and rows per decoder call (from the servers' ``kalm_rag_decoder_*`` metrics):

    python benchmarks/bench_serve.py --small --threads 1 --out docs/benchmarks/serve_small.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import torch

from kalm_rag import EncodeReport, Reranker, ScoreRequest
from kalm_rag.bench.suite import cpu_name

CONCURRENCY = (1, 4, 16, 64)
_TEXT = (
    "the study measured protein expression in tumour cells after treatment with a kinase inhibitor and found "
    "that survival improved in mice while side effects remained mild across all dose groups river city capital "
    "mountain language program compiler network storage energy solar battery vaccine immune response climate "
    "ocean temperature rainfall harvest wheat market price inflation bank policy court ruling election vote "
    "school teacher student reading memory sleep exercise heart blood pressure diet sugar insulin gene mutation "
    "enzyme bacteria virus infection antibiotic resistance hospital patient trial placebo outcome risk factor"
)
VOCAB = tuple(_TEXT.split(" "))


def make_corpus(tokenizer, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` distinct passages of about ``tokens`` MiniLM tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(VOCAB) for _ in range(tokens)]
        ids = tokenizer(f"passage {i}: " + " ".join(words), truncation=True, max_length=tokens)["input_ids"]
        out.append(tokenizer.decode(ids[1:-1]))
    return out


def make_requests(corpus: list[str], n: int, passages: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(VOCAB) for _ in range(8)) + "?", rng.sample(corpus, passages)) for _ in range(n)]


# ----- the cross-encoder server (c) ------------------------------------------------------------------


class CrossEncoderAsReranker(Reranker):
    """Serves a MiniLM cross-encoder through the same app: ``score_many`` reads every (query, passage) pair."""

    def __init__(self, batch_size: int) -> None:
        from kalm_rag.models.mini import MiniConfig
        from kalm_rag.models.mini.backend import load_encoder

        backend = Reranker.from_pretrained("kalm-mini", device="cpu").backend  # the app asks it for token limits
        super().__init__(backend, store="memory://")
        self.bert, self.tokenizer = load_encoder(MiniConfig(), device=torch.device("cpu"), dtype=torch.float32)
        self.bert.eval()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(384, 1)
        self.ce_batch = batch_size

    def encode(
        self, passages: Sequence[str], *, strict: bool = True, show_progress_bar: bool | None = None
    ) -> EncodeReport:
        """Nothing to pre-encode: a cross-encoder reads every pair (the app encodes large requests in steps)."""
        distinct = len(set(passages))
        return EncodeReport(passages=distinct, already_present=distinct)

    @torch.inference_mode()
    def score_many(self, requests: Sequence[ScoreRequest], *, return_margin: bool = False) -> list[list[float]]:
        out = []
        for req in requests:
            logits: list[float] = []
            for s in range(0, len(req.passages), self.ce_batch):
                chunk = list(req.passages[s : s + self.ce_batch])
                enc = self.tokenizer(
                    [req.query] * len(chunk),
                    chunk,
                    truncation="only_second",
                    max_length=320,
                    padding=True,
                    return_tensors="pt",
                )
                logits += self.head(self.bert(**enc).last_hidden_state[:, 0]).squeeze(-1).tolist()
            out.append(logits if return_margin else torch.sigmoid(torch.tensor(logits)).tolist())
            self.counters["scored_pairs"] += len(req.passages)
        return out


def serve_cross_encoder(port: int, threads: int, batch_size: int) -> None:
    import uvicorn

    from kalm_rag.serve import create_app

    torch.set_num_threads(threads)
    app = create_app(CrossEncoderAsReranker(batch_size), model_name="minilm-cross-encoder")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----- load generation ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server not ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def batch_stats(url: str) -> dict[str, float]:
    """Batches, requests in batches and model seconds so far, from the server's /metrics."""
    names = {
        "kalm_rag_batch_requests_count": "batches",
        "kalm_rag_batch_requests_sum": "requests",
        "kalm_rag_batch_duration_seconds_sum": "model_s",
        "kalm_rag_decoder_calls_total": "decoder_calls",
        "kalm_rag_decoder_rows_total": "decoder_rows",
    }
    out = dict.fromkeys(names.values(), 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[names[name]] = float(value)
    return out


async def load(
    url: str, requests: list[tuple[str, list[str]]], concurrency: int, deadline_s: float | None = None
) -> tuple[float, list[float | None], list]:
    """Send ``requests`` with at most ``concurrency`` in flight.

    Returns (seconds to the last answer, latencies, top-10 results). Requests still unanswered after
    ``deadline_s`` are abandoned (latency ``None``: longer than the deadline); the server drops them.
    """
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float | None] = [None] * len(requests)
    results: list = [None] * len(requests)
    last = 0.0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            nonlocal last
            query, docs = requests[i]
            async with semaphore:
                t = time.perf_counter()
                r = await client.post("/v2/rerank", json={"model": "m", "query": query, "documents": docs, "top_n": 10})
                latencies[i] = time.perf_counter() - t
            r.raise_for_status()
            results[i] = [(x["index"], x["relevance_score"]) for x in r.json()["results"]]
            last = time.perf_counter() - t0

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(requests))]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # an HTTP error fails the benchmark
        return last, latencies, results


def percentile(values: list[float | None], q: float) -> float | None:
    """The q-quantile, unanswered requests counted as longer than any answer (``None`` where it falls on one)."""
    ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    a, b = ordered[lo], ordered[hi]
    if a is None or b is None:
        return None
    return a + (b - a) * (k - lo)


def prepare(server: Server, corpus: list[str], encode: bool) -> None:
    """Wait for the server; pre-encode the corpus into the store (``encode``); warm its memory tier. Not timed."""
    server.wait_ready()
    if encode:
        t = time.perf_counter()
        r = httpx.post(f"{server.url}/v1/encode", json={"documents": corpus}, timeout=3600).json()
        print(
            f"  encode: {r['encoded']} new, {r['already_present']} present in {time.perf_counter() - t:.1f} s",
            file=sys.stderr,
        )
    asyncio.run(load(server.url, [("warm up?", corpus[i : i + 100]) for i in range(0, len(corpus), 100)], 1))


def run_level(
    name: str, server: Server, c: int, n: int, corpus: list[str], deadline_s: float | None, passages: int = 100
) -> dict:
    """``n`` requests of ``passages`` passages (the same ones for every server at this level) with ``c`` in flight."""
    requests = make_requests(corpus, n, passages, seed=c + 1000 * passages)
    before = batch_stats(server.url)
    wall, lat, results = asyncio.run(load(server.url, requests, c, deadline_s))
    answered = sum(x is not None for x in lat)
    after = batch_stats(server.url)
    batched = after["requests"] - before["requests"]
    row = {
        "requests": n,
        "answered": answered,
        "deadline_s": deadline_s if answered < n else None,
        "rps": answered / (deadline_s if answered < n and deadline_s else wall),  # censored: a lower bound
        "p50_s": percentile(lat, 0.5),
        "p95_s": percentile(lat, 0.95),
        "p99_s": percentile(lat, 0.99),
        "requests_per_batch": batched / (after["batches"] - before["batches"]) if batched else None,
        "model_s_per_request": (after["model_s"] - before["model_s"]) / batched if batched else None,
        "rows_per_decoder_call": (after["decoder_rows"] - before["decoder_rows"])
        / max(1.0, after["decoder_calls"] - before["decoder_calls"]),
        "results": results,
    }
    print(
        f"  {name} c={c:>2}: {answered}/{n} answered, {row['rps']:.3f} req/s, p50/p95/p99 "
        f"{_fmt(row['p50_s'], deadline_s)} / {_fmt(row['p95_s'], deadline_s)} / {_fmt(row['p99_s'], deadline_s)} s,"
        f" {row['requests_per_batch'] or 0:.2f} req/batch, model {row['model_s_per_request'] or 0:.3f} s/req,"
        f" {row['rows_per_decoder_call']:.1f} rows/decoder call",
        file=sys.stderr,
    )
    if answered < n:  # the server drops abandoned requests; a tiny probe returns once the running one is done
        asyncio.run(load(server.url, [("probe?", corpus[:1])], 1))
    return row


def small_requests(args: argparse.Namespace) -> None:
    """Requests of 10 and 20 passages: batching on vs off at each concurrency, taking turns (issue 26)."""
    counts = dict(zip(CONCURRENCY, map(int, args.small_requests.split(","))))
    sizes = [int(x) for x in args.sizes.split(",")]
    from kalm_rag.models.mini import MiniConfig
    from kalm_rag.models.mini.backend import load_encoder

    _, tokenizer = load_encoder(MiniConfig(), device=torch.device("cpu"), dtype=torch.float32)
    corpus = make_corpus(tokenizer, args.corpus, args.tokens)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-small-"))
    store = f"sqlite:///{work / 'passages.db'}?memory_tier=1GB"
    serve = [sys.executable, "-m", "kalm_rag", "serve", "--store", store, "--threads", str(args.threads)]
    serve += ["--batch-size", str(args.batch_size), "--log-level", "warning"]
    modes = {
        "batching": serve
        + ["--max-batch-passages", str(args.max_batch_passages), "--max-wait-ms", str(args.max_wait_ms)],
        "no_batching": serve + ["--no-batching"],
    }
    results: dict = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores ({platform.machine()}), shared with other work",
        "threads": args.threads,
        "passage_tokens": args.tokens,
        "corpus": args.corpus,
        "batch_size": args.batch_size,
        "max_batch_passages": args.max_batch_passages,
        "max_wait_ms": args.max_wait_ms,
        "sizes": {},
    }
    started = time.perf_counter()
    servers: dict[str, Server] = {}
    try:
        for name, command in modes.items():
            port = free_port()
            servers[name] = Server([*command, "--port", str(port)], port, work / f"{name}.log")
        for k, server in enumerate(servers.values()):
            prepare(server, corpus, encode=k == 0)
        turn = 0
        for size in sizes:
            rows: dict[str, dict] = {name: {} for name in servers}
            for c, n in counts.items():
                for name in list(servers)[:: 1 if turn % 2 == 0 else -1]:
                    rows[name][str(c)] = run_level(name, servers[name], c, n, corpus, None, passages=size)
                turn += 1
            turn += 1  # the next size starts with the other server: no server always goes first at a level
            results["sizes"][str(size)] = rows
    finally:
        for server in servers.values():
            server.stop()
    results["total_s"] = time.perf_counter() - started
    lines = [
        "| passages | concurrency | batching: req/s | p50 / p95 / p99 (s) | rows per decoder call | no batching: req/s "
        "| p50 / p95 / p99 (s) | rows per decoder call | gain |",
        "|---:|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    same = True
    for size, rows in results["sizes"].items():
        for c in map(str, CONCURRENCY):
            a, b = rows["batching"][c], rows["no_batching"][c]
            same &= all(
                [i for i, _ in x] == [i for i, _ in y] and max(abs(u - v) for (_, u), (_, v) in zip(x, y)) < 1e-5
                for x, y in zip(a["results"], b["results"])
            )
            lat = {k: " / ".join(f"{row[f'p{q}_s']:.3f}" for q in (50, 95, 99)) for k, row in (("a", a), ("b", b))}
            lines.append(
                f"| {size} | {c} | {a['rps']:.2f} | {lat['a']} | {a['rows_per_decoder_call']:.1f} | {b['rps']:.2f} | "
                f"{lat['b']} | {b['rows_per_decoder_call']:.1f} | {a['rps'] / b['rps']:.2f}x |"
            )
            a.pop("results"), b.pop("results")
    results["batching_changes_no_ranking"] = same
    results["table"] = "\n".join(lines)
    print(results["table"])
    print(f"rankings identical with and without batching (1e-5): {same}; total {results['total_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results (JSON) here")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--corpus", type=int, default=200, help="passages in the store (each request draws 100)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100, help="passages per decoder / cross-encoder call")
    ap.add_argument("--fbnl-requests", default="4,8,32,64", help="requests at concurrency 1,4,16,64 (FBNL)")
    ap.add_argument("--ce-requests", default="2,4,16,64", help="requests at concurrency 1,4,16,64 (cross-encoder)")
    ap.add_argument(
        "--ce-deadline", type=float, default=150.0, help="seconds the load generator waits at each cross-encoder level"
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: few requests, small corpus")
    ap.add_argument("--small", action="store_true", help="requests of --sizes passages, batching on/off (issue 26)")
    ap.add_argument("--sizes", default="10,20", help="passages per request (--small)")
    ap.add_argument("--small-requests", default="16,32,64,128", help="requests at concurrency 1,4,16,64 (--small)")
    ap.add_argument("--max-batch-passages", type=int, default=320, help="the batching server's bound (--small)")
    ap.add_argument("--max-wait-ms", type=float, default=2.0, help="the batching server's wait (--small)")
    ap.add_argument("--serve-cross-encoder", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_cross_encoder is not None:
        serve_cross_encoder(args.serve_cross_encoder, args.threads, args.batch_size)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server processes (finally) on SIGTERM too
    if args.small:
        if args.quick:
            args.corpus, args.small_requests = 60, "2,4,8,16"
        small_requests(args)
        return
    if args.quick:
        args.corpus, args.fbnl_requests, args.ce_requests = 120, "2,4,4,8", "1,2,4,8"
    fbnl_counts = dict(zip(CONCURRENCY, map(int, args.fbnl_requests.split(","))))
    ce_counts = dict(zip(CONCURRENCY, map(int, args.ce_requests.split(","))))

    from kalm_rag.models.mini import MiniConfig
    from kalm_rag.models.mini.backend import load_encoder

    _, tokenizer = load_encoder(MiniConfig(), device=torch.device("cpu"), dtype=torch.float32)
    corpus = make_corpus(tokenizer, args.corpus, args.tokens)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    store = f"sqlite:///{work / 'passages.db'}?memory_tier=1GB"
    serve = [
        sys.executable,
        "-m",
        "kalm_rag",
        "serve",
        "--store",
        store,
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--log-level",
        "warning",
    ]
    started = time.perf_counter()
    results: dict = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores ({platform.machine()})",
        "threads": args.threads,
        "passages_per_request": 100,
        "passage_tokens": args.tokens,
        "corpus": args.corpus,
        "batch_size": args.batch_size,
        "modes": {},
    }
    # (a) and (b) run side by side (an idle server costs nothing) and take turns at each concurrency, in
    # alternating order, so that the shared machine's drift over the run hits both alike
    fbnl = {
        "fbnl_batching": serve + ["--max-batch-passages", "1600", "--max-wait-ms", "2"],
        "fbnl_no_batching": serve + ["--no-batching"],
    }
    servers = {}
    try:
        for name, command in fbnl.items():
            port = free_port()
            servers[name] = Server([*command, "--port", str(port)], port, work / f"{name}.log")
        for k, (name, server) in enumerate(servers.items()):
            prepare(server, corpus, encode=k == 0)
            results["modes"][name] = {}
        for k, (c, n) in enumerate(fbnl_counts.items()):
            for name in list(servers)[:: 1 if k % 2 == 0 else -1]:
                results["modes"][name][str(c)] = run_level(name, servers[name], c, n, corpus, None)
    finally:
        for server in servers.values():
            server.stop()
    port = free_port()
    print(f"cross_encoder: port {port}", file=sys.stderr)
    command = [
        sys.executable,
        __file__,
        "--serve-cross-encoder",
        str(port),
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
    ]
    server = Server(command, port, work / "cross_encoder.log")
    try:
        prepare(server, corpus, encode=False)
        results["modes"]["cross_encoder"] = {
            str(c): run_level("cross_encoder", server, c, n, corpus, args.ce_deadline) for c, n in ce_counts.items()
        }
    finally:
        server.stop()
    results["total_s"] = time.perf_counter() - started

    on, off, ce = (results["modes"][k] for k in ("fbnl_batching", "fbnl_no_batching", "cross_encoder"))
    same = all(
        [i for i, _ in a] == [i for i, _ in b] and max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5
        for c in on
        for a, b in zip(on[c]["results"], off[c]["results"])
    )
    results["batching_changes_no_ranking"] = same
    lines = [
        "| concurrency | (a) batching: req/s | p50 / p95 / p99 (s) | req/batch | model s/req | (b) no batching: req/s "
        "| p50 / p95 / p99 (s) | model s/req | (c) cross-encoder: req/s | p50 / p95 / p99 (s) | batching gain (a/b) "
        "| FBNL / CE (a/c) |",
        "|---:|---:|---|---:|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for c in map(str, CONCURRENCY):
        a, b, x = on[c], off[c], ce[c]
        lat = {
            k: " / ".join(_fmt(row[f"p{q}_s"], row["deadline_s"]) for q in (50, 95, 99))
            for k, row in (("a", a), ("b", b), ("x", x))
        }
        answered = "" if x["answered"] == x["requests"] else f" ({x['answered']}/{x['requests']} answered)"
        lines.append(
            f"| {c} | {a['rps']:.2f} | {lat['a']} | {a['requests_per_batch']:.1f} | {a['model_s_per_request']:.2f} | "
            f"{b['rps']:.2f} | {lat['b']} | {b['model_s_per_request']:.2f} | "
            f"{x['rps']:.3f}{answered} | {lat['x']} | {a['rps'] / b['rps']:.2f}x | {a['rps'] / x['rps']:.1f}x |"
        )
    results["table"] = "\n".join(lines)
    for mode in results["modes"].values():
        for row in mode.values():
            row.pop("results")
    print(results["table"])
    print(f"rankings identical with and without batching (1e-5): {same}; total {results['total_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def _fmt(value: float | None, deadline_s: float | None) -> str:
    return f"> {deadline_s:.0f}" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
