"""Fault paths of a real uvicorn server (``fault_app``: create_app with switchable faults, see its docstring).

In order, on one process: a model load that fails is reported (503 ``error``, no internals) and retried; a
dead model worker fails what waits for it with a JSON 503 and restarts with one model thread; a rerank request
with many new documents does not hold the model worker; a client that stalls half-way through its body gets
408; a shutdown past its graceful timeout answers JSON 503s and drops the queued work of cancelled requests.
"""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import ServeProcess
from tests.serve.fault_app import GRACEFUL_TIMEOUT, SECRET
from tests.serve.helpers import CORPUS, QUERIES

# one model-loading server and some deliberately slow paths: about a minute, so outside the default run
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("control")


@pytest.fixture(scope="module")
def proc(control: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("logs") / "fault.log"
    p = ServeProcess([sys.executable, "-m", "tests.serve.fault_app", "{port}", str(control)], log)
    try:
        yield p
    finally:
        p.stop()


def test_a_failed_load_is_reported_and_retried(proc):
    seen: list[tuple[int, dict]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{proc.url}/health", timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        seen.append((r.status_code, r.json()))
        if r.status_code == 200:
            break
        time.sleep(0.1)
    statuses = [body["status"] for _, body in seen]
    assert "error" in statuses, statuses  # not "loading" forever
    assert statuses[-1] == "ok" and seen[-1][0] == 200, seen[-3:]
    errors = [(code, body) for code, body in seen if body["status"] == "error"]
    assert all(code == 503 and "failed" in body["message"] for code, body in errors)
    assert SECRET not in str(seen)  # the reason is in the log, not in the answer
    assert SECRET in proc.log() and "attempt 2" in proc.log()
    proc.wait_ready()


def test_a_dead_worker_fails_what_waits_then_restarts(proc, control):
    proc.wait_ready()
    (control / "crash").write_text("")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        calls = [
            pool.submit(httpx.post, f"{proc.url}/v2/rerank", json={"query": q, "documents": CORPUS[:3]}, timeout=60)
            for q in QUERIES[:3]
        ]
        responses = [c.result() for c in calls]  # none hangs
    failed = [r for r in responses if r.status_code != 200]
    assert failed, [r.text for r in responses]
    for r in failed:
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error_type"] == "worker_failed" and r.json()["request_id"] == r.headers["x-request-id"]
    again = httpx.post(f"{proc.url}/v2/rerank", json={"query": QUERIES[4], "documents": CORPUS[:3]}, timeout=60)
    assert again.status_code == 200, again.text
    assert "the model worker died" in proc.log()


def test_many_new_documents_do_not_hold_the_model_worker(proc):
    proc.wait_ready()
    cached = CORPUS[:2]
    httpx.post(f"{proc.url}/v1/encode", json={"documents": cached}, timeout=60).raise_for_status()
    big = [f"fresh document {i}: " + " ".join(f"w{j % 53} of rivers and cities" for j in range(40)) for i in range(24)]
    done: dict[str, float] = {}

    def send(name: str, docs: list[str]) -> None:
        r = httpx.post(f"{proc.url}/v2/rerank", json={"query": QUERIES[0], "documents": docs}, timeout=300)
        r.raise_for_status()
        done[name] = time.monotonic()

    big_thread = threading.Thread(target=send, args=("big", big))
    big_thread.start()
    time.sleep(1.0)  # the big request's first encoding step is running now
    send("small", cached)
    big_thread.join()
    # its misses are encoded 4 at a time (encode_chunk), and the small request runs between two steps
    assert done["small"] < done["big"], done


def test_a_stalled_body_gets_408(proc):
    proc.wait_ready()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
        head = b"POST /v2/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        s.sendall(head + b'{"query": ')  # and then nothing more
        started = time.monotonic()
        answer = b""
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"field":"body"' in answer.replace(b" ", b"") and b"request_timeout" in answer
    assert time.monotonic() - started < 5


def test_shutdown_past_its_timeout_answers_json_503_and_drops_queued_work(proc, control):
    proc.wait_ready()
    (control / "delay").write_text("4")
    scored = control / "scored"
    scored.write_text("")
    out: dict[str, httpx.Response] = {}

    def send(name: str, query: str) -> None:
        out[name] = httpx.post(f"{proc.url}/v2/rerank", json={"query": query, "documents": CORPUS[:2]}, timeout=60)

    running = threading.Thread(target=send, args=("running", "the request being scored"))
    queued = threading.Thread(target=send, args=("queued", "the request waiting behind it"))
    running.start()
    time.sleep(1.0)
    queued.start()
    time.sleep(0.5)
    proc.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    proc.process.wait(timeout=60)
    took = time.monotonic() - signalled
    running.join(10)
    queued.join(10)
    for name in ("running", "queued"):
        r = out[name]
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", (name, r.text)
        assert r.json()["error_type"] == "service_unavailable" and r.json()["request_id"]
    # the worker finished the batch it was in (4 s), and never started the cancelled request's job
    assert "the request waiting behind it" not in scored.read_text()
    assert took < GRACEFUL_TIMEOUT + 4, took
    assert proc.process.returncode in (0, -signal.SIGTERM), proc.log()
