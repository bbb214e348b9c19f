"""Default locations outside the repository (light module: the CLI imports it before torch)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """kalm-rag's folder in the user cache: ``$XDG_CACHE_HOME/kalm-rag``, by default ``~/.cache/kalm-rag``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kalm-rag"


def default_cache_dir() -> Path:
    """Where training and evaluation keep encodings and runs: ``$KALM_RAG_CACHE``, else the user cache folder
    (``$XDG_CACHE_HOME/kalm-rag/kalm-mini``, by default ``~/.cache/kalm-rag/kalm-mini``).
    """
    if os.environ.get("KALM_RAG_CACHE"):
        return Path(os.environ["KALM_RAG_CACHE"]).expanduser()
    return user_cache_dir() / "kalm-mini"
