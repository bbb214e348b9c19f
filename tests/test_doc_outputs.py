"""The outputs the README and the docs show are what the code prints today, with the embedded kalm-mini (#23).

The examples are run here (in process: the service returns ``Reranker.rerank``'s scores, checked by
``tests/serve/test_api.py``) and every number the documents show for them is compared with the run's.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kalm_rag import Reranker
from kalm_rag.cli import app

ROOT = Path(__file__).resolve().parents[1]
FRANCE = "What is the capital of France?"


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def mini() -> Reranker:
    return Reranker.from_pretrained("kalm-mini")


def json_scores(text: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf'"{key}": ?([0-9.]+(?:e-?[0-9]+)?)', text)]


def test_the_demo_output_in_getting_started_is_what_the_demo_prints():
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() in read("docs/getting-started.md")


def test_the_demo_prints_no_progress_bars_even_when_kalm_rag_logs_at_info():
    logger = logging.getLogger("kalm_rag")
    before = logger.level
    logger.setLevel(logging.INFO)  # what an earlier caller (or a verbose application) may have left behind
    try:
        result = CliRunner().invoke(app, ["demo"])
    finally:
        logger.setLevel(before)
    assert result.exit_code == 0, result.output
    assert "Encoding passages" not in result.output
    assert result.output.strip() in read("docs/getting-started.md")


def test_the_readme_shows_the_scores_of_its_own_examples(mini):
    readme = read("README.md")
    passages = ["Paris is the capital of France.", "Bananas are yellow.", "Lyon is in France."]
    for r in mini.rerank(FRANCE, passages, top_k=2):  # the Use section's loop
        assert f"# {r.index} {round(r.score, 3)} {r.text}\n" in readme
    # the command line example (top_k 2 of three passages) and the service example (two documents)
    cli = mini.rerank(FRANCE, ["Paris is the capital of France.", "Bananas are yellow.", "Lyon is a city in France."])
    serve = mini.rerank(FRANCE, ["Paris is the capital of France.", "Bananas are yellow."])
    documented = json_scores(readme, "score") + json_scores(readme, "relevance_score")
    want = [r.score for r in cli[:2]] + [r.score for r in serve]
    assert documented == pytest.approx(want, abs=1e-4)


def test_serve_md_shows_the_scores_the_service_returns(mini):
    doc = read("docs/serve.md")
    three = ["Paris is the capital of France.", "Bananas are yellow.", "Lyon is a city in France."]
    for passages in (three, three[:2]):  # LangChain's CohereRerank (top_n 2 of 3), LlamaIndex's (2 of 2)
        for r in mini.rerank(FRANCE, passages, top_k=2):
            assert f"# {round(r.score, 3)} {r.text}\n" in doc
    v2 = mini.rerank(FRANCE, three[:2], top_k=1)
    tei = mini.rerank("capital of France?", ["Paris is the capital of France.", "Bananas."])
    assert json_scores(doc, "relevance_score") == pytest.approx([r.score for r in v2], abs=1e-4)
    assert json_scores(doc, "score") == pytest.approx([r.score for r in tei], abs=1e-4)


def test_the_shipped_kalm_mini_version_is_named_alike_everywhere():
    card = read("kalm_rag/weights/kalm-mini/README.md")
    version = re.match(r"# kalm-mini (\d+\.\d+) ", card).group(1)
    pyproject = re.findall(r"kalm-mini (\d+\.\d+) weights", read("pyproject.toml"))
    readme = re.findall(r"`kalm-mini` (\d+\.\d+) ", read("README.md"))
    assert pyproject and readme and set(pyproject + readme) == {version}
