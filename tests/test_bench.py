"""The benchmark suite's arithmetic and a smoke run on a tiny shape (the real runs are not tests)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForSeq2SeqLM

from kalm_rag.bench.suite import BenchConfig, decoder_flops, dtype_error, run_suite


def test_decoder_flops_follow_the_formula(tiny_checkpoint):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_checkpoint)
    cfg = model.config.decoder
    params = sum(p.numel() for n, p in model.get_decoder().named_parameters() if "embed_tokens" not in n)
    T, W, N = 50, 16, 3
    flops = decoder_flops(model, T, W, N)
    attention = 2 * 2 * cfg.num_attention_heads * cfg.head_dim * T * (T + W) * cfg.num_hidden_layers * N
    assert flops["decoder_params"] == params
    assert flops["formula"] == 2 * params * T * N + attention
    # the lean path skips the last layer's output projection and MLP for all but one position
    assert flops["executed"] < flops["formula"] * 1.1


def test_dtype_error_measures_differences():
    same = dtype_error([1.0, 2.0, 3.0, -1.0], [1.0, 2.0, 3.0, -1.0])
    assert same["max_abs"] == 0 and same["spearman"] == pytest.approx(1.0)
    off = dtype_error([1.0, 2.0, 3.0, -1.0], [1.5, 2.0, 3.0, -1.0])
    assert off["max_abs"] == pytest.approx(0.5)


def test_suite_smoke_run_on_a_tiny_shape(tiny_checkpoint, tmp_path):
    cfg = BenchConfig(
        tokenizer=tiny_checkpoint,
        workdir=tmp_path / "work",
        out_dir=tmp_path / "out",
        shape="tiny",
        n=6,
        n_official=4,
        tokens=40,
        long_tokens=80,
        n_sweep=(2, 4),
        length_sweep=(32, 64),
        ratio_sweep=(1, 8),
        repeats=1,
        log=lambda msg: None,
    )
    res = run_suite(cfg)
    for dtype in ("float32", "bfloat16"):
        block = res[dtype]
        assert block["official_40"]["speedup"] > 0 and block["cross_encoder"]["speedup"] > 0
        assert block["matmul_gflops"] > 0 and block["efficiency_executed"] > 0
    assert res["float32"]["official_40"]["max_abs_margin_diff"] < 1e-4
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["prompt_tokens"] == res["prompt_tokens"]
    assert "Online scoring benchmark" in (tmp_path / "out" / "bench.md").read_text()
    assert (tmp_path / "out" / "latency_vs_n.png").stat().st_size > 1000
