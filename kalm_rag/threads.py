"""Threads: the number of intra-op threads torch uses on CPU (chosen deliberately, not left to torch's default),
and the lock that makes a tokenizer safe to call from several threads.

Small operations (a decoder call over a few cached passages) split across threads wait for every sibling
thread; on a busy host a descheduled sibling stalls the whole call (on a shared 2-core machine one cached
passage took 965 ms with 2 threads and 44 ms with 1). The rule:

- the library reads ``KALM_RAG_THREADS`` when it loads a model (``KALM_RAG_THREADS=1`` inside a busy host,
  e.g. a web app with its own workers); unset, torch's default stands (all cores: fastest on an idle machine
  for large batches);
- ``kalm-rag serve`` sets ``--threads`` per worker process, by default CPU cores / ``--workers``, so that
  worker processes never compete for the same cores.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import torch

from kalm_rag.errors import InvalidInputError

#: The environment variable the library reads for its thread count.
THREADS_ENV = "KALM_RAG_THREADS"


def configured_threads() -> int | None:
    """The thread count ``KALM_RAG_THREADS`` asks for, or ``None`` when it is unset or empty.

    Raises:
        InvalidInputError: it is set to anything but a positive integer.
    """
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise InvalidInputError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return threads


def apply_thread_setting() -> int:
    """Set torch's intra-op threads from ``KALM_RAG_THREADS`` when it is set; return the count in use."""
    threads = configured_threads()
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


_TOKENIZER_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_TOKENIZER_LOCKS_GUARD = threading.Lock()


def _new_tokenizer_locks() -> None:
    """In a forked child: a lock another thread of the parent held at the fork would stay held for ever."""
    global _TOKENIZER_LOCKS, _TOKENIZER_LOCKS_GUARD
    _TOKENIZER_LOCKS, _TOKENIZER_LOCKS_GUARD = weakref.WeakKeyDictionary(), threading.Lock()


os.register_at_fork(after_in_child=_new_tokenizer_locks)


def tokenizer_lock(tokenizer: Any) -> threading.RLock:
    """The lock to hold around every call of ``tokenizer`` (one per tokenizer object).

    A fast tokenizer keeps its truncation setting as state that each call first sets: two threads calling it
    with different limits (a passage cut at ``max_passage_tokens``, a query not cut) can each encode with the
    other's, so a passage comes back longer than its limit, silently. Calls are short; holding the lock costs
    only their overlap.
    """
    with _TOKENIZER_LOCKS_GUARD:
        lock = _TOKENIZER_LOCKS.get(tokenizer)
        if lock is None:
            lock = _TOKENIZER_LOCKS[tokenizer] = threading.RLock()
        return lock
