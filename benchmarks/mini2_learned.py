"""kalm-mini 2.0 design study: a LEARNED per-passage fusion of kalm-mini's signals with an echo signal.

``mini2_fusion.py`` measured hand-weighted fusions; its only per-passage (calibratable) design, ``kalm + a * lexn``,
loses query-echo cases (an echo passage repeats the question and does not answer it). Here a tiny model
``g(features) -> logit`` is trained with a listwise softmax loss on licence-clean TRAINING lists (SQuAD train
with its hard negatives, extra-train's four sources, plus synthetic echo negatives built from those training
questions), on features that are all per (query, passage), i.e. list-independent:

- ``kalm``: kalm-mini 1.1's calibrated logit at r=4; ``dec``: the same with the encoder-cosine weight at 0;
  ``cos``: MiniLM's cosine; ``lexn``: BM25 over word pieces with the shipped IDF, divided by ``sum idf``
  (all four exactly as ``mini2_fusion.py score``/``fuse`` compute them);
- echo signals (new): ``run``, the longest contiguous run of the query's word pieces (punctuation left out)
  found verbatim in the passage, as a share of the query's pieces (1.0 for a passage that restates the
  question); ``qshare``, the share of the passage's pieces that are query pieces; ``plen``, log passage length;
- query features: ``question`` (``mini2_fusion.is_question``), ``qlen`` (log query length); they enter only
  through products with the passage features (a per-query constant does not change a ranking).

Steps:

    python benchmarks/mini2_learned.py score --data-dir ../shared/data --out runs/mini2-learned --threads 1
    python benchmarks/mini2_learned.py fit ../shared/data/{squad/dev,wikiqa/test,scifact,nfcorpus,trec-dl-2019,\\
        medline_med,cranfield} --train runs/mini2-learned --out runs/mini2 --max-queries 60 \\
        --lexical-stats runs/mini2/pieces --select scifact,nfcorpus,wikiqa,squad
    python benchmarks/mini2_learned.py cases --train runs/mini2-learned --lexical-stats runs/mini2/pieces

``score`` builds the training lists (seeded) and caches the model signals of every (query, passage) pair;
``check`` compares that scoring with ``mini2_fusion.py score``'s cache on a few evaluation queries; ``fit`` trains
every variant on the training lists and evaluates it on the evaluation sets' cached signals (those of
``mini2_fusion.py score``); ``cases`` runs the echo/ranking/demo cases; ``table`` prints the documentation's table
and the leave-one-domain-out choice among variants (selection sets only); ``candidate`` writes one variant's
folder. Results: docs/benchmarks/mini2-experiments.md, "Learned fusion with an echo signal".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mini2_fusion import (  # noqa: E402
    QUESTION_WORDS,
    decoder_alone,
    ece,
    encode_passages,
    is_question,
    load_signals,
    ndcg,
)

logger = logging.getLogger("mini2_learned")


# ----- echo features -----------------------------------------------------------------------------------

_WORDY = re.compile(r"[0-9a-z]")


def wh_fronted(query: str) -> bool:
    """The query opens with a question word or auxiliary ("who wrote ...", "is there ..."): a restatement of
    it from its first word is an echo, not an answer (an answer drops the question word)."""
    words = re.findall(r"[a-z]+", query.lower())
    return bool(words) and words[0] in QUESTION_WORDS


class EchoFeatures:
    """Per (query, passage) word-piece features that tell a restated question from an answer, and ``lexn``."""

    def __init__(self, lexical: Any) -> None:
        self.lex = lexical  # mini2_fusion's LexicalScorer (pieces, shipped IDF)
        tok = lexical.tokenizer
        pieces = tok.convert_ids_to_tokens(list(range(tok.vocab_size)))
        self.punct = {i for i, p in enumerate(pieces) if not _WORDY.search(str(p).lower())}

    def _seq(self, ids: list[int]) -> str:
        # pieces as characters: a verbatim run of pieces is a substring, found by C-speed ``in``
        return "".join(chr(0x100 + i) for i in ids if i not in self.punct)

    def features(self, query: str, passages: list[str]) -> dict[str, np.ndarray]:
        q_ids = self.lex.ids([query], 512)[0]
        p_ids = self.lex.ids(passages, self.lex.max_tokens)
        q = self._seq(q_ids)
        qset = set(q)
        run, prun, share, plen = [], [], [], []
        for ids in p_ids:
            p = self._seq(ids)
            best = 0
            for i in range(len(q)):  # longest substring of q starting at i that occurs in p
                j = i + best + 1
                while j <= len(q) and q[i:j] in p:
                    best = j - i
                    j += 1
            run.append(best / max(len(q), 1))
            j = 0  # the longest prefix of q (from the question word on) that occurs in p
            while j < len(q) and q[: j + 1] in p:
                j += 1
            prun.append(j / max(len(q), 1))
            share.append(sum(c in qset for c in p) / max(len(p), 1))
            plen.append(math.log1p(len(p)) / 6.0)
        lexn = self.lex.scores(query, passages, normalised=True)
        n = len(passages)
        return {
            "run": np.asarray(run),
            "prun": np.asarray(prun),
            "qshare": np.asarray(share),
            "plen": np.asarray(plen),
            "lexn": np.asarray(lexn),
            "question": np.full(n, float(is_question(query))),
            "whq": np.full(n, float(wh_fronted(query))),
            "qlen": np.full(n, math.log1p(len(q)) / 3.0),
        }


# ----- step 1: training lists and their model signals -------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def first_sentence(text: str, max_words: int = 30) -> str:
    s = _SENTENCE.split(text.strip(), maxsplit=1)[0]
    return " ".join(s.split()[:max_words])


def echo_passage(query: str, filler: str, rng: random.Random) -> str:
    """A passage that restates the question and adds a sentence on the topic that does not answer it
    (the filler: a hard negative's first sentence). Built from TRAINING questions only.
    """
    q = query.strip()
    if not q.endswith("?"):
        q = q[0].upper() + q[1:] + "?"
    sentence = first_sentence(filler)
    return f"{q} {sentence}" if rng.random() < 0.75 else f"{sentence} {q}"


def build_lists(data_dir: Path, per_source: int, squad_queries: int, seed: int) -> list[dict[str, Any]]:
    """Training lists ``{source, query, passages, labels}``: the positive(s) first, negatives, an echo negative
    for question-like queries. Every source is licence-clean training data (issue 25's list)."""
    from kalm_rag.data import load_beir, read_jsonl

    rng = random.Random(seed)
    lists: list[dict[str, Any]] = []
    squad = load_beir(data_dir / "squad" / "train", "train")
    negs = {r["query-id"]: r["neg"] for r in read_jsonl(data_dir / "squad" / "train" / "hard_negatives.jsonl.gz")}
    qids = sorted(q for q in negs if q in squad.qrels and q in squad.queries)
    for qid in rng.sample(qids, squad_queries):
        pos = [d for d, g in squad.qrels[qid].items() if g > 0][:1]
        neg = [d for d in negs[qid] if d not in pos][:7]
        lists.append(
            {
                "source": "squad",
                "query": squad.queries[qid],
                "passages": [squad.corpus[d] for d in pos + neg],
                "labels": [1] * len(pos) + [0] * len(neg),
            }
        )
    for folder in sorted((data_dir / "extra-train").glob("*/")):
        rows = [r for r in read_jsonl(folder / "train.jsonl.gz") if r.get("pos")]
        rows = rng.sample(rows, min(per_source, len(rows)))
        pool = sorted({p for r in rows for p in r["pos"]})
        for r in rows:
            pos = r["pos"][:1]
            neg = [p for p in r.get("neg", []) if p not in r["pos"]][:7]
            if len(neg) < 3:  # nq_qed has none, tatqa one: other queries' positives of the same source
                others = [p for p in pool if p not in r["pos"]]
                neg += rng.sample(others, min(5 - len(neg), len(others)))
            lists.append(
                {
                    "source": folder.name,
                    "query": r["query"],
                    "passages": pos + neg,
                    "labels": [1] * len(pos) + [0] * len(neg),
                }
            )
    for row in lists:
        if is_question(row["query"]) and len(row["passages"]) > 1:
            filler = rng.choice([p for p, y in zip(row["passages"], row["labels"]) if not y])
            row["passages"].append(echo_passage(row["query"], filler, rng))
            row["labels"].append(0)
            row["echo"] = len(row["passages"]) - 1
    return lists


def score_training(args: argparse.Namespace) -> None:
    from kalm_rag.engine import Reranker
    from kalm_rag.eval.rerankers import CosineScorer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "train_lists.json"
    if file.is_file():
        lists = json.loads(file.read_text())
    else:
        lists = build_lists(Path(args.data_dir), args.per_source, args.squad_queries, args.seed)
        file.write_text(json.dumps(lists))
    logger.info("%d training lists, %d passages", len(lists), sum(len(r["passages"]) for r in lists))
    rr = Reranker.from_pretrained(
        args.model, store=f"sqlite:///{(out / 'passages.db').resolve()}?memory_tier=1GB", show_progress_bar=False
    )
    cosine = CosineScorer(stored_from=rr)
    sig_file = out / "train_signals.json"
    saved: dict[str, Any] = json.loads(sig_file.read_text()) if sig_file.is_file() else {}
    t0 = time.time()
    todo = [i for i in range(len(lists)) if str(i) not in saved]
    for start in range(0, len(todo), args.chunk):
        chunk = todo[start : start + args.chunk]
        encode_passages(rr, sorted({p for i in chunk for p in lists[i]["passages"]}), args.encode_dtype)
        for i in chunk:
            row = lists[i]
            saved[str(i)] = {
                "kalm": rr.score(row["query"], row["passages"], ratio=4, return_margin=True),
                "dec": decoder_alone(rr, row["query"], row["passages"], 4),
                "cos": cosine(row["query"], row["passages"]),
            }
        cosine._emb.clear()
        tmp = sig_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved))
        tmp.replace(sig_file)
        logger.info("%d/%d lists scored, %.0f s", len(saved), len(lists), time.time() - t0)
    rr.close()


