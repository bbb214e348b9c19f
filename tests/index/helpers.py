"""A small corpus and store comparisons shared by the indexing tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kalm_rag.store import PassageStore, PooledPassage, passage_key

#: 13 rows, 11 distinct texts (rows 5 and 12 repeat earlier texts), of different lengths.
ROWS = [
    {"_id": str(i), "title": f"Title {i % 3}", "text": f"Passage {i} is about topic {i % 4}. " * (1 + i % 5)}
    for i in range(11)
]
ROWS.insert(5, dict(ROWS[2], _id="dup-a"))
ROWS.append(dict(ROWS[0], _id="dup-b"))
TEXTS = list(dict.fromkeys(r["text"] for r in ROWS))
assert len(ROWS) == 13 and len(TEXTS) == 11


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def entries_of(store: PassageStore, namespace: str, texts: list[str]) -> dict[str, PooledPassage]:
    keys = [passage_key(t) for t in texts]
    found = store.get_many(namespace, keys)
    missing = [t for t, e in zip(texts, found) if e is None]
    assert not missing, f"not in the store: {missing}"
    return {k: e for k, e in zip(keys, found) if e is not None}


def assert_same_entries(got: dict[str, PooledPassage], want: dict[str, PooledPassage]) -> None:
    """Same keys, same window counts, vectors within 1e-5 of the entry's largest absolute value."""
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert g.ratio == w.ratio and torch.equal(g.counts, w.counts), key
        assert g.vectors.shape == w.vectors.shape, key
        scale = float(w.vectors.float().abs().max())
        err = float((g.vectors.float() - w.vectors.float()).abs().max())
        assert err <= 1e-5 * scale, f"{key}: {err} > 1e-5 * {scale}"
