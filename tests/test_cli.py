"""The kalm-rag command line, driven through typer's CliRunner."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from kalm_rag import Reranker
from kalm_rag.cli import app

runner = CliRunner()


def test_rerank_jsonl(tiny_checkpoint, tmp_path):
    passages = ["Paris is the capital of France.", {"id": "b", "text": "Bananas are yellow."}, "The Seine."]
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"query": "capital of France?", "passages": passages}) + "\n\n")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["rerank", "-i", str(requests), "-m", str(tiny_checkpoint), "-k", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and len(rows[0]["results"]) == 2
    texts = [p if isinstance(p, str) else p["text"] for p in passages]
    want = Reranker.from_pretrained(tiny_checkpoint).rerank("capital of France?", texts, top_k=2)
    assert [r["index"] for r in rows[0]["results"]] == [r.index for r in want]
    assert [r["score"] for r in rows[0]["results"]] == pytest.approx([r.score for r in want], abs=1e-6)
    ids = {r["index"]: r["id"] for r in rows[0]["results"]}
    assert all(ids[i] == ("b" if i == 1 else i) for i in ids)


def test_rerank_reports_bad_lines_in_one_line(tiny_checkpoint, tmp_path):
    requests = tmp_path / "bad.jsonl"
    requests.write_text('{"query": "q"}\n')
    result = runner.invoke(app, ["rerank", "-i", str(requests), "-m", str(tiny_checkpoint)])
    assert result.exit_code == 1
    assert "needs 'query' and 'passages'" in result.output


def test_rerank_reports_a_bad_model(tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"query": "q", "passages": ["p"]}) + "\n")
    result = runner.invoke(app, ["rerank", "-i", str(requests), "-m", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "Error:" in result.output
