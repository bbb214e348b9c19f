"""A real uvicorn server of ``create_app`` with faults a test can switch on through files (fault-path tests).

    python -m tests.serve.fault_app PORT CONTROL_DIR

- the first two model loads fail (with a store path in the message, which must not reach any answer);
- ``CONTROL_DIR/crash``: the next scoring call kills the batcher's worker task (a BaseException, as a fatal
  error in native code would), once;
- ``CONTROL_DIR/delay``: each scoring call first sleeps that many seconds;
- every scoring call appends its query to ``CONTROL_DIR/scored`` (what the model worker really ran).

Small limits make the paths cheap: 4 passages per encoding step, a 1 s body timeout, a 2 s graceful shutdown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from kalm_rag import Reranker, ScoreRequest
from kalm_rag.errors import StoreUnavailableError
from kalm_rag.serve import create_app

SECRET = "/srv/secret/passages.db"
GRACEFUL_TIMEOUT = 2


class WorkerCrash(BaseException):
    """Not an Exception: nothing on the way catches it, so the batcher's worker task dies."""


class FaultyReranker(Reranker):
    control = Path(".")

    def score_many(self, requests: Sequence[ScoreRequest], *, return_margin: bool = False) -> list[list[float]]:
        with (self.control / "scored").open("a") as fh:
            fh.writelines(f"{r.query}\n" for r in requests)
        crash = self.control / "crash"
        if crash.exists():
            crash.unlink()
            raise WorkerCrash("a fatal error on the model worker (test)")
        delay = self.control / "delay"
        if delay.exists():
            time.sleep(float(delay.read_text()))
        return super().score_many(requests, return_margin=return_margin)


def main() -> None:
    port, control = int(sys.argv[1]), Path(sys.argv[2])
    FaultyReranker.control = control
    attempts = 0

    def load() -> Reranker:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise StoreUnavailableError(f"unable to open database file {SECRET}")
        rr = Reranker.from_pretrained("kalm-mini", device="cpu")
        rr.__class__ = FaultyReranker
        return rr

    app = create_app(load, model_name="kalm-mini", body_timeout_s=1.0, encode_chunk=4, max_wait_ms=0)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_TIMEOUT)


if __name__ == "__main__":
    main()
