"""Checks of caller input, shared by the engine and the framework adapters: one rule and one message per value.

Every check returns the value it accepted (so a caller can write ``self.ratio = check_ratio(ratio)``) and
raises :class:`~kalm_rag.errors.InvalidInputError` naming the argument and the value it refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kalm_rag.errors import InvalidInputError
from kalm_rag.pooling import MAX_RATIO, MIN_RATIO

__all__ = [
    "check_instruction",
    "check_passages",
    "check_positive_int",
    "check_ratio",
    "check_score_threshold",
    "check_stages",
    "check_text",
    "check_unicode",
]

#: A UTF-16 surrogate code point: JSON's ``"\\ud800"`` escape (or ``surrogateescape`` decoding) puts one in a
#: str, and no UTF-8 encoder, tokenizer or store key can take it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(value: str, name: str) -> str:
    r"""``value`` if it holds no lone surrogate (``"\ud800"``), which is not text and cannot be encoded."""
    found = _SURROGATE.search(value)
    if found is not None:
        raise InvalidInputError(
            f"{name} holds a lone surrogate (\\u{ord(found.group()):04x} at character {found.start()}), "
            "which is not valid Unicode text"
        )
    return value


def check_text(value: object, name: str) -> str:
    """``value`` if it is a str of valid Unicode (:func:`check_unicode`) with at least one non-space character."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidInputError(f"{name} is empty")
    return check_unicode(value, name)


def check_passages(passages: object) -> list[str]:
    """``passages`` as a list, if it is a sequence (not a str) of non-empty texts."""
    if isinstance(passages, (str, bytes)) or not isinstance(passages, Sequence):
        raise InvalidInputError(f"passages must be a list of str, got {type(passages).__name__}")
    return [check_text(p, f"passages[{i}]") for i, p in enumerate(passages)]


def check_positive_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 1 (``True`` is refused: it is a bool, not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_ratio(value: object, name: str = "ratio") -> int:
    """``value`` if it is an MEP ratio, an int in ``MIN_RATIO..MAX_RATIO`` (1..32)."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_RATIO <= value <= MAX_RATIO:
        raise InvalidInputError(f"{name} must be an int in {MIN_RATIO}..{MAX_RATIO}, got {value!r}")
    return value


def check_score_threshold(value: object, name: str = "score_threshold") -> float | None:
    """``value`` as a float if it is a real number, or ``None`` (scores are P(yes): 0..1 is the useful range)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # value != value: NaN
        raise InvalidInputError(f"{name} must be a number or None, got {value!r}")
    return float(value)


def check_instruction(value: object, name: str = "instruction") -> str | None:
    """``value`` if it is a non-empty task instruction, or ``None`` (the caller's default)."""
    return None if value is None else check_text(value, name)


def check_stages(stages: object) -> list[tuple[int, int]]:
    """``stages`` as ``[(ratio, depth), ...]`` if it is a non-empty sequence of such pairs."""
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
        raise InvalidInputError(f"stages must be a non-empty list of (ratio, depth) pairs, got {stages!r}")
    out = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, (tuple, list)) or len(stage) != 2:
            raise InvalidInputError(f"stages[{i}] must be a (ratio, depth) pair, got {stage!r}")
        out.append((check_ratio(stage[0], f"stages[{i}] ratio"), check_positive_int(stage[1], f"stages[{i}] depth")))
    return out