def check_signals(args: argparse.Namespace) -> None:
    """Score a few evaluation queries as ``score`` scores the training lists (a fresh store, the same encoding
    dtype) and compare with ``mini2_fusion.py score``'s cached signals."""
    import tempfile

    from kalm_rag.engine import Reranker
    from kalm_rag.eval.rerankers import CosineScorer
    from kalm_rag.eval.run import load_eval_set

    torch.set_num_threads(args.threads)
    es = load_eval_set(args.dataset)
    saved = json.loads((Path(args.out) / "scores" / f"{es.name}.json").read_text())["queries"]
    with tempfile.TemporaryDirectory() as tmp:
        rr = Reranker.from_pretrained(args.model, store=f"sqlite:///{tmp}/p.db", show_progress_bar=False)
        cosine = CosineScorer(stored_from=rr)
        for qid in list(saved)[: args.queries]:
            texts = [es.ds.corpus[d] for d in saved[qid]["docs"]]
            encode_passages(rr, texts, args.encode_dtype)
            query = es.ds.queries[qid]
            mine = {
                "kalm_r4": rr.score(query, texts, ratio=4, return_margin=True),
                "dec_r4": decoder_alone(rr, query, texts, 4),
                "cos": cosine(query, texts),
            }
            for k, v in mine.items():
                a, b = np.asarray(v), np.asarray(saved[qid][k])
                print(
                    f"{es.name} {qid} {k}: |difference| to the cache max {np.max(np.abs(a - b)):.2e} "
                    f"mean {np.mean(np.abs(a - b)):.2e}; Pearson {np.corrcoef(a, b)[0, 1]:.5f}; "
                    f"same top-10 {len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10]))}/10"
                )
        rr.close()


