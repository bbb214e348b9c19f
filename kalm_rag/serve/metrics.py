"""Prometheus metrics of the service: requests, latency, batches, queue depth, store hits, encoder and decoder work.

Each app has its own registry, so that several apps can live in one process (tests, mounted apps). With
several uvicorn worker processes, ``kalm-rag serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics``
adds up every worker's values (prometheus-client's multiprocess mode), whichever worker answers.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

from kalm_rag.serve.batching import BatchReport

#: The media type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PASSAGE_BUCKETS = (1, 10, 25, 50, 100, 200, 400, 800, 1600, 3200)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def multiprocess_dir() -> str | None:
    """The folder of prometheus-client's multiprocess mode, when the service runs several workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServeMetrics:
    """The service's metrics (names start with ``kalm_rag_``).

    Args:
        registry: where to register them; a fresh registry when ``None``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.requests = Counter(
            "kalm_rag_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "kalm_rag_request_duration_seconds",
            "Time from request to response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_passages = Histogram(
            "kalm_rag_batch_passages", "Passages per model batch", buckets=PASSAGE_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "kalm_rag_batch_requests", "Requests coalesced into one model batch", buckets=REQUEST_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "kalm_rag_batch_duration_seconds", "Model time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "kalm_rag_queue_wait_seconds",
            "Time a request waited for the model worker",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "kalm_rag_queue_depth", "Requests waiting for the model worker", multiprocess_mode="livesum", registry=r
        )
        self.store_hits = Counter(
            "kalm_rag_store_hits", "Distinct passages found in the passage store when scoring", registry=r
        )
        self.store_misses = Counter(
            "kalm_rag_store_misses", "Distinct passages missing from the store when scoring (encoded)", registry=r
        )
        self.encoded_passages = Counter(
            "kalm_rag_encoded_passages", "Passages run through the encoder (scoring misses and /v1/encode)", registry=r
        )
        self.scored_passages = Counter("kalm_rag_scored_passages", "Query-passage pairs scored", registry=r)
        self.decoder_calls = Counter(
            "kalm_rag_decoder_calls", "Decoder calls (each over one or more prompts)", registry=r
        )
        self.decoder_rows = Counter("kalm_rag_decoder_rows", "Query-passage rows scored by decoder calls", registry=r)
        self.rows_per_call = Histogram(
            "kalm_rag_decoder_rows_per_call",
            "Rows per decoder call (one observation per call: its batch's mean), what cross-request batching grows",
            buckets=ROWS_BUCKETS,
            registry=r,
        )
        self.model_ready = Gauge(
            "kalm_rag_model_ready", "1 once the model is loaded", multiprocess_mode="livemax", registry=r
        )

    def observe_batch(self, report: BatchReport) -> None:
        """Record one batch (called on the model worker thread; prometheus-client is thread-safe)."""
        self.batch_passages.observe(report.passages)
        self.batch_requests.observe(report.requests)
        self.batch_seconds.observe(report.seconds)
        for seconds in report.queue_seconds:
            self.queue_seconds.observe(seconds)
        self.observe_counters(report.counters)
        calls, rows = report.counters.get("decoder_calls", 0), report.counters.get("decoder_rows", 0)
        for _ in range(calls):
            self.rows_per_call.observe(rows / calls)

    def observe_counters(self, counters: dict[str, int]) -> None:
        """Add the growth of the engine's work counters."""
        self.store_hits.inc(counters.get("store_hits", 0))
        self.store_misses.inc(counters.get("store_misses", 0))
        self.encoded_passages.inc(counters.get("encoded_passages", 0))
        self.scored_passages.inc(counters.get("scored_pairs", 0))
        self.decoder_calls.inc(counters.get("decoder_calls", 0))
        self.decoder_rows.inc(counters.get("decoder_rows", 0))

    def render(self) -> bytes:
        """The text exposition of every metric (all worker processes' in multiprocess mode)."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
