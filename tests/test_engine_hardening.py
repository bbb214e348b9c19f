"""Engine fault tests of issue #15: options that shape stored vectors cannot change (item 3), indexing never
fails silently (item 5), device errors are KalmErrors (item 9), no transformers warning on long queries and
stores of the adapters' registry closed at exit (item 14).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from kalm_rag import (
    EncodeReport,
    InvalidInputError,
    KalmError,
    NotStoredError,
    ReadOnlyOptionError,
    Reranker,
    StoreError,
)
from kalm_rag.store import MemoryStore
from tests.store.helpers import full_sqlite

QUERY = "What is the capital of France?"
PASSAGES = ["Paris is the capital of France.", "Bananas are yellow.", "The Seine flows through Paris. " * 3]


@pytest.fixture(scope="module")
def backend(tiny_checkpoint):
    return Reranker.from_pretrained(tiny_checkpoint).backend


# ----- item 3: the options that shape stored vectors --------------------------------------------------------


@pytest.mark.parametrize(
    "name, value", [("max_passage_tokens", 8), ("base_ratio", 2), ("storage_dtype", "bfloat16"), ("backend", None)]
)
def test_options_that_shape_stored_vectors_cannot_change(backend, name, value):
    rr = Reranker(backend)
    namespace = rr.namespace
    before = getattr(rr, name)
    with pytest.raises(ReadOnlyOptionError, match=f"{name} shapes the stored passage vectors") as err:
        setattr(rr, name, value)  # before: accepted, and the old namespace kept
    assert isinstance(err.value, AttributeError) and isinstance(err.value, KalmError)
    assert getattr(rr, name) is before and rr.namespace == namespace


def test_the_namespace_follows_the_backend_identity(backend, monkeypatch):
    rr = Reranker(backend)
    first = rr.namespace
    monkeypatch.setattr(backend, "weights_id", backend.weights_id + "-retrained")
    assert rr.namespace != first  # before: a cached property, stale forever
    monkeypatch.undo()
    assert rr.namespace == first


def test_other_options_may_change_and_are_checked(backend):
    rr = Reranker(backend)
    rr.ratio, rr.batch_size, rr.max_query_tokens, rr.instruction = 8, 4, 16, "Find the answer."
    assert (rr.ratio, rr.batch_size, rr.max_query_tokens) == (8, 4, 16)
    for name, value in (("ratio", 0), ("batch_size", "4"), ("max_query_tokens", True), ("instruction", " ")):
        with pytest.raises(InvalidInputError, match=name):
            setattr(rr, name, value)


# ----- item 5: indexing never fails silently ----------------------------------------------------------------


def test_encode_reports_what_it_did(backend):
    rr = Reranker(backend, store=MemoryStore())
    report = rr.encode(PASSAGES + [PASSAGES[0]])
    assert report == EncodeReport(passages=3, already_present=0, encoded=3, stored=3, not_stored=0)
    assert report.ok and int(report) == 3
    again = rr.encode(PASSAGES[:2] + ["A new passage."])
    assert again == EncodeReport(passages=3, already_present=2, encoded=1, stored=1)
    assert (report + again).passages == 6


def test_encode_into_a_full_store_raises_naming_the_count(backend, tmp_path):
    rr = Reranker(backend, store=full_sqlite(tmp_path / "p.db"), batch_size=2)
    with pytest.raises(NotStoredError, match="3 of 3 passages were not stored") as err:
        rr.encode(PASSAGES)  # before: a warning in the log, and a normal return
    report = err.value.report
    assert report.stored == 0 and report.not_stored == 3 and not report.ok
    assert report.encoded == 2  # the first batch failed: the rest was not even encoded
    assert "full" in report.errors[0]
    assert isinstance(err.value, StoreError)
    assert list(rr.store.iter_keys(rr.namespace)) == []


def test_encode_not_strict_tries_everything_and_reports(backend, tmp_path):
    rr = Reranker(backend, store=full_sqlite(tmp_path / "p.db"), batch_size=2)
    report = rr.encode(PASSAGES, strict=False)
    assert report.encoded == 3 and report.stored == 0 and report.not_stored == 3 and not report.ok
    assert report.passages == report.already_present + report.stored + report.not_stored


async def test_aencode_raises_too(backend):
    rr = Reranker(backend, store=MemoryStore(max_bytes=64))  # every entry is larger than the store
    with pytest.raises(NotStoredError):
        await rr.aencode(PASSAGES)
    rr.close()


def test_scoring_still_goes_on_when_the_store_cannot_keep_anything(backend, tmp_path):
    want = Reranker(backend).score(QUERY, PASSAGES)
    rr = Reranker(backend, store=full_sqlite(tmp_path / "p.db"))
    assert rr.score(QUERY, PASSAGES) == pytest.approx(want, abs=1e-6)


def test_encode_into_an_unreachable_redis_raises_fast(backend):
    pytest.importorskip("redis")
    import time

    rr = Reranker(backend, store="redis://127.0.0.1:1/0?connect_timeout=0.2")  # nothing listens on port 1
    start = time.monotonic()
    with pytest.raises(NotStoredError, match="were not stored"):
        rr.encode(PASSAGES)
    assert time.monotonic() - start < 3.0
    rr.close()


def test_the_encoder_never_stores_non_finite_vectors(backend, monkeypatch):
    rr = Reranker(backend, store=MemoryStore())
    real = backend.encode
    monkeypatch.setattr(backend, "encode", lambda ids, mask: real(ids, mask) * float("inf"))
    with pytest.raises(KalmError, match="non-finite passage vectors"):
        rr.encode(PASSAGES)
    assert rr.store.stats()["entries"] == 0


# ----- item 9: device errors ------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_input_error(tiny_checkpoint):
    with pytest.raises(InvalidInputError, match="'cuda' was asked for but cuda is not available"):
        Reranker.from_pretrained(tiny_checkpoint, device="cuda")  # before: AssertionError from torch


@pytest.mark.parametrize("device", ["gpu", "cuda:x", 3, "meta"])
def test_a_bad_device_is_a_clear_input_error(tiny_checkpoint, device):
    with pytest.raises(InvalidInputError, match="device"):
        Reranker.from_pretrained(tiny_checkpoint, device=device)


def test_a_bad_store_argument_is_a_clear_input_error(backend):
    with pytest.raises(InvalidInputError, match="store must be"):
        Reranker(backend, store=12)  # type: ignore[arg-type]
    with pytest.raises(KalmError, match="unknown store URL scheme"):
        Reranker(backend, store="mysql://x")


# ----- item 14: smaller ------------------------------------------------------------------------------------------


def test_a_long_query_prints_no_transformers_warning(backend, monkeypatch):
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    monkeypatch.setattr(backend.tokenizer, "model_max_length", 120)  # the prompt with a cut query is shorter
    monkeypatch.setattr(backend.tokenizer, "deprecation_warnings", {})  # the warning is printed once per tokenizer
    try:
        long_query = "what is the capital of France " * 30
        assert len(backend.tokenizer.encode(long_query, add_special_tokens=False, verbose=False)) > 120
        Reranker(backend, max_query_tokens=8).score(long_query, PASSAGES[:1])
    finally:
        hf_logger.removeHandler(handler)
    assert not [r for r in records if "indexing errors" in r], records


def test_stores_opened_by_url_in_the_adapters_registry_are_closed_at_exit(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from kalm_rag import adapters
        from kalm_rag.store.sqlite import SQLiteStore
        closed = []
        real = SQLiteStore.close
        def close(self):
            closed.append(self.path)
            real(self)
            sys.stdout.write(f"closed {{self.path}}\\n")
        SQLiteStore.close = close
        adapters.shared_store("sqlite:///{tmp_path}/p.db")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"closed {tmp_path}/p.db"  # before: never closed