# ----- step 2: the learned fusion -----------------------------------------------------------------------

BASE = ["kalm", "dec", "cos", "lexn"]
ECHO = ["run", "qshare", "plen"]
L4 = BASE + ECHO + ["lexn*question", "cos*question", "run*question", "qshare*question", "lexn*run"]


def design_matrix(sig: dict[str, np.ndarray], inputs: list[str]) -> np.ndarray:
    """``(N, F)`` features; ``a*b`` names a product of two signals."""
    cols = []
    for name in inputs:
        if "*" in name:
            a, b = name.split("*")
            cols.append(sig[a] * sig[b])
        else:
            cols.append(sig[name])
    return np.stack(cols, axis=1).astype(np.float32)


VARIANTS: dict[str, dict[str, Any]] = {
    "L1 linear kalm, lexn (learned kalm+a*lexn)": {"inputs": ["kalm", "lexn"]},
    "L2 linear kalm, dec, cos, lexn": {"inputs": BASE},
    "L3 L2 + echo (run, qshare, plen)": {"inputs": BASE + ECHO},
    "L4 L3 + products with question, lexn*run": {"inputs": L4},
    "L4 without echo negatives": {
        "inputs": L4,
        "no_echo": True,
    },
    "L4 without SQuAD train (kalm was trained on it)": {
        "inputs": L4,
        "no_squad": True,
    },
    "L5 kalm, dec, cos, lexn + prefix echo (prun, plen, lexn*prun), echo negatives in 30% of lists": {
        "inputs": BASE + ["prun", "plen", "lexn*prun"],
        "echo_share": 0.3,
    },
    "L5, echo negatives in every question list": {"inputs": BASE + ["prun", "plen", "lexn*prun"]},
    "L5 without SQuAD train": {"inputs": BASE + ["prun", "plen", "lexn*prun"], "echo_share": 0.3, "no_squad": True},
    "L6 L5 + run, qshare (30% echo)": {
        "inputs": BASE + ["prun", "plen", "lexn*prun", "run", "qshare"],
        "echo_share": 0.3,
    },
    "L1 without echo negatives": {"inputs": ["kalm", "lexn"], "no_echo": True},
    "L7 L4 + prun*question (30% echo)": {"inputs": L4 + ["prun*question"], "echo_share": 0.3},
    "L7, echo negatives in every question list": {"inputs": L4 + ["prun*question"]},
    "L7 without echo negatives": {"inputs": L4 + ["prun*question"], "no_echo": True},
    "S1 staged: L1 (kalm, lexn) without echo negatives, then an echo penalty on prun*question": {
        "inputs": ["kalm", "lexn"],
        "staged": "prun*question",
    },
    "S2 staged: L2 (kalm, dec, cos, lexn), then prun*question": {"inputs": BASE, "staged": "prun*question"},
    "S4 staged: L4, then prun*question": {"inputs": L4, "staged": "prun*question"},
    "S0w mini2_fusion's kalm+10*lexn (its LODO choice), then a learned prun*whq penalty": {
        "inputs": ["kalm", "lexn"],
        "fixed": [1.0, 10.0],
        "staged": "prun*whq",
    },
    "S1w staged: L1, then prun*whq (wh-fronted queries only)": {"inputs": ["kalm", "lexn"], "staged": "prun*whq"},
    "S2w staged: L2, then prun*whq": {"inputs": BASE, "staged": "prun*whq"},
    "S4w staged: L4, then prun*whq": {"inputs": L4, "staged": "prun*whq"},
    "S0r kalm+10*lexn, then a learned run*whq penalty (any verbatim run, not only from the question word)": {
        "inputs": ["kalm", "lexn"],
        "fixed": [1.0, 10.0],
        "staged": "run*whq",
    },
    "S2r staged: L2, then run*whq": {"inputs": BASE, "staged": "run*whq"},
    "S4r staged: L4, then run*whq": {"inputs": L4, "staged": "run*whq"},
    "L7w L4 + prun*whq (30% echo)": {"inputs": L4 + ["prun*whq"], "echo_share": 0.3},
    "M1 MLP 16 hidden on L3's inputs + question, qlen": {"inputs": BASE + ECHO + ["question", "qlen"], "hidden": 16},
}


