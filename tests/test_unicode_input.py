"""Lone surrogates (JSON's ``"\\ud800"`` escape) are refused the same way everywhere, naming the argument: the
Python API (InvalidInputError), the CLI (one line naming file:line) and the store key (never UnicodeEncodeError).
The service's answer (422 naming the field) is tested in tests/serve/test_api.py.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kalm_rag import InvalidInputError, Reranker
from kalm_rag.cli import app
from kalm_rag.store.base import passage_key

BAD = "ok \ud800 text"


@pytest.fixture(scope="module")
def rr(tiny_checkpoint) -> Reranker:
    return Reranker.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda rr: rr.score(BAD, ["a passage"]), "query"),
        (lambda rr: rr.score("q", ["a passage", BAD]), r"passages\[1\]"),
        (lambda rr: rr.score("q", ["a passage"], instruction=BAD), "instruction"),
        (lambda rr: rr.rerank("q", [BAD]), r"passages\[0\]"),
        (lambda rr: rr.rerank(BAD, ["a passage"]), "query"),
        (lambda rr: rr.encode(["fine", BAD]), r"passages\[1\]"),
    ],
)
def test_python_api_names_the_argument(rr, call, argument):
    with pytest.raises(InvalidInputError, match=rf"{argument} holds a lone surrogate \(\\ud800 at character 3\)"):
        call(rr)


def test_passage_key_never_raises_and_keeps_valid_keys():
    import hashlib

    assert passage_key("Paris é") == hashlib.sha256("Paris é".encode()).hexdigest()
    assert passage_key(BAD) != passage_key("ok  text")  # no UnicodeEncodeError, and a key of its own


def test_cli_rerank_names_the_line(tiny_checkpoint, tmp_path):
    requests = tmp_path / "in.jsonl"
    good = json.dumps({"query": "q", "passages": ["p"]})
    bad = json.dumps({"query": "q", "passages": ["p", BAD]})  # ensure_ascii: the file holds the \ud800 escape
    requests.write_text(f"{good}\n{bad}\n")
    result = CliRunner().invoke(app, ["rerank", "-i", str(requests), "-m", str(tiny_checkpoint)])
    assert result.exit_code == 1
    first = result.output.splitlines()[0]
    assert first.startswith(f"Error: {requests}:2: passages[1] holds a lone surrogate"), result.output
    assert "Traceback" not in result.output
