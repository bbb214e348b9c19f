"""Model backends, one module per family. ``load_backend`` picks one from a name or a checkpoint folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kalm_rag.models.base import FBNLBackend

__all__ = ["FBNLBackend", "load_backend", "DEFAULT_MODEL"]

#: The embedded default model (shipped inside the package).
DEFAULT_MODEL = "kalm-mini"


def _model_type(name_or_path: str) -> str | None:
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError):
            return None
    return None


def load_backend(name_or_path: str | os.PathLike[str], *, device: torch.device, dtype: torch.dtype) -> FBNLBackend:
    """Load the backend for ``name_or_path``: ``kalm-mini`` (or a folder of that type), else T5Gemma 2."""
    source = str(name_or_path)
    if source == DEFAULT_MODEL or _model_type(source) == DEFAULT_MODEL:
        from kalm_rag.models.mini import MiniBackend

        return MiniBackend.from_pretrained(source, device=device, dtype=dtype)
    from kalm_rag.models.t5gemma2 import T5Gemma2Backend

    return T5Gemma2Backend.from_pretrained(source, device=device, dtype=dtype)
