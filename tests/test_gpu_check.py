"""The GPU check (benchmarks/gpu_check.py) runs end to end on a tiny shape on CPU (the real run needs a GPU)."""

from __future__ import annotations

import json

from kalm_rag.bench.gpu import GpuCheckConfig, run_gpu_check


def test_gpu_check_runs_on_a_tiny_shape_on_cpu(tmp_path) -> None:
    cfg = GpuCheckConfig(
        shapes=("tiny",),
        lengths=(32,),
        passages=6,
        device="cpu",
        dtype="float32",
        repeats=1,
        concurrency=(1, 4),
        service_requests=(2, 8),
        service_passages=3,
        service_shapes=("tiny",),
        vocab_size=None,
        batch_size=4,
        workdir=tmp_path,
    )
    result = json.loads(json.dumps(run_gpu_check(cfg)))  # JSON-ready
    tiny = result["shapes"]["tiny"]
    part = tiny["lengths"]["32"]
    assert part["official_recipe_ms"] > 0 and part["lean_r4_ms"] > 0 and part["cascade_ms"] > 0
    # fp32 on CPU: the engine equals the official recipe (parity itself is tests/test_parity.py)
    assert part["max_margin_difference_vs_official"] < 1e-3
    service = tiny["service"]
    assert set(service) >= {"1", "4"}
    assert service["4"]["batching"]["rows_per_decoder_call"] > service["4"]["no_batching"]["rows_per_decoder_call"]
