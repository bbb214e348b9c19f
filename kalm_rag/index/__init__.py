"""Bulk pre-encoding of a corpus into the passage store: ``kalm-rag index`` and :func:`index_corpus`.

FBNL pays off when every passage is encoded once, ahead of queries. This package reads a corpus (a BEIR
``corpus.jsonl[.gz]``, JSON lines, CSV/TSV, Parquet, or a folder of them), checks every row before anything is
written, and encodes the passages missing from the store: in this process (``engine="local"``) or in an actor
pool on Ray (``engine="ray"``, one machine or a cluster, ``pip install "kalm-rag[ray]"``). Reruns skip what is
stored, so an interrupted run resumes where it stopped.

The passage of a row is its text field alone, exactly what the framework adapters and the service send for the
same document, so that an indexed passage is a store hit from every entry point; with a title field it is
:func:`passage_text` of the title and the text, the same join the adapters use for a document with a title.

Example:
    >>> from kalm_rag.index import index_corpus
    >>> index_corpus("corpus.jsonl.gz", store="sqlite:///passages.db").to_dict()  # doctest: +SKIP
    {'read': 5183, 'unique': 5183, 'already_present': 0, 'encoded': 5183, 'failed': 0, 'seconds': 61.2, ...}
"""

from kalm_rag.data import passage_text
from kalm_rag.index.indexer import index_corpus
from kalm_rag.index.report import REPORT_KEYS, IncompleteIndexError, IndexReport

__all__ = ["REPORT_KEYS", "IncompleteIndexError", "IndexReport", "index_corpus", "passage_text"]
