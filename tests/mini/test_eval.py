"""kalm-rag eval: resumable runs never mix scores of two models; metrics follow trec_eval (pytrec_eval)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kalm_rag.data import BeirDataset
from kalm_rag.eval.run import metrics, read_run, rerank_all

DS = BeirDataset(
    "toy",
    {"d1": "alpha", "d2": "beta", "d3": "gamma"},
    {"q1": "alpha?", "q2": "beta?"},
    {"q1": {"d1": 1}, "q2": {"d2": 1}},
    None,
    ["d1", "d2", "d3"],
)
CANDS = {"q1": ["d1", "d2", "d3"], "q2": ["d1", "d2", "d3"]}


class CountingScorer:
    """Scores a passage by a fixed table; counts calls."""

    def __init__(self, identity: str, table: dict[str, float]) -> None:
        self.identity, self.table, self.calls = identity, table, 0

    def __call__(self, query: str, passages: list[str]) -> list[float]:
        self.calls += 1
        return [self.table[p] for p in passages]


def test_a_run_resumes_for_the_same_model_and_restarts_for_another(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    first = CountingScorer("model-a", {"alpha": 1.0, "beta": 0.5, "gamma": 0.0})
    run = rerank_all("m", first, DS, CANDS, out)
    assert first.calls == 2 and read_run(out)[0] == "model-a"

    again = CountingScorer("model-a", {"alpha": 9.0, "beta": 9.0, "gamma": 9.0})
    assert rerank_all("m", again, DS, CANDS, out) == run and again.calls == 0  # resumed, nothing rescored

    other = CountingScorer("model-b", {"alpha": 0.0, "beta": 2.0, "gamma": 1.0})
    rerun = rerank_all("m", other, DS, CANDS, out)
    assert other.calls == 2 and rerun["q1"]["d2"] == 2.0 and read_run(out)[0] == "model-b"


def test_a_run_file_without_identity_is_not_trusted(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    out.write_text(json.dumps({"q1": {"d1": 5.0}, "q2": {"d1": 5.0}}))  # the old format: scores only
    scorer = CountingScorer("model-a", {"alpha": 1.0, "beta": 0.5, "gamma": 0.0})
    rerank_all("m", scorer, DS, CANDS, out)
    assert scorer.calls == 2


def test_metrics_rank_the_judged_document() -> None:
    perfect = {"q1": {"d1": 1.0, "d2": 0.0}, "q2": {"d2": 1.0, "d1": 0.0}}
    worst = {"q1": {"d1": 0.0, "d2": 1.0, "d3": 2.0}, "q2": {"d2": 0.0, "d1": 1.0, "d3": 2.0}}
    assert metrics(DS.qrels, perfect)["ndcg@10"] == pytest.approx(1.0)
    assert metrics(DS.qrels, worst)["mrr@10"] == pytest.approx(1 / 3)


def test_metrics_equal_a_hand_computed_reference() -> None:
    # q1: grades d1=2, d2=1; ranked d3 > d1 > d2 (d3 unjudged)
    #     DCG = 2/log2(3) + 1/log2(4); IDCG = 2/log2(2) + 1/log2(3); RR = 1/2
    # q2: grade d5=1, ranked 11th behind ten unjudged documents: nDCG@10 = 0 and RR@10 = 0 (RR would be 1/11)
    # q3: judged, absent from the run: counts as 0; q4: no positive judgement: left out of the mean
    qrels = {"q1": {"d1": 2, "d2": 1, "d9": 0}, "q2": {"d5": 1}, "q3": {"d1": 1}, "q4": {"d1": 0}}
    run = {
        "q1": {"d3": 3.0, "d1": 2.0, "d2": 1.0},
        "q2": {**{f"x{i:02d}": 10.0 - i / 100 for i in range(10)}, "d5": 0.5},
    }
    ndcg_q1 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3))
    got = metrics(qrels, run)
    assert got["ndcg@10"] == pytest.approx(ndcg_q1 / 3, abs=1e-6)
    assert got["mrr@10"] == pytest.approx(0.5 / 3, abs=1e-6)


def test_metrics_break_score_ties_like_trec_eval() -> None:
    # equal scores: trec_eval ranks by document id, descending ("b" before "a")
    assert metrics({"q": {"a": 1}}, {"q": {"a": 1.0, "b": 1.0}})["mrr@10"] == pytest.approx(0.5)
    assert metrics({"q": {"b": 1}}, {"q": {"a": 1.0, "b": 1.0}})["mrr@10"] == pytest.approx(1.0)


def _write_beir(folder: Path, *, qrels_name: str = "test.tsv") -> None:
    import gzip

    (folder / "qrels").mkdir(parents=True)
    docs = {
        "d1": "Paris is the capital of France.",
        "d2": "Bananas are yellow.",
        "d3": "Lyon is a city in France.",
        "d4": "The Seine flows through Paris.",
    }
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as fh:
        for i, t in docs.items():
            fh.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
    with gzip.open(folder / "queries.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"_id": "q1", "text": "capital of France"}) + "\n")
        fh.write(json.dumps({"_id": "q2", "text": "yellow fruit"}) + "\n")
    (folder / "qrels" / qrels_name).write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t3\nq1\td4\t1\nq2\td2\t2\nq2\td9\t3\n"
    )


def test_eval_sets_take_a_first_stage_run_file_and_the_official_qrels(tmp_path: Path) -> None:
    from kalm_rag.eval.run import load_eval_set

    folder = tmp_path / "trec-like"
    _write_beir(folder, qrels_name="test_full_official.tsv")
    (folder / "bm25.run.tsv").write_text(
        "query-id\tcorpus-id\trank\tscore\nq1\td3\t1\t9.0\nq1\td1\t2\t8.0\n"
        "q1\td2\t3\t1.0\nq2\td2\t1\t5.0\nq2\td9\t2\t4.0\n"
    )
    es = load_eval_set(folder, depth=2)
    assert es.qrels_file == "qrels/test_full_official.tsv"
    assert es.candidates == {"q1": ["d3", "d1"], "q2": ["d2"]}  # run order, cut to depth; d9 is not in the corpus
    assert es.first_stage["q1"] == {"d3": 9.0, "d1": 8.0}
    assert es.relevant_grade == 2  # a 0-3 scale: TREC's binary cut
    assert es.ds.qrels["q2"]["d9"] == 3  # judgements outside the candidates are kept (they lower the ideal DCG)


def test_evaluate_set_reports_metrics_and_the_calibration_of_model_scores(tmp_path: Path) -> None:
    from kalm_rag.eval.run import evaluate_set, load_eval_set

    folder = tmp_path / "toy"
    _write_beir(folder)
    es = load_eval_set(folder)
    assert es.first_stage_name.startswith("BM25") and es.relevant_grade == 2

    class LogitScorer:
        name, identity, ratio = "model r=4", "model@4", 4

        def __call__(self, query: str, passages: list[str]) -> list[float]:
            return [
                3.0 if ("France" in p and "capital" in query) or ("yellow" in p and "yellow" in query) else -3.0
                for p in passages
            ]

    result = evaluate_set(es, [LogitScorer()], tmp_path / "out")
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"BM25", "model r=4"}
    calib = rows["model r=4"]["calibration"]
    # relevant (grade >= 2): q1/d1 and q2/d2, both scored sigmoid(3) = 0.953; d3 ("Lyon ... France") also gets
    # 0.953 but is unjudged, so precision at 0.5 is 2/3 and recall 1
    assert calib["positives"] == 2
    assert calib["recall_at_05"] == pytest.approx(1.0) and calib["precision_at_05"] == pytest.approx(2 / 3)
    assert calib["mean_score_relevant"] == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-6)


def test_eval_run_scores_any_model_through_the_reranker(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """An official-format (T5Gemma 2) checkpoint: BM25, cosine and the model at each ratio in one table per run."""
    from typer.testing import CliRunner

    from kalm_rag import Reranker
    from kalm_rag.cli import app

    folder = tmp_path / "toy"
    _write_beir(folder)
    out = tmp_path / "out"
    argv = [
        "eval",
        "run",
        str(folder),
        "--out",
        str(out),
        "--model",
        str(tiny_checkpoint),
        "--ratios",
        "1,4",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "eval.json").read_text())
    rows = {r["method"]: r for r in saved["results"][0]["rows"]}
    name = tiny_checkpoint.name
    assert set(rows) == {"BM25", "all-MiniLM-L6-v2 cosine", f"{name} r=1", f"{name} r=4"}
    assert "calibration" in rows[f"{name} r=4"] and "| toy | 2 |" in (out / "eval.md").read_text()
    # the saved scores are what the public API returns
    scores = json.loads((out / "toy" / f"{name.lower()}-r-4.json").read_text())["scores"]
    rr = Reranker.from_pretrained(str(tiny_checkpoint))
    docs = sorted(scores["q1"])
    texts = [
        {
            "d1": "Paris is the capital of France.",
            "d2": "Bananas are yellow.",
            "d3": "Lyon is a city in France.",
            "d4": "The Seine flows through Paris.",
        }[d]
        for d in docs
    ]
    want = rr.score("capital of France", texts, ratio=4, return_margin=True)
    assert [scores["q1"][d] for d in docs] == pytest.approx(want, abs=1e-5)


def test_cosine_from_kalm_minis_stored_states_equals_encoding_again() -> None:
    from kalm_rag import Reranker
    from kalm_rag.eval.rerankers import CosineScorer

    passages = [
        "Paris is the capital of France.",
        "The Eiffel Tower was built for the 1889 World's Fair. " * 40,  # ~560 tokens: past MiniLM's 256
        "Photosynthesis turns light into chemical energy.",
    ]
    rr = Reranker.from_pretrained("kalm-mini", base_ratio=1, storage="float32")  # what kalm-rag eval opens
    rr.encode(passages)
    direct = CosineScorer()
    stored = CosineScorer(stored_from=rr)
    assert set(stored.stored_embeddings(passages)) == set(passages)  # read from the store, not encoded
    want = direct("What is the capital of France?", passages)
    got = stored("What is the capital of France?", passages)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5
    coarse = Reranker(rr.backend, base_ratio=2)  # pooled states are not token states: encode directly
    coarse.encode(passages)
    assert CosineScorer(stored_from=coarse).stored_embeddings(passages) == {}


def test_the_calibration_table_says_na_where_no_score_reaches_one_half(tmp_path: Path) -> None:
    from kalm_rag.eval.run import evaluate_set, load_eval_set, markdown_tables

    folder = tmp_path / "toy"
    _write_beir(folder)
    es = load_eval_set(folder)

    class LowScorer:  # every P(yes) below 0.5: precision at 0.5 is undefined, not a number
        name, identity, ratio = "model r=4", "model@4", 4

        def __call__(self, query: str, passages: list[str]) -> list[float]:
            return [-3.0 - i for i, _ in enumerate(passages)]

    result = evaluate_set(es, [LowScorer()], tmp_path / "out")
    table = markdown_tables([result], title="toy", calibration_method="model r=4")
    row = next(line for line in table.splitlines() if line.startswith(f"| {result['dataset']} | ") and "n/a" in line)
    assert "nan" not in table and "| 0.000 |" in row  # recall is defined (0), precision is not


def test_the_calibration_json_stores_an_undefined_share_as_null(tmp_path: Path) -> None:
    """Issue #23, item 16: NaN is not JSON; an undefined precision is null in eval.json."""
    from kalm_rag.eval.run import evaluate_set, load_eval_set

    folder = tmp_path / "toy"
    _write_beir(folder)

    class LowScorer:  # every P(yes) below 0.5: nothing is predicted relevant, so precision is undefined
        name, identity, ratio = "model r=4", "model@4", 4

        def __call__(self, query: str, passages: list[str]) -> list[float]:
            return [-3.0] * len(passages)

    result = evaluate_set(load_eval_set(folder), [LowScorer()], tmp_path / "out")
    calib = next(r for r in result["rows"] if r["method"] == "model r=4")["calibration"]
    assert calib["precision_at_05"] is None and calib["recall_at_05"] == 0.0
    assert json.loads(json.dumps(result, allow_nan=False))["rows"][1]["calibration"]["precision_at_05"] is None


def test_eval_run_with_max_queries_encodes_only_their_candidates(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Issue #23, item 12: --max-queries 1 encodes the first query's candidates, not the whole corpus."""
    from typer.testing import CliRunner

    from kalm_rag.cli import app
    from kalm_rag.eval.run import evaluated_queries, load_eval_set
    from kalm_rag.store.sqlite import SQLiteStore

    folder = tmp_path / "pools"
    _write_beir(folder)
    (folder / "candidates.tsv").write_text("query-id\tcorpus-id\nq1\td1\nq1\td3\nq2\td2\nq2\td4\n")
    first = evaluated_queries(load_eval_set(folder), max_queries=1)
    assert first == ["q1"]
    argv = ["eval", "run", str(folder), "--out", str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    argv += ["--ratios", "4", "--no-cosine", "--max-queries", "1", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    store = SQLiteStore(tmp_path / "cache" / "eval" / "passages.db")
    assert store.stats()["entries"] == 2  # d1 and d3 (q1's pool); d2 and d4 were never encoded
    store.close()
