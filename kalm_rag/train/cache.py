"""On-disk cache of frozen-encoder outputs (per-token hidden states), shared by training and evaluation.

The passage encoder of kalm-mini is frozen, so its token states are a pure function of the text: they are
computed once and kept under ``cache_dir`` (never inside the repository), in shards of fp16 arrays
``shard-NNNNN[-PID].npy`` (all tokens of the shard's passages, ``(N_tokens, d)``) with a JSON index
``{key: [start, length]}`` written after the array. A crash loses at most the shard being written.
Re-pooling at any ratio happens later, from the token states.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kalm_rag.padding import right_pad, right_pad_vectors

logger = logging.getLogger(__name__)


class EncodingCache:
    """Token states of passages under one encoder identity.

    Args:
        cache_dir: root folder; states live in ``cache_dir/encodings/<encoder_id>/``.
        backend: a ``MiniBackend`` (its ``encoder_id``, ``tokenize_passages`` and ``encode`` are used).
        max_tokens: passage token limit (part of the key).
    """

    def __init__(self, cache_dir: str | Path, backend, *, max_tokens: int = 256, shard_size: int = 512) -> None:
        self.backend = backend
        self.max_tokens = max_tokens
        self.shard_size = shard_size
        window = getattr(getattr(backend, "config", None), "encoder_window", max_tokens)
        self.root = Path(cache_dir) / "encodings" / f"{backend.encoder_id}-w{window}-t{max_tokens}"
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[str, int, int]] = {}  # key -> (shard name, start, length)
        self._arrays: dict[str, np.ndarray] = {}
        self._next_shard = 0
        for idx_file in sorted(self.root.glob("shard-*.json")):
            for key, (start, length) in json.loads(idx_file.read_text()).items():
                self._index[key] = (idx_file.stem, start, length)
            self._next_shard = max(self._next_shard, int(idx_file.stem.split("-")[1]) + 1)

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def __contains__(self, text: str) -> bool:
        return self.key(text) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _array(self, shard: str) -> np.ndarray:
        if shard not in self._arrays:
            self._arrays[shard] = np.load(self.root / f"{shard}.npy", mmap_mode="r")
        return self._arrays[shard]

    def get(self, text: str) -> torch.Tensor:
        """Token states ``(n, d)`` fp32 of one cached passage."""
        shard, start, length = self._index[self.key(text)]
        return torch.from_numpy(np.asarray(self._array(shard)[start : start + length], dtype=np.float32))

    def padded(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states of cached ``texts``, right-padded: ``(B, n, d)`` fp32 and mask ``(B, n)``."""
        return right_pad_vectors([self.get(t) for t in texts])  # (B, n, d), (B, n)

    def ensure(self, texts: Sequence[str], *, batch_size: int = 32, desc: str = "Encoding passages") -> int:
        """Encode (and store) every text not yet cached; returns how many were encoded."""
        seen: set[str] = set()
        missing = []
        for t in texts:
            k = self.key(t)
            if k not in self._index and k not in seen:
                seen.add(k)
                missing.append(t)
        if not missing:
            return 0
        bar = tqdm(total=len(missing), desc=desc, unit="passage", mininterval=5)
        for s in range(0, len(missing), self.shard_size):
            chunk = missing[s : s + self.shard_size]
            ids = self.backend.tokenize_passages(chunk, self.max_tokens)
            order = sorted(range(len(chunk)), key=lambda i: -len(ids[i]))
            states: list[np.ndarray] = [np.empty(0)] * len(chunk)  # each filled below
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size]
                x, m = right_pad([ids[i] for i in batch], self.backend.pad_token_id)  # (B, n)
                h = self.backend.encode(x, m).float().cpu().numpy()  # (B, n, d)
                for row, i in enumerate(batch):
                    states[i] = h[row, : len(ids[i])].astype(np.float16)
                bar.update(len(batch))
            # the process id keeps shards of concurrent writers (two evaluations at once) apart
            shard = f"shard-{self._next_shard:05d}-{os.getpid()}"
            self._next_shard += 1
            flat = np.concatenate(states, axis=0)  # (N_tokens, d)
            index: dict[str, list[int]] = {}
            start = 0
            for t, st in zip(chunk, states):
                index[self.key(t)] = [start, int(st.shape[0])]
                start += int(st.shape[0])
            tmp = self.root / f"{shard}.tmp.npy"
            np.save(tmp, flat)
            os.replace(tmp, self.root / f"{shard}.npy")
            (self.root / f"{shard}.json.tmp").write_text(json.dumps(index))
            os.replace(self.root / f"{shard}.json.tmp", self.root / f"{shard}.json")
            for k, (first, length) in index.items():
                self._index[k] = (shard, first, length)
        bar.close()
        return len(missing)
