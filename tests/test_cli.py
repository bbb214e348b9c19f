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
    assert all(ids[i] == ("b" if i == 1 else str(i)) for i in ids)  # always a string (issue #15, item 13)


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


def test_version_and_python_m(tmp_path):
    import subprocess
    import sys

    import kalm_rag

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"kalm-rag {kalm_rag.__version__}"
    done = subprocess.run([sys.executable, "-m", "kalm_rag", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"kalm-rag {kalm_rag.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["train", "mini", "--help"], ["eval", "--help"]])
def test_help_has_no_type_noise_nor_rest_markup(argv):
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "``" not in result.output
    assert "e883e0c" not in result.output


def test_demo_refuses_to_run_without_its_model(tmp_path):
    result = runner.invoke(app, ["demo", "-m", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "Error: cannot load the model" in result.output and "random" not in result.output


def test_bench_reports_a_missing_tokenizer_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    result = runner.invoke(app, ["bench", "--out", "report", "--workdir", str(work), "--tokenizer", "../nowhere"])
    assert result.exit_code == 1
    assert result.output.count("\n") <= 2 and "is not a tokenizer folder" in result.output
    result = runner.invoke(app, ["bench", "--out", "report", "--workdir", str(work)])  # nano shape, no tokenizer
    assert result.exit_code == 1 and "needs the Gemma 3 tokenizer" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no workdir, no report, no docs/benchmarks


def test_report_writing_commands_need_an_explicit_destination():
    for argv in (["bench"], ["eval", "run", "."], ["train", "export", "."]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2 and "Missing option" in result.output, argv


def test_train_mini_defaults_are_train_config_and_the_shipped_recipe():
    import typer

    from kalm_rag.train.config import TrainConfig

    group = typer.main.get_command(app)
    defaults = {p.name: p.default for p in group.commands["train"].commands["mini"].params}
    cfg = TrainConfig()
    for name in (
        "steps",
        "groups_per_step",
        "negatives",
        "random_negatives",
        "dev_candidates",
        "distill",
        "lr",
        "new_module_lr",
        "warmup",
        "eval_every",
        "dev_max_queries",
        "max_minutes",
        "seed",
        "echo_probability",
    ):
        assert defaults[name] == getattr(cfg, name), name
    assert defaults["ratios"] == "1,4" and defaults["extra_ratios"] == "2,8,16,32"
    # the recipe of the shipped kalm-mini 1.0 (its training.json records the same values)
    assert (cfg.steps, cfg.lr, cfg.new_module_lr, cfg.warmup, cfg.eval_every) == (1500, 1e-4, 1e-3, 100, 300)
    assert (cfg.ratios, cfg.extra_ratios, cfg.dev_candidates, cfg.dev_max_queries) == ([1, 4], [2, 8, 16, 32], 100, 50)
    assert (cfg.groups_per_step, cfg.negatives, cfg.random_negatives, cfg.max_passage_tokens) == (4, 7, 2, 512)
    assert cfg.source_weights == {"squad": 0.6, "medquad": 0.25, "wiki": 0.15}
    ce = {p.name: p.default for p in group.commands["train"].commands["cross-encoder"].params}
    assert ce["steps"] == TrainConfig.cross_encoder().steps == 1200 and TrainConfig.cross_encoder().ratios == []


# ----- issue #15, item 13: input errors name their line, and leave no partial output ---------------------


def _requests(tmp_path, *rows) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"query": "q", "passages": ["p"], "topk": 2}, "in.jsonl:3: unknown key(s) ['topk']"),
        ({"query": "q", "passages": ["p", ""]}, "in.jsonl:3: passages[1] is empty"),
        ({"query": "q", "passages": [{"id": "a"}]}, "in.jsonl:3: passages[0] must be {'text': ..., 'id': ...}"),
        ({"query": "q", "passages": "p"}, "in.jsonl:3: passages must be a list"),
        ({"query": "", "passages": ["p"]}, "in.jsonl:3: query is empty"),
        ({"query": "q", "passages": ["p"], "top_k": 0}, "in.jsonl:3: top_k must be an int >= 1"),
        ({"query": "q", "passages": [{"text": "p", "id": [1]}]}, "in.jsonl:3: passages[0] id must be a str or an int"),
    ],
)
def test_rerank_checks_every_line_first_and_names_the_bad_one(tiny_checkpoint, tmp_path, bad, message):
    good = {"query": "capital of France?", "passages": ["Paris.", "Bananas."]}
    out = tmp_path / "out.jsonl"
    result = runner.invoke(
        app, ["rerank", "-i", _requests(tmp_path, good, good, bad), "-m", str(tiny_checkpoint), "-o", str(out)]
    )
    assert result.exit_code == 1
    assert message in result.output, result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no partial output


def test_an_engine_error_names_its_line_and_leaves_no_partial_output(tiny_checkpoint, tmp_path, monkeypatch):
    from kalm_rag.errors import NumericalError

    calls = []
    real = Reranker.rerank

    def fail_on_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise NumericalError("non-finite scores (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Reranker, "rerank", fail_on_the_second)
    good = {"query": "capital of France?", "passages": ["Paris.", "Bananas."]}
    out = tmp_path / "out.jsonl"
    path = _requests(tmp_path, good, good, good)
    result = runner.invoke(app, ["rerank", "-i", path, "-m", str(tiny_checkpoint), "-o", str(out)])
    assert result.exit_code == 1
    assert "in.jsonl:2: non-finite scores (simulated)" in result.output, result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_lines_top_k_wins_over_the_option_as_the_help_says(tiny_checkpoint, tmp_path):
    assert "a line's top_k wins" in runner.invoke(app, ["rerank", "--help"]).output
    rows = [
        {"query": "q", "passages": ["a", "b", "c"], "top_k": 1},
        {"query": "q", "passages": ["a", {"text": "b", "id": 7}, "c"]},
    ]
    out = tmp_path / "out.jsonl"
    args = ["rerank", "-i", _requests(tmp_path, *rows), "-m", str(tiny_checkpoint), "-k", "2", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert len(first["results"]) == 1 and len(second["results"]) == 2
    ids = {r["index"]: r["id"] for r in second["results"]}
    assert all(isinstance(i, str) for i in ids.values()) and ids.get(1, "7") == "7"


def test_a_mistyped_model_name_fails_at_once_with_a_suggestion(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    result = runner.invoke(app, ["demo", "-m", "kalm-mni"])
    assert result.exit_code == 1 and time.monotonic() - start < 2.0
    assert "Did you mean 'kalm-mini'?" in result.output and "random" not in result.output
