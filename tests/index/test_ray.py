"""``kalm_rag.index`` with the Ray engine, on a real local Ray (``ray.init(num_cpus=2)``) started and stopped here."""

from __future__ import annotations

import os

import pytest

from kalm_rag import Reranker
from kalm_rag.errors import InvalidInputError
from kalm_rag.index import index_corpus
from kalm_rag.store.sqlite import SQLiteStore
from tests.index.helpers import ROWS, TEXTS, assert_same_entries, entries_of, write_jsonl

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting one takes seconds), shut down at the end."""
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def _index_local_and_ray(tiny_checkpoint, tmp_path, **ray_kwargs):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    local = SQLiteStore(tmp_path / "local.db")
    index_corpus(corpus, model=tiny_checkpoint, store=local, batch_size=4)
    report = index_corpus(
        corpus,
        model=tiny_checkpoint,
        store=f"sqlite:///{tmp_path / 'ray.db'}",
        engine="ray",
        batch_size=2,
        **ray_kwargs,
    )
    return corpus, local, SQLiteStore(tmp_path / "ray.db"), report


def test_ray_fills_the_store_as_the_local_engine_does(local_ray, tiny_checkpoint, tmp_path):
    corpus, local, stored, report = _index_local_and_ray(tiny_checkpoint, tmp_path, workers=1)
    d = report.to_dict()
    assert (d["read"], d["unique"], d["already_present"], d["encoded"], d["failed"]) == (
        len(ROWS),
        len(TEXTS),
        0,
        11,
        0,
    )
    assert (d["engine"], d["workers"]) == ("ray", 1)
    namespace = Reranker.from_pretrained(tiny_checkpoint).namespace
    assert sorted(stored.iter_keys(namespace)) == sorted(local.iter_keys(namespace))
    assert_same_entries(entries_of(stored, namespace, TEXTS), entries_of(local, namespace, TEXTS))


def test_a_bad_corpus_fails_before_ray_starts_or_the_store_is_created(tiny_checkpoint, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text"}])
    db = tmp_path / "ray.db"
    with pytest.raises(InvalidInputError, match=r"bad\.jsonl:2: no 'text' field"):
        index_corpus(bad, model=tiny_checkpoint, store=f"sqlite:///{db}", engine="ray")
    assert not db.exists()  # read and checked before the store is opened (and before a Ray is started)


@pytest.mark.slow
def test_two_workers(local_ray, tiny_checkpoint, tmp_path):
    corpus, local, stored, report = _index_local_and_ray(tiny_checkpoint, tmp_path, workers=2)
    assert (report.encoded, report.failed, report.workers) == (len(TEXTS), 0, 2)
    namespace = Reranker.from_pretrained(tiny_checkpoint).namespace
    assert_same_entries(entries_of(stored, namespace, TEXTS), entries_of(local, namespace, TEXTS))

    again = index_corpus(corpus, model=tiny_checkpoint, store=f"sqlite:///{tmp_path / 'ray.db'}", engine="ray")
    assert (again.already_present, again.encoded, again.failed) == (len(TEXTS), 0, 0)
    assert ray.is_initialized()  # a Ray this process had joined is left running


@pytest.mark.slow
def test_a_killed_actor_is_retried_by_ray_without_losing_or_duplicating_entries(
    local_ray, tiny_checkpoint, tmp_path, monkeypatch
):
    from kalm_rag.index import ray_engine

    marker = str(tmp_path / "killed")

    class DiesAfterItsSecondWrite(ray_engine._Encoder):  # defined here: Ray ships it to the actors by value
        """The first actor exits abruptly after its second store write, as a SIGKILL or an OOM kill would."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            store, done = self.reranker.store, [0]
            put_many = store.put_many

            def put_then_maybe_die(*a, **k):
                put_many(*a, **k)
                done[0] += 1
                if done[0] >= 2 and not os.path.exists(marker):
                    with open(marker, "w") as fh:
                        fh.write(str(os.getpid()))
                    os._exit(1)  # no cleanup, no exception

            store.put_many = put_then_maybe_die

    monkeypatch.setattr(ray_engine, "_Encoder", DiesAfterItsSecondWrite)
    _, local, stored, report = _index_local_and_ray(tiny_checkpoint, tmp_path, workers=1)
    marker = tmp_path / "killed"
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # an actor did die
    assert report.failed == 0 and report.unique == len(TEXTS)
    # the retried batch found the entries written before the kill: they count as present, not encoded again
    assert report.already_present + report.encoded == len(TEXTS) and report.already_present >= 1
    namespace = Reranker.from_pretrained(tiny_checkpoint).namespace
    assert len(list(stored.iter_keys(namespace))) == len(TEXTS)  # keyed by text: a retry cannot duplicate
    assert_same_entries(entries_of(stored, namespace, TEXTS), entries_of(local, namespace, TEXTS))
