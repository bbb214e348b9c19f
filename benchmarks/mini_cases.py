"""The demo's cases and the 20 query-echo cases of ``tests/mini/test_mini.py`` for any kalm-mini model folder.

The tests check the shipped weights; this counts, for a candidate (a run's checkpoint exported with
``kalm-rag train export``), how many rank the answer first, and names the misses:

    python benchmarks/mini_cases.py kalm-mini runs/candidate

Read exactly (base ratio 1, float32), as the tests do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's tests package

from kalm_rag import Reranker  # noqa: E402
from tests.mini.test_mini import CASES, ECHO_CASES  # noqa: E402

RATIOS = (1, 4, 16)


def misses(model: str) -> tuple[list[str], list[str]]:
    """The demo cases (question and ratio) and the echo cases (question) ``model`` gets wrong."""
    rr = Reranker.from_pretrained(model, device="cpu", dtype="float32", base_ratio=1, storage="float32")
    case_misses = [
        f"{query} (r={ratio})"
        for query, answer, distractors in CASES
        for ratio in RATIOS
        if rr.rerank(query, [*distractors, answer], ratio=ratio)[0].text != answer
    ]
    echo_misses = []
    for query, answer, echo in ECHO_CASES:
        answer_score, echo_score = rr.score(query, [answer, echo])
        if answer_score <= echo_score:
            echo_misses.append(query)
    return case_misses, echo_misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="kalm-mini or model folders")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for model in args.models:
        case_misses, echo_misses = misses(model)
        print(
            f"{model}: demo cases {len(CASES) * len(RATIOS) - len(case_misses)}/{len(CASES) * len(RATIOS)}, "
            f"echo cases {len(ECHO_CASES) - len(echo_misses)}/{len(ECHO_CASES)}"
        )
        for miss in case_misses:
            print(f"  demo miss: {miss}")
        for miss in echo_misses:
            print(f"  echo miss: {miss}")


if __name__ == "__main__":
    main()
