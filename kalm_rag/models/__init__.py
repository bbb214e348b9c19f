"""Model backends, one module per family. ``load_backend`` picks one from a name or a checkpoint folder.

A checkpoint is data: its ``config.json`` is read as JSON, and its ``model_type`` only selects one of the
backends below (never a module to import); a checkpoint that names code of its own is refused
(:func:`~kalm_rag.models.sources.refuse_custom_code`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kalm_rag.errors import InvalidInputError, ModelLoadError
from kalm_rag.models.base import FBNLBackend
from kalm_rag.models.sources import refuse_custom_code, resolve_checkpoint
from kalm_rag.threads import apply_thread_setting

__all__ = ["FBNLBackend", "load_backend", "DEFAULT_MODEL"]

#: The embedded default model (shipped inside the package).
DEFAULT_MODEL = "kalm-mini"


def _model_type(folder: Path) -> object:
    """The ``model_type`` of the checkpoint in ``folder`` (read as data), or ``None``.

    Raises:
        ModelLoadError: ``config.json`` is missing or is not a JSON object.
    """
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{folder} is not a checkpoint folder: it has no config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{config} is not a JSON object")
    return data.get("model_type")


def load_backend(name_or_path: str | os.PathLike[str], *, device: torch.device, dtype: torch.dtype) -> FBNLBackend:
    """Load the backend for ``name_or_path``: ``kalm-mini`` (or a folder of that type), else T5Gemma 2.

    Args:
        name_or_path: ``"kalm-mini"``, a checkpoint folder, or a hub id ``org/name`` (offline first: see
            :func:`~kalm_rag.models.sources.resolve_checkpoint`).
        device: the device to load on.
        dtype: the compute dtype.

    The ``KALM_RAG_THREADS`` environment variable, when set, fixes torch's intra-op thread count first
    (:mod:`kalm_rag.threads`).

    Raises:
        ModelLoadError: the checkpoint cannot be found, read or trusted.
        InvalidInputError: ``KALM_RAG_THREADS`` is not a positive integer.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InvalidInputError(f"model must be a name, a folder or a hub id, got {type(name_or_path).__name__}")
    apply_thread_setting()  # KALM_RAG_THREADS, when set (see kalm_rag.threads)
    if os.fspath(name_or_path) == DEFAULT_MODEL:
        from kalm_rag.models.mini import MiniBackend

        return MiniBackend.from_pretrained(DEFAULT_MODEL, device=device, dtype=dtype)
    folder = resolve_checkpoint(name_or_path)
    refuse_custom_code(folder)
    if _model_type(folder) == DEFAULT_MODEL:
        from kalm_rag.models.mini import MiniBackend

        return MiniBackend.from_pretrained(folder, device=device, dtype=dtype)
    from kalm_rag.models.t5gemma2 import T5Gemma2Backend

    return T5Gemma2Backend.from_pretrained(folder, device=device, dtype=dtype)
