"""The documentation site builds with ``mkdocs build --strict``: no broken link, nav entry or API reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra")
pytest.importorskip("material", reason="mkdocs-material is in the dev extra")
pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is in the dev extra")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_mkdocs_build_strict(tmp_path: Path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "reranker" / "index.html").is_file()
