"""What a new user meets in the first hour (issue #23): the demo, help, one-line errors, early checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kalm_rag.cli import DEMO_EXAMPLES, SCORE_NOTE, app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - {"the", "a", "of", "is", "in", "and", "its", "their", "do"}


# ----- item 1 and 2: the demo says what the score means and where the right answer is -------------------------


def test_the_demo_examples_are_varied_and_each_has_a_lexical_distractor():
    assert len({e.query for e in DEMO_EXAMPLES}) >= 3
    for e in DEMO_EXAMPLES:
        assert e.answer != e.distractor and {e.answer, e.distractor} <= set(range(len(e.passages)))
        # the distractor shares two or more of the query's words without answering it
        assert len(_words(e.query) & _words(e.passages[e.distractor])) >= 2, e.query


def test_the_demo_explains_the_score_and_marks_each_right_answer(tiny_checkpoint):
    result = runner.invoke(app, ["demo", "-m", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert SCORE_NOTE in result.output and "probability" in SCORE_NOTE and "calibrated" in SCORE_NOTE
    marked = [line for line in result.output.splitlines() if re.match(r"^ \*\d+\. \[\d\.\d{3}\] ", line)]
    assert sorted(line.split("] ", 1)[1] for line in marked) == sorted(e.passages[e.answer] for e in DEMO_EXAMPLES)


# ----- item 3: a misspelt store URL fails before the model loads, with the nearest scheme ---------------------


def test_a_store_url_typo_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    import kalm_rag.engine as engine
    from kalm_rag import Reranker, StoreConfigError

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the store URL was checked")

    monkeypatch.setattr(engine, "load_backend", no_load)
    with pytest.raises(StoreConfigError, match=r"did you mean sqlite://\?"):
        Reranker.from_pretrained("kalm-mini", store=f"sqllite:///{tmp_path / 'x.db'}")
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"query": "q", "passages": ["p"]}) + "\n")
    for argv in (["rerank", "-i", str(requests)], ["demo"]):
        result = runner.invoke(app, [*argv, "--store", "reddis://localhost:6379/0"])
        assert result.exit_code == 1, result.output
        assert "did you mean redis://?" in result.output and len(result.output.strip().splitlines()) == 2


# ----- item 4: one JSON-lines reader, one message for text that is not UTF-8 ----------------------------------


def test_rerank_and_index_name_the_file_and_line_of_text_that_is_not_utf8(tmp_path):
    good = json.dumps({"query": "q", "passages": ["p"]}).encode()
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(good + b"\n" + good + b"\n" + '{"query": "caf\xe9", "passages": ["p"]}\n'.encode("latin-1"))
    result = runner.invoke(app, ["rerank", "-i", str(bad), "-m", str(tmp_path / "never-loaded")])
    assert result.exit_code == 1
    assert f"Error: {bad}:3: not UTF-8 text" in result.output  # the line, not the first line of the block
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    result = runner.invoke(app, ["index", str(corpus), "--store", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 1 and f"Error: {corpus}:2: not UTF-8 text" in result.output
    result = runner.invoke(app, ["rerank", "-i", "-"], input=b"\xff\xfe\n")
    assert result.exit_code == 1 and "Error: stdin:1: not UTF-8 text" in result.output


# ----- item 5: every command line error is one line ------------------------------------------------------------


def test_eval_run_on_a_folder_without_a_corpus_is_one_line_and_loads_no_model(tmp_path):
    empty = tmp_path / "not-beir"
    empty.mkdir()
    env = {**os.environ, "KALM_RAG_DEBUG": "", "KALM_RAG_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "kalm_rag", "eval", "run", str(empty), "--out", str(tmp_path / "out"), "--no-cosine"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"Error: no corpus.jsonl[.gz] in {empty}",
        "Set KALM_RAG_DEBUG=1 for the full traceback.",
    ]
    assert not (tmp_path / "cache" / "eval").exists()  # failed before the model and its store


def test_a_data_set_whose_files_are_one_folder_down_is_pointed_to(tmp_path):
    from kalm_rag.data import load_beir

    (tmp_path / "wikiqa" / "test").mkdir(parents=True)  # the shared WikiQA keeps its test split one level down
    (tmp_path / "wikiqa" / "test" / "corpus.jsonl").write_text('{"_id": "d1", "text": "Paris."}\n')
    with pytest.raises(FileNotFoundError, match=r"did you mean .*wikiqa/test\?"):
        load_beir(tmp_path / "wikiqa")


# ----- item 6: an index into a store that vanishes at exit is refused -----------------------------------------


@pytest.mark.parametrize("url", ["memory://", "memory://?max_bytes=1GB", "MEMORY://"])
def test_index_refuses_a_memory_store(tmp_path, url):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "Paris is the capital of France."}\n')
    result = runner.invoke(app, ["index", str(corpus), "--store", url])
    assert result.exit_code == 1
    assert "lost at exit" in result.output and "sqlite:///" in result.output
    assert "{" not in result.output  # no success report


# ----- item 10: help is instant (nothing heavy imported), -h works, examples keep their lines -----------------


def test_help_imports_neither_torch_nor_transformers():
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from kalm_rag.cli import app\n"
        "for argv in (['--help'], ['-h'], ['eval', '--help'], ['train', '--help'], ['index', '--help']):\n"
        "    result = CliRunner().invoke(app, argv)\n"
        "    assert result.exit_code == 0, (argv, result.output)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'kalm_rag.engine') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_kalm_rag_exports_load_on_first_use():
    probe = (
        "import sys, kalm_rag\n"
        "assert 'torch' not in sys.modules\n"
        "from kalm_rag import EncodeReport, KalmError, NotStoredError\n"
        "assert 'torch' not in sys.modules\n"
        "from kalm_rag import Reranker, PassageStore\n"
        "import kalm_rag.engine\n"
        "assert Reranker is kalm_rag.engine.Reranker and EncodeReport is kalm_rag.engine.EncodeReport\n"
        "assert set(kalm_rag.__all__) <= set(dir(kalm_rag))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv", [["-h"], ["index", "-h"], ["eval", "run", "-h"], ["train", "-h"]])
def test_dash_h_is_help(argv):
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")


@pytest.mark.parametrize("group", ["train", "eval"])
def test_group_examples_keep_one_command_per_line(group):
    result = runner.invoke(app, [group, "--help"])
    assert result.exit_code == 0, result.output
    examples = [line.strip() for line in result.output.splitlines() if line.strip().startswith(f"kalm-rag {group} ")]
    assert len(examples) >= 2, result.output
    assert all(line.count("kalm-rag ") == 1 for line in examples), result.output
