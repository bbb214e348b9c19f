"""Evidence spans and context pruning: which sentences of a passage made it relevant.

FBNL reads a passage as MEP windows of ``ratio`` encoder positions, and each position comes from a span of the
passage text (the tokenizer's offsets). A backend gives one relevance weight per window (its attention over
the windows, or a trained head); this module maps the windows back to characters, splits the passage into
sentences (``sentencex``), scores each sentence from the windows that overlap it, and prunes a passage to its
best sentences. Everything here is pure: no model, no store.

Two readouts turn window signals into sentence scores: the training-free one (:func:`evidence_spans`: a
sentence scores its best overlapping window's weight) and a trained :class:`SentenceReadout` (a few weights over
z-scored sentence features, shipped as ``evidence.json`` next to a model's weights), whose scores are each
sentence's share of the passage's evidence (they sum to 1).

Example:
    >>> text = "Bananas are yellow. Paris is the capital of France."
    >>> sentence_spans(text)
    [(0, 19), (20, 51)]
    >>> offsets = [None, (0, 7), (8, 11), (12, 19), (20, 25), (26, 51)]   # a prefix token, then five tokens
    >>> windows = window_spans(offsets, 2)
    >>> windows
    [(0, 7), (8, 19), (20, 51)]
    >>> spans = evidence_spans(text, windows, [0.1, 0.1, 0.8])
    >>> ranked = [(s.start, s.end, round(s.score, 2)) for s in spans]
    >>> ranked
    [(20, 51, 0.8), (0, 19, 0.1)]
    >>> prune_passage(text, spans, keep=0.5)[0]
    'Paris is the capital of France.'
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from kalm_rag.errors import InvalidInputError, ModelLoadError

#: A token's character span in the passage text, or ``None`` for a position that holds no passage text
#: (the ``"<Document>: "`` prefix, ``[CLS]``/``[SEP]``).
Offset = tuple[int, int] | None

#: How a sentence's score is read from the windows that overlap it.
Aggregate = Literal["max", "mean", "mass"]

#: Separator between the kept sentences of a pruned passage.
PRUNE_SEPARATOR = " "

#: File of a trained :class:`SentenceReadout` inside a model folder.
READOUT_FILE = "evidence.json"


@dataclass(frozen=True)
class EvidenceSpan:
    """One sentence of a passage and how much it made the passage relevant.

    Attributes:
        start: offset of the sentence's first character in the passage text.
        end: offset one past its last character (``text[start:end]`` is the sentence, stripped of spaces).
        score: the sentence's evidence score (higher is more relevant; comparable within one passage).
    """

    start: int
    end: int
    score: float

    def to_dict(self) -> dict[str, float | int]:
        """``{"start", "end", "score"}`` (plain JSON types)."""
        return {"start": self.start, "end": self.end, "score": self.score}


# ----- sentences -----------------------------------------------------------------------------------


def sentence_spans(text: str, *, language: str = "en") -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``, in order, without surrounding whitespace.

    Sentences come from ``sentencex`` (rule-based, ~300 languages). Whitespace-only pieces are dropped, so an
    empty or blank text has no sentence; a text with no punctuation is one sentence.
    """
    from sentencex import get_sentence_boundaries

    spans: list[tuple[int, int]] = []
    for piece in get_sentence_boundaries(language, text):
        start, end = int(piece["start_index"]), int(piece["end_index"])
        if text[start:end] != piece["text"]:  # the splitter's offsets must index this string; else find them
            start = text.find(piece["text"], spans[-1][1] if spans else 0)
            if start < 0:
                continue
            end = start + len(piece["text"])
        span = _strip(text, start, end)
        if span is not None:
            spans.append(span)
    return spans


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    """``(start, end)`` narrowed to exclude leading/trailing whitespace; ``None`` if nothing else is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


# ----- windows -------------------------------------------------------------------------------------


def passage_offsets_from_prefixed(offsets: Sequence[tuple[int, int]], prefix_len: int, text_len: int) -> list[Offset]:
    """Offsets into ``prefix + passage`` turned into offsets into the passage (prefix tokens become ``None``).

    A token that straddles the prefix's end keeps only its passage part; ``(0, 0)`` offsets (special tokens)
    become ``None``.
    """
    out: list[Offset] = []
    for start, end in offsets:
        start, end = max(int(start) - prefix_len, 0), min(int(end) - prefix_len, text_len)
        out.append((start, end) if end > start else None)
    return out


def window_spans(offsets: Sequence[Offset], ratio: int) -> list[tuple[int, int] | None]:
    """Character span of each MEP window: windows of ``ratio`` consecutive positions from position 0.

    Args:
        offsets: each encoder position's character span in the passage (``None``: no passage text), for the
            positions the encoder read (the passage as cut at ``max_passage_tokens``).
        ratio: the MEP ratio the window weights were computed at.

    Returns:
        ``ceil(len(offsets) / ratio)`` spans ``(first start, last end)`` of the text tokens in each window,
        ``None`` for a window that holds none (a prefix or ``[CLS]``-only window).
    """
    if ratio < 1:
        raise InvalidInputError(f"ratio must be >= 1, got {ratio}")
    out: list[tuple[int, int] | None] = []
    for w in range(math.ceil(len(offsets) / ratio)):
        real = [o for o in offsets[w * ratio : (w + 1) * ratio] if o is not None]
        out.append((min(s for s, _ in real), max(e for _, e in real)) if real else None)
    return out


def read_extent(offsets: Sequence[Offset]) -> int:
    """One past the last character the encoder read (0 if it read none): text beyond was cut off."""
    return max((o[1] for o in offsets if o is not None), default=0)


def read_sentences(
    text: str, windows: Sequence[tuple[int, int] | None], sentences: Sequence[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """The sentences the encoder read: those starting before the last window's end, cut at it (in order).

    ``sentences`` defaults to :func:`sentence_spans` of ``text``; no window with text means nothing was read.
    """
    read_end = max((w[1] for w in windows if w is not None), default=0)
    spans = sentence_spans(text) if sentences is None else [(int(s), int(e)) for s, e in sentences]
    return [(s, min(e, read_end)) for s, e in spans if s < read_end]


def sentence_windows(
    sentences: Sequence[tuple[int, int]], windows: Sequence[tuple[int, int] | None]
) -> list[list[int]]:
    """For each sentence the indices of the windows overlapping it (else the nearest window with text).

    Windows follow the text (their starts and ends never decrease), so the overlapping ones of a sentence are a
    run found by two binary searches.
    """
    real = [(i, w) for i, w in enumerate(windows) if w is not None]
    if not real:
        return [[] for _ in sentences]
    starts = [w[0] for _, w in real]
    ends = [w[1] for _, w in real]
    out = []
    for s, e in sentences:
        first, last = bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)  # ends > s, starts < e
        hit = [real[k][0] for k in range(first, last) if min(e, ends[k]) - max(s, starts[k]) > 0]
        if not hit:  # only whitespace or untokenised characters: the nearest window speaks for it
            hit = [min(real, key=lambda item: min(abs(item[1][0] - e), abs(item[1][1] - s)))[0]]
        out.append(hit)
    return out


@dataclass(frozen=True)
class SentenceWindows:
    """The windows a call's sentences read, as (sentence, window) pairs over one matrix of window vectors.

    Built once per call by the engine; its attention features, sentence vectors and a backend's window-level
    features all index with the same pairs.

    Attributes:
        vectors: the pooled window vectors ``(N, d)`` of the sentences' passages.
        sentence: for each pair, the sentence ``(P,)`` (numbered across the call).
        window: for each pair, the row of ``vectors`` ``(P,)`` that overlaps that sentence.
        num_sentences: the number of sentences (each has at least one pair).
    """

    vectors: torch.Tensor
    sentence: torch.Tensor
    window: torch.Tensor
    num_sentences: int

    @classmethod
    def from_groups(cls, vectors: torch.Tensor, groups: Sequence[Sequence[int]]) -> SentenceWindows:
        """The pairs of ``groups`` (for each sentence, its rows of ``vectors``)."""
        sentence = torch.tensor([s for s, group in enumerate(groups) for _ in group], dtype=torch.long)
        window = torch.tensor([w for group in groups for w in group], dtype=torch.long)
        return cls(vectors, sentence, window, len(groups))


# ----- a trained readout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SentenceReadout:
    """A trained sentence readout: a weighted sum of sentence features, each standardised within the passage.

    ``logit_j = sum_k weight_k * (x_jk - mean_k) / std_k`` over the passage's read sentences ``j`` (a feature
    that is constant over the passage contributes 0); the evidence score of a sentence is ``softmax(logit)_j``,
    its share of the passage's evidence. Standardising within the passage makes the weights independent of
    each feature's scale, ratio and passage length (few parameters: trained on SQuAD, it cannot memorise it).

    Attributes:
        features: the feature names, in the order of ``weights`` (the backend and the engine
            compute them).
        weights: one weight per feature.
        meta: how it was trained (data, ratios, counts), for the model card.
    """

    features: tuple[str, ...]
    weights: tuple[float, ...]
    meta: dict[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.features) != len(self.weights) or not self.features:
            raise InvalidInputError(f"{len(self.features)} readout features but {len(self.weights)} weights")
        if not all(math.isfinite(w) for w in self.weights):
            raise InvalidInputError("readout weights must be finite")

    def logits(self, columns: Mapping[str, Sequence[float]]) -> list[float]:
        """Each sentence's logit from ``columns`` (feature name -> one value per sentence)."""
        missing = [f for f in self.features if f not in columns]
        if missing:
            raise InvalidInputError(f"sentence features {missing} missing (have {sorted(columns)})")
        n = len(columns[self.features[0]])
        out = [0.0] * n
        for name, weight in zip(self.features, self.weights):
            values = [float(v) for v in columns[name]]
            if len(values) != n:
                raise InvalidInputError(f"feature {name!r} has {len(values)} values for {n} sentences")
            mean = sum(values) / n if n else 0.0
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / n) if n else 0.0
            std = max(std, 1e-3)  # a constant feature says nothing about which sentence
            for j, v in enumerate(values):
                out[j] += weight * (v - mean) / std
        return out

    def probabilities(self, columns: Mapping[str, Sequence[float]]) -> list[float]:
        """``softmax(logits)``: each sentence's share of the passage's evidence (sums to 1)."""
        logits = self.logits(columns)
        if not logits:
            return []
        top = max(logits)
        exp = [math.exp(x - top) for x in logits]
        total = sum(exp)
        return [x / total for x in exp]

    def save(self, folder: str | Path) -> Path:
        """Write ``evidence.json`` into ``folder``."""
        path = Path(folder) / READOUT_FILE
        body = {"features": list(self.features), "weights": list(self.weights), "meta": self.meta}
        path.write_text(json.dumps(body, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SentenceReadout | None:
        """The readout in ``folder`` (``evidence.json``), or ``None`` when it holds none."""
        path = Path(folder) / READOUT_FILE
        if not path.is_file():
            return None
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                tuple(str(f) for f in body["features"]),
                tuple(float(w) for w in body["weights"]),
                dict(body.get("meta", {})),
            )
        except (ValueError, KeyError, TypeError, InvalidInputError) as exc:
            raise ModelLoadError(f"{path}: not a usable evidence readout ({exc})") from exc


def ranked_spans(sentences: Sequence[tuple[int, int]], scores: Sequence[float]) -> list[EvidenceSpan]:
    """One span per sentence with its score, best first (ties: earlier first)."""
    if len(sentences) != len(scores):
        raise InvalidInputError(f"{len(sentences)} sentences but {len(scores)} scores")
    order = sorted(range(len(sentences)), key=lambda j: (-float(scores[j]), j))
    return [EvidenceSpan(sentences[j][0], sentences[j][1], float(scores[j])) for j in order]


# ----- sentence scores and spans -------------------------------------------------------------------


def evidence_spans(
    text: str,
    windows: Sequence[tuple[int, int] | None],
    weights: Sequence[float],
    *,
    sentences: Sequence[tuple[int, int]] | None = None,
    aggregate: Aggregate = "max",
) -> list[EvidenceSpan]:
    """Score each sentence the encoder read from the window weights overlapping it; best first.

    Args:
        text: the passage text.
        windows: each window's character span (:func:`window_spans`), ``None`` for windows without text.
        weights: one relevance weight per window (higher is more relevant), as many as ``windows``.
        sentences: the sentence spans to score (default: :func:`sentence_spans` of ``text``).
        aggregate: ``"max"`` (the best overlapping window), ``"mean"`` (their mean, weighted by the characters
            each shares with the sentence) or ``"mass"`` (each window's weight shared out over the sentences
            by characters, summed: longer sentences collect more).

    Returns:
        One span per sentence that starts in the read part of the text, cut at the read end (text past
        ``max_passage_tokens`` was never read, so it cannot be evidence), sorted by score, best first (ties:
        earlier first). A sentence no window overlaps (whitespace between windows) scores like its nearest
        window.
    """
    if len(windows) != len(weights):
        raise InvalidInputError(f"{len(windows)} windows but {len(weights)} weights")
    if aggregate not in ("max", "mean", "mass"):
        raise InvalidInputError(f"aggregate must be 'max', 'mean' or 'mass', got {aggregate!r}")
    real = [(span, float(w)) for span, w in zip(windows, weights) if span is not None]
    if not real:
        return []
    out = [
        (i, EvidenceSpan(start, end, _sentence_score(start, end, real, aggregate)))
        for i, (start, end) in enumerate(read_sentences(text, windows, sentences))
    ]
    out.sort(key=lambda item: (-item[1].score, item[0]))
    return [span for _, span in out]


def _sentence_score(start: int, end: int, windows: list[tuple[tuple[int, int], float]], aggregate: Aggregate) -> float:
    shares = []  # (characters shared, window length, weight)
    for (ws, we), w in windows:
        shared = min(end, we) - max(start, ws)
        if shared > 0:
            shares.append((shared, max(we - ws, 1), w))
    if not shares:  # between windows (only whitespace or untokenised characters): the nearest window speaks
        nearest = min(windows, key=lambda item: min(abs(item[0][0] - end), abs(item[0][1] - start)))
        return nearest[1]
    if aggregate == "max":
        return max(w for _, _, w in shares)
    if aggregate == "mean":
        return sum(c * w for c, _, w in shares) / sum(c for c, _, _ in shares)
    return sum(c / n * w for c, n, w in shares)


# ----- pruning -------------------------------------------------------------------------------------


def check_keep(keep: object, name: str = "prune") -> float:
    """``keep`` as the fraction of a passage to keep, in ``(0, 1]``, else ``InvalidInputError``."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise InvalidInputError(f"{name} must be the fraction of each passage to keep, in (0, 1], got {keep!r}")
    return float(keep)


def select_sentences(spans: Sequence[EvidenceSpan], keep: float) -> list[EvidenceSpan]:
    """The best sentences whose characters add up to at most ``keep`` of the scored text (at least one).

    Sentences are taken best first; one that would pass the budget is skipped and a shorter, lower-scored one
    may still fit. Returned best first.
    """
    keep = check_keep(keep, "keep")
    total = sum(s.end - s.start for s in spans)
    budget = keep * total
    chosen: list[EvidenceSpan] = []
    used = 0
    for span in spans:
        size = span.end - span.start
        if not chosen or used + size <= budget + 1e-9:
            chosen.append(span)
            used += size
    return chosen


def check_mass(mass: object, name: str = "prune_mass") -> float:
    """``mass`` as the share of a passage's evidence to keep, in ``(0, 1]``, else ``InvalidInputError``."""
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0.0 < float(mass) <= 1.0:
        raise InvalidInputError(f"{name} must be the share of each passage's evidence to keep, in (0, 1], got {mass!r}")
    return float(mass)


def select_by_mass(spans: Sequence[EvidenceSpan], mass: float) -> list[EvidenceSpan]:
    """The best sentences until their scores add up to at least ``mass`` of all the scores (at least one).

    With a trained readout the scores are shares that sum to 1, so ``mass=0.9`` keeps the fewest best
    sentences that hold 90 % of the evidence: one when the model is sure, more when it is not. Scores below 0
    count as 0. Returned best first.
    """
    mass = check_mass(mass, "mass")
    total = sum(max(s.score, 0.0) for s in spans)
    chosen: list[EvidenceSpan] = []
    held = 0.0
    for span in spans:
        chosen.append(span)
        held += max(span.score, 0.0)
        if total <= 0.0 or held >= mass * total - 1e-12:
            break
    return chosen


def prune_passage(
    text: str, spans: Sequence[EvidenceSpan], *, keep: float | None = None, mass: float | None = None
) -> tuple[str, list[EvidenceSpan]]:
    """``text`` cut to its best sentences, joined in their original order.

    Exactly one rule: ``keep``, a budget of characters (:func:`select_sentences`), or ``mass``, a share of the
    evidence (:func:`select_by_mass`).

    Returns:
        ``(pruned text, kept spans best first)``; the spans index the original ``text``.
    """
    if (keep is None) == (mass is None):
        raise InvalidInputError("prune with exactly one of keep (a share of characters) or mass (of evidence)")
    kept = select_sentences(spans, keep) if keep is not None else select_by_mass(spans, mass)  # type: ignore[arg-type]
    in_order = sorted(kept, key=lambda s: s.start)
    return PRUNE_SEPARATOR.join(text[s.start : s.end] for s in in_order), kept