class Fusion(torch.nn.Module):
    def __init__(self, n_in: int, hidden: int, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        if hidden:
            self.net: torch.nn.Module = torch.nn.Sequential(
                torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
            )
        else:
            self.net = torch.nn.Linear(n_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std).squeeze(-1)


def train_variant(
    lists: list[tuple[np.ndarray, np.ndarray]], hidden: int, l2: float, seed: int = 0, steps: int = 300
) -> Fusion:
    """Listwise softmax cross-entropy (the positive against its list), L2 on the weights, full-batch L-BFGS."""
    torch.manual_seed(seed)
    allx = np.concatenate([x for x, _ in lists])
    model = Fusion(allx.shape[1], hidden, allx.mean(0), allx.std(0) + 1e-6)
    # pad lists to one tensor: (Q, K, F) with a mask
    K = max(len(y) for _, y in lists)
    X = torch.zeros(len(lists), K, allx.shape[1])
    Y = torch.zeros(len(lists), K)
    M = torch.zeros(len(lists), K, dtype=torch.bool)
    for i, (x, y) in enumerate(lists):
        X[i, : len(y)] = torch.from_numpy(x)
        Y[i, : len(y)] = torch.from_numpy(y.astype(np.float32))
        M[i, : len(y)] = True
    Y = Y / Y.sum(1, keepdim=True)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = model(X).masked_fill(~M, -1e9)
        loss = -(Y * torch.log_softmax(logits, 1)).sum(1).mean() + l2 * sum((w**2).sum() for w in weights)
        loss.backward()
        return loss

    opt.step(closure)
    return model


def train_staged(rows: list[dict[str, Any]], spec: dict[str, Any], l2: float) -> Fusion:
    """A linear fusion of ``spec["inputs"]`` fitted WITHOUT echo negatives, then one more weight, on the echo
    feature ``spec["staged"]`` only, fitted on the lists that hold an echo negative with the first fit frozen
    (the echo penalty cannot move the ranking weights). Returned as one linear :class:`Fusion` over
    ``inputs + [staged]``.
    """
    if "fixed" in spec:  # a hand-weighted first stage (its weights chosen elsewhere), only the penalty learned
        n = len(spec["inputs"])
        first = Fusion(n, 0, np.zeros(n), np.ones(n))
        with torch.no_grad():
            first.net.weight.copy_(torch.tensor([spec["fixed"]], dtype=torch.float32))
            first.net.bias.zero_()
    else:
        first = train_variant(variant_data(rows, {**spec, "no_echo": True}), 0, l2)
    name = spec["staged"]
    echo_rows = [r for r in rows if "echo" in r]
    X = [design_matrix(r["sig"], spec["inputs"]) for r in echo_rows]
    with torch.no_grad():
        base = [first(torch.from_numpy(x)) for x in X]
    extra = [torch.from_numpy(design_matrix(r["sig"], [name])[:, 0]) for r in echo_rows]
    targets = [torch.from_numpy(r["y"] / r["y"].sum()).float() for r in echo_rows]
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            torch.stack([-(t * torch.log_softmax(b + w * e, 0)).sum() for b, e, t in zip(base, extra, targets)]).mean()
            + l2 * (w**2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    n = len(spec["inputs"])
    model = Fusion(n + 1, 0, np.append(first.mean.numpy(), 0.0), np.append(first.std.numpy(), 1.0))
    linear = first.net
    assert isinstance(linear, torch.nn.Linear)
    with torch.no_grad():
        model.net.weight.copy_(torch.cat([linear.weight, w.detach().view(1, 1)], dim=1))
        model.net.bias.copy_(linear.bias)
    return model


def training_lists(folder: Path, lexical: Any) -> list[dict[str, Any]]:
    """Training lists with every signal (model signals cached by ``score``, echo features computed here)."""
    lists = json.loads((folder / "train_lists.json").read_text())
    saved = json.loads((folder / "train_signals.json").read_text())
    feats = EchoFeatures(lexical)
    out = []
    for i, row in enumerate(lists):
        if str(i) not in saved:
            continue
        sig = {k: np.asarray(v, dtype=np.float64) for k, v in saved[str(i)].items()}
        sig.update(feats.features(row["query"], row["passages"]))
        out.append({**row, "sig": sig, "y": np.asarray(row["labels"], dtype=np.float64)})
    return out


def variant_data(rows: list[dict[str, Any]], spec: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    data = []
    for i, r in enumerate(rows):
        if spec.get("no_squad") and r["source"] == "squad":
            continue
        keep = np.ones(len(r["y"]), dtype=bool)
        if "echo" in r and (spec.get("no_echo") or i % 10 >= round(10 * spec.get("echo_share", 1.0))):
            keep[r["echo"]] = False
        x = design_matrix(r["sig"], spec["inputs"])[keep]
        data.append((x, r["y"][keep]))
    return data


def eval_signals(args: argparse.Namespace, lexical: Any) -> dict[str, dict[str, Any]]:
    """``mini2_fusion.load_signals`` plus the echo features (texts from the evaluation sets)."""
    import pickle

    from kalm_rag.eval.run import load_eval_set

    cache = Path(args.train) / f"eval_signals_{args.max_queries}.pkl"
    if cache.is_file():
        cached: dict[str, dict[str, Any]] = pickle.loads(cache.read_bytes())
        return cached
    data = load_signals(args)
    feats = EchoFeatures(lexical)
    for folder in args.datasets:
        es = load_eval_set(folder)
        if es.name not in data:
            continue
        for qid, v in data[es.name]["queries"].items():
            f = feats.features(es.ds.queries[qid], [es.ds.corpus[d] for d in v["docs"]])
            assert np.allclose(f["lexn"], v["sig"]["lexn"], atol=1e-5)  # the same lexn as mini2_fusion's
            v["sig"].update({k: x for k, x in f.items() if k != "lexn"})
            v["sig"]["kalm"], v["sig"]["dec"] = v["sig"]["kalm_r4"], v["sig"]["dec_r4"]
    cache.write_bytes(pickle.dumps(data))
    return data


def apply(model: Fusion, sig: dict[str, np.ndarray], inputs: list[str]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(design_matrix(sig, inputs))).double().numpy()


def platt(data_set: dict[str, Any], logits: dict[str, np.ndarray]) -> tuple[float, float]:
    from kalm_rag.train.calibrate import fit_temperature_and_bias

    xs = [float(x) for q in data_set["queries"] for x in logits[q]]
    ys = [
        int(v["grades"].get(d, 0) >= data_set["relevant_grade"])
        for v in data_set["queries"].values()
        for d in v["docs"]
    ]
    return fit_temperature_and_bias(xs, ys)


def fit(args: argparse.Namespace) -> None:
    from kalm_rag.models.mini.lexical import LexicalScorer

    torch.set_num_threads(args.threads)
    t0 = time.time()
    lexical = LexicalScorer.from_pretrained(args.model, stats=args.lexical_stats)
    rows = training_lists(Path(args.train), lexical)
    logger.info("%d training lists with features (%.0f s)", len(rows), time.time() - t0)
    data = eval_signals(args, lexical)
    logger.info("evaluation signals (%.0f s)", time.time() - t0)
    select = [s for s in args.select.split(",") if s in data]
    sets = list(data)
    results: dict[str, Any] = {"sets": sets, "select": select, "queries": {n: data[n]["n"] for n in sets}}
    results["train_lists"] = {
        "lists": len(rows),
        "passages": sum(len(r["y"]) for r in rows),
        "per_source": {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"] for r in rows})},
        "echo_negatives": sum("echo" in r for r in rows),
    }
    # references: kalm-mini 1.1 and the hand-weighted kalm + 10 lexn of mini2_fusion
    refs = {"kalm_r4 (1.1)": lambda s: s["kalm"], "cos": lambda s: s["cos"], "kalm+10*lexn": None}
    results["variants"] = []
    for name, fn in refs.items():
        f = fn or (lambda s: s["kalm"] + 10.0 * s["lexn"])
        logits = {n: {q: f(v["sig"]) for q, v in data[n]["queries"].items()} for n in sets}
        results["variants"].append(evaluate(name, None, data, logits, select, 0.0))
    models: dict[str, Any] = {}
    for name, spec in VARIANTS.items():
        lists = variant_data(rows, spec)
        if not lists:
            continue
        inputs = spec["inputs"] + ([spec["staged"]] if "staged" in spec else [])
        for l2 in args.l2:
            t1 = time.time()
            if "staged" in spec:
                model = train_staged(rows, spec, l2)
            else:
                model = train_variant(lists, spec.get("hidden", 0), l2)
            spec = {**spec, "all_inputs": inputs}
            logits = {n: {q: apply(model, v["sig"], inputs) for q, v in data[n]["queries"].items()} for n in sets}
            label = f"{name}, l2={l2:g}"
            res = evaluate(label, spec, data, logits, select, time.time() - t1)
            res["params"] = {k: v.tolist() for k, v in model.state_dict().items()}
            results["variants"].append(res)
            models[label] = (model, spec)
            logger.info(
                "%s: mean %.4f, held-out %.4f (%.1f s)", label, res["mean"], res["heldout_mean"], res["seconds"]
            )
    # choice among the learned variants by leave-one-domain-out on the selection sets
    learned = [v for v in results["variants"] if v["spec"] is not None]
    lodo = {}
    for held in select:
        others = [n for n in select if n != held]
        best = max(learned, key=lambda v: float(np.mean([v["ndcg"][n] for n in others])))
        lodo[held] = {"variant": best["name"], "ndcg": best["ndcg"][held]}
    final = max(learned, key=lambda v: float(np.mean([v["ndcg"][n] for n in select])))
    results["lodo"] = {
        "folds": lodo,
        "lodo_mean": float(np.mean([v["ndcg"] for v in lodo.values()])),
        "final": final["name"],
    }
    out = Path(args.train)
    (out / "learned_r4.json").write_text(json.dumps(results, indent=2) + "\n")
    torch.save(
        {
            k: {"state": m.state_dict(), "inputs": s["all_inputs"], "hidden": s.get("hidden", 0)}
            for k, (m, s) in models.items()
        },
        out / "learned_models.pt",
    )
    print(markdown(results))
    logger.info("fit done in %.0f s", time.time() - t0)


def evaluate(
    name: str,
    spec: dict[str, Any] | None,
    data: dict[str, dict[str, Any]],
    logits: dict[str, dict[str, np.ndarray]],
    select: list[str],
    seconds: float,
) -> dict[str, Any]:
    sets = list(data)
    report = [n for n in sets if n not in select]
    scores = {n: ndcg(data[n], logits[n]) for n in sets}
    a, b = platt(data["squad"], logits["squad"]) if "squad" in data else (1.0, 0.0)
    return {
        "name": name,
        "spec": spec,
        "ndcg": scores,
        "mean": float(np.mean([scores[n] for n in sets])),
        "select_mean": float(np.mean([scores[n] for n in select])),
        "heldout_mean": float(np.mean([scores[n] for n in report])) if report else None,
        "platt_squad": [a, b],
        "ece": {n: ece(data[n], {q: a * x + b for q, x in logits[n].items()}) for n in sets},
        "ece_raw": {n: ece(data[n], logits[n]) for n in sets},
        "seconds": seconds,
    }


def markdown(results: dict[str, Any]) -> str:
    sets = results["sets"]
    lines = [
        "| variant | selection mean | " + " | ".join(sets) + " | mean (7) | held-out mean | ECE (Platt on squad) |",
        "|---|---|" + "---|" * len(sets) + "---|---|---|",
    ]
    for v in results["variants"]:
        lines.append(
            f"| {v['name']} | {v['select_mean']:.4f} | "
            + " | ".join(f"{v['ndcg'][n]:.4f}" for n in sets)
            + f" | {v['mean']:.4f} | {v['heldout_mean']:.4f} | "
            + "/".join(f"{v['ece'][n]:.3f}" for n in sets)
            + " |"
        )
    lo = results["lodo"]
    lines.append("")
    lines.append(
        f"LODO over learned variants: mean {lo['lodo_mean']:.4f}; "
        + "; ".join(f"{n} held out -> {f['variant']} ({f['ndcg']:.4f})" for n, f in lo["folds"].items())
        + f"; final (best on all selection sets): {lo['final']}"
    )
    lines.append(f"training lists: {json.dumps(results['train_lists'])}")
    return "\n".join(lines)


# ----- step 3: echo, ranking and demo cases -----------------------------------------------------------------


def drop_first_word(echo: str, query: str) -> str:
    """``echo`` with the restated query's first word removed (the rest capitalised)."""
    rest = query.split(maxsplit=1)[1]
    return echo.replace(query, rest[0].upper() + rest[1:], 1)


def check_cases(args: argparse.Namespace) -> None:
    from kalm_rag.cli import DEMO_EXAMPLES
    from kalm_rag.engine import Reranker
    from kalm_rag.eval.rerankers import CosineScorer
    from kalm_rag.models.mini.lexical import LexicalScorer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.mini.test_mini import CASES, ECHO_CASES

    torch.set_num_threads(args.threads)
    groups: dict[str, list[tuple[str, list[str], int]]] = {
        "echo (20)": [(q, [a, e], 0) for q, a, e in ECHO_CASES],
        # the same echoes with the question's first word dropped ("The capital of France? ..."): what a
        # verbatim-restatement feature cannot see
        "echo, question word dropped (20)": [(q, [a, drop_first_word(e, q)], 0) for q, a, e in ECHO_CASES],
        "ranking cases": [(q, [*d, a], len(d)) for q, a, d in CASES],
        f"demo ({len(DEMO_EXAMPLES)})": [(d.query, list(d.passages), d.answer) for d in DEMO_EXAMPLES],
    }
    saved = torch.load(Path(args.train) / "learned_models.pt", weights_only=False)
    models = {}
    for label, m in saved.items():
        model = Fusion(len(m["inputs"]), m["hidden"], np.zeros(len(m["inputs"])), np.ones(len(m["inputs"])))
        model.load_state_dict(m["state"])
        models[label] = (model, m["inputs"])
    rr = Reranker.from_pretrained(args.model)
    cos = CosineScorer()
    lexical = LexicalScorer.from_pretrained(args.model, stats=args.lexical_stats)
    feats = EchoFeatures(lexical)
    fns: dict[str, Any] = {
        "kalm_r4 (1.1)": lambda s: s["kalm"],
        "cos": lambda s: s["cos"],
        "kalm+10*lexn": lambda s: s["kalm"] + 10 * s["lexn"],
    }
    for label, (model, inputs) in models.items():
        fns[label] = lambda s, model=model, inputs=inputs: apply(model, s, inputs)
    wins = {name: {g: 0 for g in groups} for name in fns}
    for g, cases in groups.items():
        for query, passages, answer in cases:
            rr.encode(passages)
            sig = {
                "kalm": np.asarray(rr.score(query, passages, ratio=4, return_margin=True)),
                "dec": np.asarray(decoder_alone(rr, query, passages, 4)),
                "cos": np.asarray(cos(query, passages)),
                **feats.features(query, passages),
            }
            for name, f in fns.items():
                total = f(sig)
                wins[name][g] += int(np.argmax(total) == answer and np.sum(total == total[answer]) == 1)
    result = {name: {g: f"{w[g]}/{len(groups[g])}" for g in groups} for name, w in wins.items()}
    (Path(args.train) / "cases.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| variant | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for name, w in result.items():
        print(f"| {name} | " + " | ".join(w[g] for g in groups) + " |")


def make_candidate(args: argparse.Namespace) -> None:
    """A candidate folder (not a drop-in checkpoint: the engine does not apply the fusion): kalm-mini's shipped
    checkpoint, the lexical statistics and ``fusion.json`` (the variant's inputs, standardisation, weights,
    and its Platt fit on SQuAD dev), with the commands that reproduce it.
    """
    import shutil

    from kalm_rag.models.mini.backend import EMBEDDED_DIR

    saved = torch.load(Path(args.train) / "learned_models.pt", weights_only=False)
    results = json.loads((Path(args.train) / "learned_r4.json").read_text())
    variant = next(v for v in results["variants"] if v["name"] == args.variant)
    m = saved[args.variant]
    target = Path(args.target)
    shutil.copytree(EMBEDDED_DIR, target, dirs_exist_ok=True)
    shutil.copyfile(Path(args.lexical_stats) / "lexical.safetensors", target / "lexical.safetensors")
    fusion = {
        "variant": args.variant,
        "inputs": m["inputs"],
        "hidden": m["hidden"],
        "state": {k: v.tolist() for k, v in m["state"].items()},
        "platt_on_squad_dev": variant["platt_squad"],
        "ndcg@10 (60 queries per set, r=4)": variant["ndcg"],
        "training_lists": results["train_lists"],
        "reproduce": " && ".join(args.reproduce) if args.reproduce else "see docs/benchmarks/mini2-experiments.md",
    }
    (target / "fusion.json").write_text(json.dumps(fusion, indent=2) + "\n")
    logger.info("%s: %s", target, args.variant)


def table(args: argparse.Namespace) -> None:
    """The documentation's table: every variant's nDCG@10, its echo/ranking/demo counts and mean ECE."""
    results = json.loads((Path(args.train) / "learned_r4.json").read_text())
    cases = json.loads((Path(args.train) / "cases.json").read_text())
    sets = results["sets"]
    groups = list(next(iter(cases.values())))
    print(
        "| variant | l2 | selection mean | "
        + " | ".join(sets)
        + " | mean (7) | held-out mean | "
        + " | ".join(groups)
        + " | ECE mean (max) |"
    )
    print("|---|---|---|" + "---|" * len(sets) + "---|---|" + "---|" * len(groups) + "---|")
    for v in results["variants"]:
        name, _, l2 = v["name"].partition(", l2=")
        e = [v["ece"][n] for n in sets]
        print(
            f"| {name} | {l2 or '-'} | {v['select_mean']:.4f} | "
            + " | ".join(f"{v['ndcg'][n]:.4f}" for n in sets)
            + f" | {v['mean']:.4f} | {v['heldout_mean']:.4f} | "
            + " | ".join(cases.get(v["name"], {}).get(g, "-") for g in groups)
            + f" | {np.mean(e):.3f} ({max(e):.3f}) |"
        )
    select = results["select"]
    learned = [v for v in results["variants"] if v["spec"] is not None]
    echo_group = groups[0]
    keeps = [v for v in learned if int(cases.get(v["name"], {}).get(echo_group, "0/0").split("/")[0]) >= args.min_echo]
    for title, pool in (("every learned variant", learned), (f"variants with >= {args.min_echo} echo wins", keeps)):
        if not pool:
            continue
        folds = {}
        for held in select:
            others = [n for n in select if n != held]
            best = max(pool, key=lambda v: float(np.mean([v["ndcg"][n] for n in others])))
            folds[held] = (best["name"], best["ndcg"][held])
        final = max(pool, key=lambda v: float(np.mean([v["ndcg"][n] for n in select])))
        print(
            f"\nLODO among {title}: mean {np.mean([x for _, x in folds.values()]):.4f}; "
            + "; ".join(f"{n} held out -> {name} ({x:.4f})" for n, (name, x) in folds.items())
            + f"; chosen on all four: {final['name']} (held-out mean {final['heldout_mean']:.4f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("score", help="Build the training lists and cache their model signals.")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="kalm-mini")
    p.add_argument("--per-source", type=int, default=300, help="Queries per extra-train source.")
    p.add_argument("--squad-queries", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=50, help="Lists encoded and scored per step (resumable).")
    p.add_argument("--encode-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("check", help="Compare this script's scoring with mini2_fusion.py's cached signals.")
    p.add_argument("dataset")
    p.add_argument("--out", required=True, help="mini2_fusion.py score's folder.")
    p.add_argument("--model", default="kalm-mini")
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--encode-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("fit", help="Train every variant and evaluate it on the cached evaluation signals.")
    p.add_argument("datasets", nargs="+")
    p.add_argument("--train", required=True, help="The folder of ``score``.")
    p.add_argument("--out", required=True, help="mini2_fusion.py score's folder (scores/*.json).")
    p.add_argument("--model", default="kalm-mini")
    p.add_argument("--max-queries", type=int, default=None)
    p.add_argument("--lexical-stats", required=True)
    p.add_argument("--word-stats", default=None)
    p.add_argument("--select", default="scifact,nfcorpus,wikiqa,squad")
    p.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("cases", help="Echo, ranking and demo cases under every learned variant.")
    p.add_argument("--train", required=True)
    p.add_argument("--model", default="kalm-mini")
    p.add_argument("--lexical-stats", required=True)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("table", help="The documentation's table (learned_r4.json and cases.json).")
    p.add_argument("--train", required=True)
    p.add_argument("--min-echo", type=int, default=14, help="Echo wins a variant needs (1.1's 14/20).")
    p = sub.add_parser("candidate", help="Write a candidate folder for one learned variant (not committed).")
    p.add_argument("--train", required=True)
    p.add_argument("--variant", required=True, help="A variant label of learned_r4.json (with its l2).")
    p.add_argument("--target", required=True)
    p.add_argument("--lexical-stats", required=True)
    p.add_argument("--reproduce", nargs="*", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    {
        "score": score_training,
        "check": check_signals,
        "fit": fit,
        "cases": check_cases,
        "candidate": make_candidate,
        "table": table,
    }[args.step](args)


if __name__ == "__main__":
    main()
