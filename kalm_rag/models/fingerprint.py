"""Content fingerprints of checkpoints: every byte of the weights and tokenizer, hashed once per file version.

The store namespace rests on :func:`checkpoint_identity`: two checkpoints that differ anywhere (one byte in
the middle of a multi-GB weight file, one token in the tokenizer) get different namespaces, so a model
never reads vectors another model wrote. A full sha256 of a multi-GB file takes seconds, so each file's
digest is cached, keyed by its size and modification time (nanoseconds), and paid once:

- next to the file, in ``.<name>.kalm-rag-sha256`` (a small JSON document), when the folder is writable
  and the file is not a symbolic link;
- otherwise (a read-only folder, a hub-cache snapshot whose files link to shared blobs) in
  ``$XDG_CACHE_HOME/kalm-rag/sha256/``, keyed by the file's resolved path.

A cached digest is only used when the size and the modification time still match; rewriting a file
(a fine-tune saved in place) changes its modification time, so the file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from kalm_rag.errors import ModelLoadError
from kalm_rag.paths import user_cache_dir

__all__ = ["IDENTITY_PATTERNS", "checkpoint_identity", "file_sha256"]

#: The files of a checkpoint folder that make up its identity: configuration, tokenizer and (safetensors)
#: weights, the only weights kalm-rag loads.
IDENTITY_PATTERNS = ("*.json", "*.safetensors", "*.model")
_CHUNK = 8 << 20  # bytes read at a time
_SIDECAR_SUFFIX = ".kalm-rag-sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def file_sha256(file: Path) -> str:
    """The sha256 of every byte of ``file`` (hex), cached by size and modification time (see the module doc).

    Raises:
        ModelLoadError: the file cannot be read.
    """
    try:
        st = file.stat()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from None
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    caches = _cache_files(file)
    for cache in caches:
        cached = _read_cache(cache, stamp)
        if cached is not None:
            return cached
    digest = hashlib.sha256()
    try:
        with file.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from None
    value = digest.hexdigest()
    for cache in caches:  # the first location that can be written keeps it
        if _write_cache(cache, {**stamp, "file": file.name, "sha256": value}):
            break
    return value


def checkpoint_identity(folder: Path) -> str:
    """A 32-hex-digit identity of the checkpoint in ``folder``: every byte of its config, tokenizer and weights.

    Hashes the name, size and full sha256 of each file matching :data:`IDENTITY_PATTERNS` (sidecar caches
    excluded), in name order.
    """
    files = sorted(
        {p for pattern in IDENTITY_PATTERNS for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")}
    )
    if not files:
        raise ModelLoadError(f"{folder} holds no checkpoint files (config, tokenizer, weights) to identify it by")
    digest = hashlib.sha256()
    for file in files:
        digest.update(json.dumps([file.name, file.stat().st_size, file_sha256(file)]).encode())
    return digest.hexdigest()[:32]


def _cache_files(file: Path) -> list[Path]:
    """Where ``file``'s digest may be cached, in order of preference."""
    resolved = file.resolve()
    key = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    central = user_cache_dir() / "sha256" / f"{key}.json"
    if file.is_symlink():
        return [central]
    # the user cache first: a checkpoint inside a package or a source checkout gets no stray files; next to
    # the file only where the user cache cannot be written
    return [central, file.parent / f".{file.name}{_SIDECAR_SUFFIX}"]


def _read_cache(cache: Path, stamp: dict[str, int]) -> str | None:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in stamp.items()):
        return None
    value = data.get("sha256")
    return value if isinstance(value, str) and _HEX64.fullmatch(value) else None


def _write_cache(cache: Path, data: dict[str, object]) -> bool:
    """Write ``data`` to ``cache`` atomically; ``False`` when the location cannot be written."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".kalm-rag-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
            os.replace(tmp, cache)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return False
    return True
