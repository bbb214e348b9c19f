"""A GPU check for the FBNL engine, ready to run on one accelerator in a few minutes (issue 26).

For each model shape (Nano and Small text shapes, random weights: speed does not depend on the values) and
each passage length (~256 and ~1024 tokens), 100 passages per query:

- the official recipe (one padded batch: the encoder every call, MEP, the decoder with full-vocabulary logits);
- the engine on a warm store (passages encoded once, kept in host memory in the compute dtype, as the engine
  keeps them: each call moves its passages' vectors to the device and re-pools them): the lean decoder at
  ratio 4, and the paper's cascade (top-100 at r=32, then top-20 at r=2);
- the largest margin difference between the official recipe and the engine (bf16 noise, not a parity test:
  ``tests/test_parity.py`` is the parity test);
- the service's batcher in process (``DynamicBatcher``, no HTTP) at concurrency 1/16/64, batching on and off,
  requests of ``service_passages`` cached passages each: requests/s and rows per decoder call;
- peak accelerator memory of each part.

``benchmarks/gpu_check.py`` is the command line; ``tests/test_gpu_check.py`` runs it on a tiny shape on CPU.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kalm_rag.bench.checkpoints import copy_gemma_tokenizer, make_tiny_tokenizer, random_t5gemma2
from kalm_rag.bench.suite import QUERY, make_passages, official_recipe
from kalm_rag.engine import DEFAULT_CASCADE, Reranker, ScoreRequest
from kalm_rag.models.t5gemma2 import T5Gemma2Backend
from kalm_rag.serve.batching import DynamicBatcher
from kalm_rag.store import MemoryStore

#: Gemma 3's vocabulary size: the random models get it even with the tiny tokenizer.
GEMMA_VOCAB = 262_144


@dataclass
class GpuCheckConfig:
    """What :func:`run_gpu_check` measures.

    Attributes:
        shapes: model shapes (``nano``, ``small``; ``tiny`` for tests).
        lengths: passage lengths in tokens.
        passages: passages per query.
        device: ``cuda`` (or ``cpu`` for the test).
        dtype: ``bfloat16`` on a GPU.
        repeats: timed runs per measurement (the median is reported).
        concurrency: concurrent requests for the batcher measurement.
        service_requests: requests per concurrency level.
        service_passages: cached passages per service request.
        service_shapes: shapes whose service rates are measured.
        tokenizer_dir: the real Gemma 3 tokenizer folder, when present; else a tiny tokenizer is trained.
        vocab_size: embedding rows of the random models (Gemma 3's by default).
        batch_size: rows per decoder call.
    """

    shapes: Sequence[str] = ("nano", "small")
    lengths: Sequence[int] = (256, 1024)
    passages: int = 100
    device: str = "cuda"
    dtype: str = "bfloat16"
    repeats: int = 5
    concurrency: Sequence[int] = (1, 16, 64)
    service_requests: Sequence[int] = (16, 64, 128)
    service_passages: int = 20
    service_shapes: Sequence[str] = ("nano",)
    tokenizer_dir: str | None = None
    vocab_size: int | None = GEMMA_VOCAB
    batch_size: int = 128
    workdir: Path = field(default_factory=lambda: Path("/tmp/kalm-rag-gpu-check"))


def run_gpu_check(cfg: GpuCheckConfig) -> dict[str, Any]:
    """Every measurement of the check, as a JSON-ready dict."""
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    tokenizer = _tokenizer(cfg)
    out: dict[str, Any] = {
        "device": _device_name(device),
        "dtype": cfg.dtype,
        "torch": torch.__version__,
        "tokenizer": "gemma3" if cfg.tokenizer_dir else "tiny byte-level BPE (vocabulary padded to Gemma 3's)",
        "passages_per_query": cfg.passages,
        "shapes": {},
    }
    started = time.perf_counter()
    for shape in cfg.shapes:
        _reset_peak(device)
        model = random_t5gemma2(tokenizer, shape=shape, vocab_size=cfg.vocab_size, device=device).to(dtype)
        backend = T5Gemma2Backend(model, tokenizer, weights_id=f"random-{shape}")
        rr = Reranker(
            backend,
            store=MemoryStore(max_bytes="16GB"),  # every passage of the check stays cached (no re-encoding)
            batch_size=cfg.batch_size,
            max_passage_tokens=max(cfg.lengths),
            storage_dtype="bfloat16" if cfg.dtype == "bfloat16" else "float32",
        )
        result: dict[str, Any] = {"parameters_m": sum(p.numel() for p in model.parameters()) / 1e6, "lengths": {}}
        for tokens in cfg.lengths:
            result["lengths"][str(tokens)] = _scoring(cfg, rr, model, tokenizer, device, tokens)
        if shape in cfg.service_shapes:
            result["service"] = _service(cfg, rr, tokenizer, device)
        result["peak_memory_mib"] = _peak_mib(device)
        out["shapes"][shape] = result
        del rr, backend, model
        _empty_cache(device)
    out["total_s"] = time.perf_counter() - started
    return out


# ----- parts -----------------------------------------------------------------------------------------


def _scoring(cfg: GpuCheckConfig, rr: Reranker, model: Any, tokenizer: Any, device: torch.device, tokens: int) -> dict:
    passages = make_passages(tokenizer, cfg.passages, tokens, seed=tokens)
    _reset_peak(device)
    official = official_recipe(model, tokenizer, QUERY, passages, 4, device=device)
    official_s = _median(
        lambda: official_recipe(model, tokenizer, QUERY, passages, 4, device=device), cfg.repeats, device
    )
    official_peak = _peak_mib(device)
    t = time.perf_counter()
    rr.encode(passages)
    _sync(device)
    encode_s = time.perf_counter() - t
    _reset_peak(device)
    lean = torch.tensor(rr.score(QUERY, passages, ratio=4, return_margin=True))
    lean_s = _median(lambda: rr.score(QUERY, passages, ratio=4), cfg.repeats, device)
    cascade_s = _median(lambda: rr.rerank_cascade(QUERY, passages, stages=DEFAULT_CASCADE), cfg.repeats, device)
    return {
        "official_recipe_ms": 1000 * official_s,
        "official_peak_mib": official_peak,
        "encode_100_passages_s": encode_s,
        "lean_r4_ms": 1000 * lean_s,
        "cascade_ms": 1000 * cascade_s,
        "engine_peak_mib": _peak_mib(device),
        "max_margin_difference_vs_official": float((lean - official.cpu()).abs().max()),
        "lean_speedup_vs_official": official_s / lean_s,
    }


def _service(cfg: GpuCheckConfig, rr: Reranker, tokenizer: Any, device: torch.device) -> dict:
    corpus = make_passages(tokenizer, max(4 * cfg.service_passages, 50), 256, seed=7)
    rr.encode(corpus)
    rng = random.Random(0)
    out: dict[str, Any] = {"passages_per_request": cfg.service_passages, "tokens_per_passage": 256}
    for c, n in zip(cfg.concurrency, cfg.service_requests, strict=True):
        requests = [ScoreRequest(f"{QUERY} ({i})", rng.sample(corpus, cfg.service_passages)) for i in range(n)]
        row: dict[str, Any] = {}
        for mode, enabled in (("batching", True), ("no_batching", False)):
            rps, rows_per_call = asyncio.run(_batcher_rate(rr, requests, c, enabled, device))
            row[mode] = {"requests_per_s": rps, "rows_per_decoder_call": rows_per_call}
        row["gain"] = row["batching"]["requests_per_s"] / row["no_batching"]["requests_per_s"]
        out[str(c)] = row
    return out


async def _batcher_rate(
    rr: Reranker, requests: list[ScoreRequest], concurrency: int, enabled: bool, device: torch.device
) -> tuple[float, float]:
    batcher = DynamicBatcher(rr, max_batch_passages=64 * 20, max_wait_ms=2.0, enabled=enabled)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(request: ScoreRequest) -> None:
        async with semaphore:
            await batcher.score(request)

    await batcher.score(requests[0])  # warm-up
    calls, rows = rr.counters["decoder_calls"], rr.counters["decoder_rows"]
    t = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    _sync(device)
    seconds = time.perf_counter() - t
    await batcher.stop()
    made = rr.counters["decoder_calls"] - calls
    return len(requests) / seconds, (rr.counters["decoder_rows"] - rows) / max(1, made)


# ----- helpers ---------------------------------------------------------------------------------------


def _tokenizer(cfg: GpuCheckConfig) -> Any:
    from transformers import AutoTokenizer

    folder = cfg.workdir / "tokenizer"
    path = copy_gemma_tokenizer(cfg.tokenizer_dir, folder) if cfg.tokenizer_dir else make_tiny_tokenizer(folder)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _median(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    """Peak accelerator memory since the last reset (MiB); ``None`` on CPU (see the process's RSS instead)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from kalm_rag.bench.suite import cpu_name

    return cpu_name()
