"""``kalm_rag.index`` with the local engine: a real tiny checkpoint, real SQLite stores, no mocks of the engine."""

from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

from kalm_rag import Reranker
from kalm_rag.cli import app
from kalm_rag.errors import InvalidInputError, KalmError
from kalm_rag.index import REPORT_KEYS, IncompleteIndexError, index_corpus, passage_text
from kalm_rag.store import MemoryStore, passage_key
from kalm_rag.store.settings import StoreSettingsError
from kalm_rag.store.sqlite import SQLiteStore
from tests.index.helpers import ROWS, TEXTS, assert_same_entries, entries_of, write_jsonl
from tests.store.helpers import full_sqlite

runner = CliRunner()


def test_local_fills_the_store_and_the_query_side_does_no_encoder_work(tiny_checkpoint, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    report = index_corpus(corpus, model=tiny_checkpoint, store=url, batch_size=4)
    assert report.to_dict() == {
        **report.to_dict(),
        "read": len(ROWS),
        "unique": len(TEXTS),
        "already_present": 0,
        "encoded": len(TEXTS),
        "failed": 0,
        "engine": "local",
        "workers": 1,
    }
    assert tuple(report.to_dict()) == REPORT_KEYS and report.ok
    assert report.passages_per_s > 0 and report.seconds > 0

    # the query side, a fresh reranker on the same store: every passage is a hit, no encoder work at all
    rr = Reranker.from_pretrained(tiny_checkpoint, store=url)
    scores = rr.score("which topic?", TEXTS)
    assert len(scores) == len(TEXTS)
    assert rr.counters["encoded_passages"] == 0 and rr.counters["encoder_batches"] == 0
    assert rr.encode(TEXTS).already_present == len(TEXTS)
    rr.close()

    # the vectors are those Reranker.encode computes in process (another batch size: other padding)
    want = Reranker.from_pretrained(tiny_checkpoint, store=MemoryStore(), batch_size=3)
    want.encode(TEXTS)
    got = SQLiteStore(tmp_path / "p.db")
    assert_same_entries(entries_of(got, want.namespace, TEXTS), entries_of(want.store, want.namespace, TEXTS))
    got.close()


def test_rerun_does_no_repeated_work(tiny_checkpoint, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    store = SQLiteStore(tmp_path / "p.db")
    index_corpus(corpus, model=tiny_checkpoint, store=store)
    again = index_corpus(corpus, model=tiny_checkpoint, store=store)
    assert (again.read, again.unique, again.already_present, again.encoded, again.failed) == (
        len(ROWS),
        len(TEXTS),
        len(TEXTS),
        0,
        0,
    )


def test_an_interrupted_run_rerun_does_only_the_rest(tiny_checkpoint, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    store = SQLiteStore(tmp_path / "p.db")
    first = index_corpus(corpus, model=tiny_checkpoint, store=store, limit=5)
    firsts = list(dict.fromkeys(r["text"] for r in ROWS[:5]))
    assert (first.read, first.unique, first.encoded) == (5, len(firsts), len(firsts))

    # a crash in the middle (Ctrl-C after the second batch was written): what was stored stays
    calls = {"n": 0}
    put_many = store.put_many

    def put_then_interrupt(namespace, entries):
        put_many(namespace, entries)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    store.put_many = put_then_interrupt  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        index_corpus(corpus, model=tiny_checkpoint, store=store, batch_size=2)
    store.put_many = put_many  # type: ignore[method-assign]
    namespace = Reranker.from_pretrained(tiny_checkpoint).namespace
    stored = len(list(store.iter_keys(namespace)))
    assert stored == len(firsts) + 4  # two batches of 2 after the first run's passages

    rest = index_corpus(corpus, model=tiny_checkpoint, store=store, batch_size=2)
    assert rest.already_present == stored and rest.encoded == len(TEXTS) - stored and rest.failed == 0
    assert len(list(store.iter_keys(namespace))) == len(TEXTS)


def test_a_store_that_cannot_be_written_fails_loudly(tiny_checkpoint, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    store = full_sqlite(tmp_path / "full.db")  # SQLite's real "database or disk is full" on every write
    with pytest.raises(IncompleteIndexError, match=f"{len(TEXTS)} of {len(TEXTS)} passages were not stored") as err:
        index_corpus(corpus, model=tiny_checkpoint, store=store, batch_size=4)
    report = err.value.report
    assert report.failed == len(TEXTS) and report.encoded == 0 and not report.ok
    assert "full" in report.errors[0]
    assert isinstance(err.value, KalmError)
    loose = index_corpus(corpus, model=tiny_checkpoint, store=store, strict=False)
    assert loose.failed == len(TEXTS) and loose.unique == loose.already_present + loose.encoded + loose.failed


def test_the_command_prints_the_report_and_exits_non_zero_when_passages_are_not_stored(tiny_checkpoint, tmp_path):
    pytest.importorskip("redis")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    ok = runner.invoke(app, ["index", str(corpus), "-m", str(tiny_checkpoint), "--store", url, "--no-progress"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert list(report) == list(REPORT_KEYS)
    assert (report["read"], report["unique"], report["encoded"], report["failed"]) == (len(ROWS), len(TEXTS), 11, 0)

    down = "redis://127.0.0.1:1/0?connect_timeout=0.2"  # nothing listens on port 1: nothing can be stored
    bad = runner.invoke(app, ["index", str(corpus), "-m", str(tiny_checkpoint), "--store", down, "--no-progress"])
    assert bad.exit_code == 1
    assert json.loads(bad.stdout.strip().splitlines()[-1])["failed"] == len(TEXTS)
    assert f"{len(TEXTS)} passages not stored" in bad.stderr and "Traceback" not in bad.output


@pytest.mark.parametrize(
    ("content", "where", "what"),
    [
        ('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n', ":3:", "no 'text' field"),
        ('{"text": "a"}\n{"text": "b",\n', ":2:", "not JSON"),
        ('{"text": "a"}\n\n["text"]\n', ":3:", "must be a JSON object"),
        ('{"text": "a"}\n{"text": "  "}\n', ":2:", "empty 'text'"),
        ('{"text": "a"}\n{"text": 3}\n', ":2:", "must be a string"),
        ("", "", "empty file"),
    ],
    ids=["missing-field", "broken-json", "not-an-object", "blank-text", "number", "empty-file"],
)
def test_bad_input_names_the_file_and_line_and_leaves_the_store_untouched(
    tiny_checkpoint, tmp_path, content, where, what
):
    store = SQLiteStore(tmp_path / "p.db")
    reranker = Reranker.from_pretrained(tiny_checkpoint, store=store)
    reranker.encode(["A passage indexed before."])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(InvalidInputError, match=f"{bad}{where}.*{what}"):
        index_corpus(bad, model=tiny_checkpoint, store=store)
    assert list(store.iter_keys(reranker.namespace)) == [passage_key("A passage indexed before.")]

    fresh = tmp_path / "fresh.db"
    result = runner.invoke(app, ["index", str(bad), "--store", f"sqlite:///{fresh}", "-m", str(tiny_checkpoint)])
    assert result.exit_code == 1 and f"{bad}{where}" in result.stderr and "Traceback" not in result.output
    assert not fresh.exists()  # checked before the model loads and the store opens


def test_a_bad_row_late_in_the_corpus_stops_the_run_before_any_write(tiny_checkpoint, tmp_path):
    rows = ROWS * 3 + [{"_id": "x", "title": "no text"}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    store = SQLiteStore(tmp_path / "p.db")
    with pytest.raises(InvalidInputError, match=f"corpus.jsonl:{len(rows)}: no 'text' field"):
        index_corpus(corpus, model=tiny_checkpoint, store=store, batch_size=2)
    assert store.stats()["entries"] == 0


def test_csv_parquet_gzip_beir_folder_and_folder_inputs(tiny_checkpoint, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    half = len(ROWS) // 2
    pq.write_table(pa.Table.from_pylist(ROWS[:half]), folder / "a.parquet")
    pacsv.write_csv(pa.Table.from_pylist(ROWS[half:]), folder / "b.csv")
    (folder / "notes.txt").write_text("not a corpus file")
    store = SQLiteStore(tmp_path / "p.db")
    report = index_corpus(folder, model=tiny_checkpoint, store=store)
    assert (report.read, report.unique, report.encoded) == (len(ROWS), len(TEXTS), len(TEXTS))

    beir = tmp_path / "beir"
    beir.mkdir()
    with gzip.open(beir / "corpus.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in ROWS)
    write_jsonl(beir / "queries.jsonl", [{"_id": "q", "text": "a query, not a passage"}])
    again = index_corpus(beir, model=tiny_checkpoint, store=store)
    assert (again.read, again.already_present, again.encoded) == (len(ROWS), len(TEXTS), 0)

    (folder / "c.csv").write_text("_id,body\n1,no text column\n")
    with pytest.raises(InvalidInputError, match=r"c\.csv: row 1 \(line 2\): no 'text' field"):
        index_corpus(folder, model=tiny_checkpoint, store=store)


def test_title_field_uses_passage_text(tiny_checkpoint, tmp_path):
    assert passage_text("Paris", "  is the capital. ") == "Paris is the capital."
    assert passage_text(None, " text as is ") == " text as is "
    assert passage_text("   ", "text") == "text"
    rows = [{"title": "Paris", "text": "is the capital."}, {"text": "No title here."}, {"title": "", "text": "Nor."}]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    store = SQLiteStore(tmp_path / "p.db")
    index_corpus(corpus, model=tiny_checkpoint, store=store, title_field="title")
    namespace = Reranker.from_pretrained(tiny_checkpoint).namespace
    assert set(store.iter_keys(namespace)) == {
        passage_key("Paris is the capital."),
        passage_key("No title here."),
        passage_key("Nor."),
    }


def test_options_are_checked_before_any_work(tiny_checkpoint, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ROWS)
    for kwargs, match in (
        ({"engine": "spark"}, "engine must be one of"),
        ({"workers": 2}, "option of the Ray engine"),
        ({"batch_size": 0}, "batch_size"),
        ({"limit": 0}, "limit"),
        ({"text_field": ""}, "text_field"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            index_corpus(corpus, model=tiny_checkpoint, store=f"sqlite:///{tmp_path / 'p.db'}", **kwargs)
    with pytest.raises(InvalidInputError, match="does not exist"):
        index_corpus(tmp_path / "nope.jsonl", model=tiny_checkpoint, store=f"sqlite:///{tmp_path / 'p.db'}")
    with pytest.raises(KalmError, match="memory store"):
        index_corpus(corpus, model=tiny_checkpoint, store="memory://", engine="ray")
    assert not (tmp_path / "p.db").exists()


def test_passage_side_settings_match_the_query_side(tiny_checkpoint, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    settings = {"base_ratio": 4, "storage_dtype": "bfloat16", "max_passage_tokens": 64}
    assert index_corpus(corpus, model=tiny_checkpoint, store=url, **settings).encoded == len(TEXTS)
    rr = Reranker.from_pretrained(tiny_checkpoint, store=url, ratio=8, **settings)
    rr.score("which topic?", TEXTS)
    assert rr.counters["encoded_passages"] == 0  # same settings: every passage is a hit
    # settings left out are adopted from the store's record: same namespace, every passage a hit (issue 24, item 2)
    other = Reranker.from_pretrained(tiny_checkpoint, store=url)
    assert (other.base_ratio, other.storage, other.max_passage_tokens) == (4, "bfloat16", 64)
    assert other.settings_source == "store" and other.namespace == rr.namespace
    assert other.store.contains_many(other.namespace, [passage_key(t) for t in TEXTS]) == [True] * len(TEXTS)
    # a setting that contradicts the record is refused, naming it
    with pytest.raises(StoreSettingsError, match="base_ratio=4 \\(asked: 1\\)"):
        Reranker.from_pretrained(tiny_checkpoint, store=url, base_ratio=1)
    rr.close()
    other.close()


def test_index_corpus_has_no_test_hook_in_its_signature():
    # issue #23, item 17: faults are injected by the tests (monkeypatch, a failing store), not through the API
    import inspect

    assert not [p for p in inspect.signature(index_corpus).parameters if p.startswith("_")]


def test_the_progress_bar_moves_per_encoder_batch(tiny_checkpoint, tmp_path, monkeypatch):
    # issue #23, item 11: the bar once moved every 512 passages (and sat at 0% on a 199-passage corpus)
    import kalm_rag.index.local as local

    bars = []

    class RecordingBar:
        def __init__(self, *args, **kwargs):
            self.total, self.updates = kwargs.get("total"), []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(local, "tqdm", RecordingBar)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    index_corpus(corpus, model=tiny_checkpoint, store=SQLiteStore(tmp_path / "p.db"), batch_size=2)
    (bar,) = bars
    assert bar.total == len(TEXTS) and sum(bar.updates) == len(TEXTS)
    assert max(bar.updates) <= 2 and len(bar.updates) == -(-len(TEXTS) // 2)
