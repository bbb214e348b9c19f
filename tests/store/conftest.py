"""Fixtures of the store tests: a real ``redis-server`` on a free loopback port, small entries, stores by URL.

The Redis tests skip (with the reason) only where no ``redis-server`` binary is on PATH. Set
``KALM_RAG_REQUIRE_REDIS=1`` (CI does) to make a missing binary an error instead of a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kalm_rag.store import PassageStore, open_store

REDIS_SERVER = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway ``redis-server`` (no persistence) that tests can stop and start again on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for one test (so that a test may stop and restart it)."""
    if REDIS_SERVER is None:
        if os.environ.get("KALM_RAG_REQUIRE_REDIS"):
            pytest.fail("KALM_RAG_REQUIRE_REDIS is set but no redis-server binary is on PATH")
        pytest.skip("redis-server binary not found on PATH (apt-get install redis-server) - Redis store tests skipped")
    server = RedisServer(REDIS_SERVER, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], PassageStore]]:
    """``factory(backend)`` opens a store of that kind (redis kinds start a server); all are closed after."""
    opened: list[PassageStore] = []

    def factory(backend: str) -> PassageStore:
        tier = "?memory_tier=10MB" if backend.startswith("memory+") else ""
        kind = backend.removeprefix("memory+")
        if kind == "memory":
            url = "memory://?max_bytes=10MB"
        elif kind == "sqlite":
            url = f"sqlite:///{tmp_path}/passages.db{tier}"
        else:
            server = request.getfixturevalue("redis_server")
            url = f"{server.url}{tier}"
        store = open_store(url)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
