"""kalm_rag.data: one module of corpus readers (JSON lines, CSV/TSV, Parquet, BEIR) for eval, train and indexing."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from kalm_rag.data import Passage, load_beir, read_csv, read_parquet, read_passages, read_rows
from kalm_rag.errors import InvalidInputError, MissingDependencyError

ROWS = [
    {"_id": "007", "title": "Paris", "text": "Paris is the capital of France."},
    {"_id": "2", "title": "", "text": "Bananas are yellow."},
]
EXPECTED = [Passage("007", "Paris Paris is the capital of France."), Passage("2", "Bananas are yellow.")]


def test_jsonl_csv_tsv_and_parquet_give_the_same_passages(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "c.csv").write_text(
        '_id,title,text\n007,Paris,"Paris is the capital of France."\n2,,Bananas are yellow.\n'
    )
    with gzip.open(tmp_path / "c.tsv.gz", "wt") as fh:
        fh.write("_id\ttitle\ttext\n007\tParis\tParis is the capital of France.\n2\t\tBananas are yellow.\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.jsonl.gz", "c.csv", "c.tsv.gz", "c.parquet"):
        assert list(read_passages(tmp_path / name)) == EXPECTED, name  # ids stay text: "007", not 7


def test_readers_take_columns_and_other_field_names(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc": ["a", "b"], "body": ["x", "y"], "extra": [1, 2]}), tmp_path / "p.parquet")
    assert list(read_parquet(tmp_path / "p.parquet", columns=["doc"])) == [{"doc": "a"}, {"doc": "b"}]
    assert [p.text for p in read_passages(tmp_path / "p.parquet", id_field="doc", text_fields=["body"])] == ["x", "y"]
    (tmp_path / "s.csv").write_text("a;b\n1;2\n")
    assert list(read_csv(tmp_path / "s.csv", delimiter=";")) == [{"a": "1", "b": "2"}]


def test_bad_rows_and_unknown_formats_are_named(tmp_path: Path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"_id": "1", "text": "  "}) + "\n")
    with pytest.raises(InvalidInputError, match=r"c.jsonl: row 1 \(id '1'\) has no text"):
        list(read_passages(tmp_path / "c.jsonl"))
    (tmp_path / "n.jsonl").write_text(json.dumps({"text": "t"}) + "\n")
    with pytest.raises(InvalidInputError, match="row 1 has no '_id' field"):
        list(read_passages(tmp_path / "n.jsonl"))
    with pytest.raises(InvalidInputError, match="cannot tell the format"):
        read_rows(tmp_path / "c.xml")


def test_csv_and_parquet_without_pyarrow_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    (tmp_path / "c.csv").write_text("_id,text\n1,x\n")
    for reader, path in ((read_csv, tmp_path / "c.csv"), (read_parquet, tmp_path / "c.parquet")):
        with pytest.raises(MissingDependencyError, match=r'pip install "kalm-rag\[data\]"'):
            list(reader(path))


def test_a_beir_folder_loads_with_its_candidates(tmp_path: Path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "capital?"}) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t007\t2\n")
    (tmp_path / "candidates.tsv").write_text("query-id\tcorpus-id\nq1\t2\nq1\t007\n")
    ds = load_beir(tmp_path)
    assert ds.corpus == {p.id: p.text for p in EXPECTED}
    assert ds.queries == {"q1": "capital?"} and ds.qrels == {"q1": {"007": 2}}
    assert ds.candidates == {"q1": ["2", "007"]}
