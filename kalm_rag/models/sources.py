"""Where a checkpoint comes from: a local folder or a hub id, offline first, and never any code.

:func:`resolve_checkpoint` turns what a user typed into a local folder, in this order:

1. an existing folder is used as it is;
2. anything that is not a hub id of the form ``org/name`` (``kalm-mni``, ``path/to/KaLM-Reranker-V1-Nano``,
   ``./ckpt``) fails at once, without touching the network, with a message that says so and suggests the
   closest built-in names;
3. a hub id is looked up in the local hub cache (``snapshot_download(..., local_files_only=True)``);
4. only then, and only when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is unset, the hub is asked once
   (one ``snapshot_download``, no retry loop) for the checkpoint's JSON, tokenizer and safetensors files:
   never a Python file, never a pickle.

:func:`refuse_custom_code` reads a checkpoint folder's JSON files as data and refuses a checkpoint that asks
for code of its own (``auto_map`` or ``custom_pipelines`` in any of its JSON files): kalm-rag runs only code that
is installed, never code that comes with a checkpoint. A checkpoint's ``model_type`` only ever selects one of
kalm-rag's own backends.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

from kalm_rag.errors import InvalidInputError, ModelLoadError

__all__ = ["BUILTIN_NAMES", "OFFICIAL_CHECKPOINTS", "hub_offline", "refuse_custom_code", "resolve_checkpoint"]

#: Model names kalm-rag knows without a folder or a hub (the embedded default).
BUILTIN_NAMES = ("kalm-mini",)
#: The official KaLM-Reranker-V1 checkpoints on the Hugging Face hub.
OFFICIAL_CHECKPOINTS = (
    "KaLM-Embedding/KaLM-Reranker-V1-Nano",
    "KaLM-Embedding/KaLM-Reranker-V1-Small",
    "KaLM-Embedding/KaLM-Reranker-V1-Large",
    "KaLM-Embedding/KaLM-Reranker-V1-Nano-R2",
    "KaLM-Embedding/KaLM-Reranker-V1-Small-R2",
    "KaLM-Embedding/KaLM-Reranker-V1-Large-R2",
)
#: The files fetched from the hub: configuration, tokenizer, safetensors weights. No code, no pickle.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
#: JSON keys by which a checkpoint asks transformers to import code shipped with it.
_CODE_KEYS = ("auto_map", "custom_pipelines")


def hub_offline() -> bool:
    """Whether the hub must not be asked (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value)."""
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _suggest(source: str) -> str:
    """`` Did you mean 'kalm-mini'?`` for the closest built-in names (by whole name and by last path part)."""
    known = [*BUILTIN_NAMES, *OFFICIAL_CHECKPOINTS]
    close = difflib.get_close_matches(source, known, n=2, cutoff=0.6)
    tail = source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    by_tail = {name.rsplit("/", 1)[-1]: name for name in known}
    close += [by_tail[t] for t in difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.8)]
    close = list(dict.fromkeys(close))
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """The local folder of the checkpoint ``name_or_path`` names (offline first; see the module docstring).

    Args:
        name_or_path: a checkpoint folder or a hub id ``org/name``.

    Returns:
        An existing folder.

    Raises:
        ModelLoadError: no such folder, not a hub id, not cached while offline, or the download failed.
        InvalidInputError: ``name_or_path`` is not a str or a path.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InvalidInputError(f"model must be a name, a folder or a hub id, got {type(name_or_path).__name__}")
    source = os.fspath(name_or_path)
    if not isinstance(source, str) or not source.strip() or "\0" in source:
        raise ModelLoadError(f"{source!r:.200} is not a model name, a checkpoint folder or a hub id")
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            return path
        exists = path.exists()
    except OSError as exc:  # a name too long for the file system, a folder we may not read
        raise ModelLoadError(f"cannot read {source!r:.200}: {exc}") from None
    if exists:
        raise ModelLoadError(f"{source!r:.200} is a file; a checkpoint is a folder (config.json, weights, tokenizer)")
    if not _HUB_ID.fullmatch(source) or ".." in source:
        raise ModelLoadError(
            f"{source!r:.200} is neither a local checkpoint folder (there is no folder {str(path.absolute())!r:.200}) "
            f"nor a hub id of the form org/name, so nothing was downloaded.{_suggest(source)}"
        )
    cached = _cached_snapshot(source)
    if cached is not None:
        return cached
    if hub_offline():
        raise ModelLoadError(
            f"{source!r} is not a local folder and is not in the local hub cache; HF_HUB_OFFLINE is set, so it "
            "is not downloaded (unset HF_HUB_OFFLINE to download it, or pass the checkpoint's folder)."
            + _suggest(source)
        )
    return _download(source)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id`` in the local hub cache, or ``None`` (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    except (OSError, ValueError) as exc:  # an unreadable cache, an id the hub library refuses
        raise ModelLoadError(f"cannot read the local hub cache for {repo_id!r}: {exc}") from exc


def _download(repo_id: str) -> Path:
    """Download the checkpoint's data files (one ``snapshot_download`` call) and return its folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{repo_id!r} is not a local folder, not in the local hub cache, and could not be downloaded: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}{_suggest(repo_id)}"
        ) from exc


def refuse_custom_code(folder: Path) -> None:
    """Refuse a checkpoint that ships code (read as data: nothing is imported).

    Python files in the folder are left alone: transformers imports one only when a config names it in
    ``auto_map``, which is refused here (and ``trust_remote_code`` is always passed as ``False``).

    Raises:
        ModelLoadError: a JSON file of ``folder`` names ``auto_map`` or ``custom_pipelines``: loading it
            would mean running code that came with the checkpoint.
    """
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from None
        found = _code_keys(data)
        if found:
            raise ModelLoadError(
                f"{file} asks to run code shipped with the checkpoint ({', '.join(found)}); kalm-rag never runs "
                "a checkpoint's own code (trust_remote_code is always off). Remove those entries or use a "
                "checkpoint of a model type transformers supports natively"
            )


def _code_keys(data: object, where: str = "") -> list[str]:
    """The code-naming keys anywhere in a JSON document (nested configs included)."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if key in _CODE_KEYS:
                found.append(path)
            found += _code_keys(value, path)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _code_keys(value, f"{where}[{i}]")
    return found
