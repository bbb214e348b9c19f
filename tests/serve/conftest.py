"""Fixtures of the service tests: real ``kalm-rag serve`` processes on free loopback ports, stopped by PID.

The main server (one per test session) runs kalm-mini with an API key and small limits, so that the
limit paths are cheap to reach; the test process loads its own kalm-mini to compute the expected rankings.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kalm_rag import Reranker

API_KEY = "test-key-0123456789"
#: the main server's limits (small, so that the 413 paths need small bodies)
MAX_DOCUMENTS = 50
MAX_DOCUMENT_CHARS = 8000
MAX_BODY = 64 * 1024


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """PIDs of ``pid``'s child processes (uvicorn's workers, multiprocessing's resource tracker), from /proc."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _is_worker(pid: int) -> bool:
    """A uvicorn worker (multiprocessing spawn), not the resource tracker that spawn starts beside them."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"resource_tracker" not in cmdline


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kalm_rag_serve(*args: str) -> list[str]:
    """The command line of ``kalm-rag serve ARGS`` on the port ``{port}`` (filled in by :class:`ServeProcess`)."""
    return [sys.executable, "-m", "kalm_rag", "serve", "--port", "{port}", "--log-level", "warning", *args]


class ServeProcess:
    """A server process on a free 127.0.0.1 port (``{port}`` in ``command``), with its log in ``log_path``."""

    def __init__(self, command: list[str], log_path: Path, *, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [part.replace("{port}", str(self.port)) for part in command],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.worker_pids: list[int] = []
        self.children: list[int] = []
        self.killed = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll ``/health`` until it answers 200 (the model is loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kalm-rag serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    self.children = _children(self.pid)
                    self.worker_pids = [pid for pid in self.children if _is_worker(pid)]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kalm-rag serve was not ready within {timeout:.0f} s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the server (uvicorn shuts down gracefully), SIGKILL what is left; every process by PID.

        Returns the exit status: uvicorn re-raises the signal after a graceful shutdown, so ``-SIGTERM`` is a
        clean exit too (``killed`` says whether SIGKILL was needed).
        """
        pids = [*_children(self.pid), *self.children]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.process.kill()
            self.process.wait(timeout=10)
        for pid in set(pids):  # workers orphaned by a killed parent
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def reference() -> Reranker:
    """kalm-mini in this process (its own memory store): what every response must equal."""
    return Reranker.from_pretrained("kalm-mini", device="cpu")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """The main server: kalm-mini, API key from the environment, small limits, batching on."""
    folder = tmp_path_factory.mktemp("serve")
    proc = ServeProcess(
        kalm_rag_serve(
            "--threads",
            "1",
            "--max-documents",
            str(MAX_DOCUMENTS),
            "--max-document-chars",
            str(MAX_DOCUMENT_CHARS),
            "--max-body",
            str(MAX_BODY),
            "--max-wait-ms",
            "5",
        ),
        folder / "server.log",
        env={"KALM_RAG_API_KEY": API_KEY},
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(server: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120.0) as c:
        yield c
