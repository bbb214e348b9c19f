"""``KALM_RAG_THREADS`` fixes torch's intra-op threads when a model is loaded (issue 26, threads under contention)."""

from __future__ import annotations

import pytest
import torch

from kalm_rag import InvalidInputError, Reranker
from kalm_rag.threads import THREADS_ENV, configured_threads, tokenizer_lock


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_loading_a_model_applies_the_variable(tiny_checkpoint, monkeypatch, restore_threads) -> None:
    torch.set_num_threads(2)
    monkeypatch.setenv(THREADS_ENV, "1")
    Reranker.from_pretrained(tiny_checkpoint)
    assert torch.get_num_threads() == 1


def test_unset_leaves_torch_alone(tiny_checkpoint, monkeypatch, restore_threads) -> None:
    torch.set_num_threads(2)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    Reranker.from_pretrained(tiny_checkpoint)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_value_is_refused_naming_the_variable(monkeypatch, value) -> None:
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(InvalidInputError, match=THREADS_ENV):
        configured_threads()


# ----- one tokenizer, several threads ------------------------------------------------------------------


def _race(first, second, rounds: int = 300) -> None:
    """Run ``first`` and ``second`` ``rounds`` times each, in two threads at once; re-raise the first failure."""
    import threading

    errors: list[BaseException] = []

    def loop(fn) -> None:
        try:
            for _ in range(rounds):
                fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(fn,)) for fn in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class _CheckedTokenizer:
    """Forwards to a tokenizer; each encoding call records whether its caller held the tokenizer's lock."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls: list[tuple[str, bool]] = []

    def _note(self, name: str) -> None:
        self.calls.append((name, tokenizer_lock(self)._is_owned()))

    def __call__(self, *args: object, **kwargs: object) -> object:
        self._note("__call__")
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        value = getattr(self.inner, name)
        if name not in ("encode", "encode_plus", "batch_encode_plus", "tokenize"):
            return value

        def checked(*args: object, **kwargs: object) -> object:
            self._note(name)
            return value(*args, **kwargs)

        return checked


@pytest.mark.parametrize("family", ["t5gemma2", "kalm-mini"])
def test_every_tokenizer_call_of_a_rerank_holds_the_tokenizer_lock(family, tiny_checkpoint) -> None:
    rr = Reranker.from_pretrained(tiny_checkpoint if family == "t5gemma2" else "kalm-mini", max_passage_tokens=48)
    checked = _CheckedTokenizer(rr.backend.tokenizer)
    rr.backend.tokenizer = checked
    passages = ["Paris is the capital of France. It lies on the Seine.", "Bananas are yellow. " * 30]
    rr.rerank("What is the capital of France?", passages, evidence=True, prune_mass=0.9)  # encodes, then reads
    rr.score("Which fruit is yellow?", passages)
    assert checked.calls, "the engine never tokenised through the backend's tokenizer"
    assert [name for name, held in checked.calls if not held] == []


@pytest.mark.parametrize("family", ["t5gemma2", "kalm-mini"])
def test_passages_stay_cut_while_another_thread_tokenises_a_query(family, tiny_checkpoint) -> None:
    # a fast tokenizer's truncation is state each call sets: unguarded, a query tokenised (uncut) in one thread
    # while passages are tokenised (cut) in another gives the passages the query's setting now and then
    from kalm_rag.prompt import cut_query

    rr = Reranker.from_pretrained(tiny_checkpoint if family == "t5gemma2" else "kalm-mini")
    backend, limit = rr.backend, 24
    passages = [f"word{i} " * 300 for i in range(8)]
    query = "a query " * 40

    def tokenise_passages() -> None:
        if family == "t5gemma2":
            lengths = [len(ids) for ids in backend.tokenize_passages(passages, limit)]
            lengths += [len(offsets) for offsets in backend.passage_offsets(passages, limit)]
        else:  # kalm-mini frames its passages itself; its lexical units read the tokenizer's cut directly
            backend._lexical_cache.clear()
            lengths = [len(units) for units in backend.passage_lexical_units(passages, limit)]
        assert max(lengths) <= limit

    _race(tokenise_passages, lambda: cut_query(backend.tokenizer, query, 1000))


def test_query_and_instruction_caches_stay_whole_under_many_threads(monkeypatch) -> None:
    # with a full cache every new query evicts the oldest: two threads evicting at once used to pop the same
    # key or iterate the dict while another thread changed it (RuntimeError / KeyError)
    import sys
    import time

    import kalm_rag.models.mini.backend as mini_backend

    backend = Reranker.from_pretrained("kalm-mini").backend
    monkeypatch.setattr(mini_backend, "QUERY_CACHE_SIZE", 2)

    def encode_segments(segments, prefix=()):  # the frozen encoder's states, faked: only the caches are tested
        return torch.zeros((len(segments), 1, backend.hidden_size)), torch.ones((len(segments), 1), dtype=torch.long)

    monkeypatch.setattr(backend, "encode_segments", encode_segments)

    class YieldingDict(dict):  # hands the GIL to another thread inside every pop: the races happen at once
        def pop(self, *args):
            time.sleep(0)
            return super().pop(*args)

    backend._query_cache, backend._instruction_cache = YieldingDict(), YieldingDict()
    errors: list[str] = []

    def work(thread: int) -> None:
        for i in range(1000):
            try:
                backend.query_states((thread, i))
                backend.stacked_query_states([(thread, i), (thread, i + 1)])
                backend.instruction_states((thread, i % 40))
            except Exception as exc:  # noqa: BLE001 (collected for the assertion)
                errors.append(type(exc).__name__)

    import threading

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: make the interleavings happen
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert errors == []
    assert len(backend._query_cache) <= 2 and len(backend._instruction_cache) <= 16


def test_a_copied_backend_has_its_own_cache_lock() -> None:
    import copy

    backend = Reranker.from_pretrained("kalm-mini").backend
    twin = copy.deepcopy(backend)
    assert twin._cache_lock is not backend._cache_lock
    assert twin._query_cache == backend._query_cache and twin._query_cache is not backend._query_cache


def test_a_child_forked_while_another_thread_held_the_locks_gets_its_own() -> None:
    # a fork copies only the forking thread: locks other threads held stay held in the child, and a thread pool
    # made before the fork has no threads there (torch itself is not fork-safe once it ran on several threads,
    # so the child only takes the locks and runs a task on the layout pool)
    import os
    import threading

    import kalm_rag.engine as engine

    rr = Reranker.from_pretrained("kalm-mini")
    assert engine._layout_pool().submit(int, "7").result(timeout=30) == 7  # the parent's pool has its thread
    held, release = threading.Event(), threading.Event()

    def hold_the_locks() -> None:
        with tokenizer_lock(rr.backend.tokenizer), rr.backend._cache_lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_locks)
    holder.start()
    held.wait(30)
    pid = os.fork()
    if pid == 0:  # the child: every step within a few seconds, or a non-zero exit says which failed
        code = 0
        if not tokenizer_lock(rr.backend.tokenizer).acquire(timeout=5):
            code = 1
        elif not rr.backend._cache_lock.acquire(timeout=5):
            code = 2
        else:
            try:
                code = 0 if engine._layout_pool().submit(int, "7").result(timeout=5) == 7 else 3
            except BaseException:
                code = 4
        os._exit(code)
    release.set()
    holder.join()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, os.WEXITSTATUS(status)
