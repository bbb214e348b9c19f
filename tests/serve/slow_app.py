"""A real uvicorn server of ``create_app`` whose model takes DELAY seconds more per batch (shutdown tests).

    python -m tests.serve.slow_app PORT DELAY [STORE_URL]

``kalm-rag serve`` runs the same app under the same uvicorn; the delay makes "a request is in flight when
SIGTERM arrives" certain instead of a race with the machine's speed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import uvicorn

from kalm_rag import Reranker, ScoreRequest
from kalm_rag.serve import create_app


class SlowReranker(Reranker):
    delay = 0.0

    def score_many(self, requests: Sequence[ScoreRequest], *, return_margin: bool = False) -> list[list[float]]:
        time.sleep(self.delay)
        return super().score_many(requests, return_margin=return_margin)


def main() -> None:
    port, delay = int(sys.argv[1]), float(sys.argv[2])
    store = sys.argv[3] if len(sys.argv) > 3 else None
    rr = Reranker.from_pretrained("kalm-mini", store=store, device="cpu")
    rr.__class__ = SlowReranker
    SlowReranker.delay = delay
    uvicorn.run(create_app(rr, model_name="kalm-mini"), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
