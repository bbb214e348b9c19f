"""Compact vector codecs: ``int8`` (symmetric, one scale per vector) and ``resN`` (centroid + N-bit residual).

``resN`` is ColBERTv2's residual compression: every pooled passage vector is stored as the id of its
nearest centroid (k-means, trained with faiss on a sample of the corpus's own vectors) plus an ``N``-bit
code per dimension for what the centroid misses (N in 1, 2, 4). The codes are buckets of the residual
per dimension: cut at its quantiles, decoded to the bucket's middle quantile (hidden states have
dimensions of very different spread, so the buckets are per dimension). A 384-d vector takes
``2 + 384 * N / 8`` bytes (50 at N=1) instead of 1536 in float32.

A :class:`Codebook` is stored once per namespace in the store; its id is the blake2b-128 of its bytes
(which is also its checksum) and every ``resN`` entry names the id it was encoded with, so an entry is
never decoded with another codebook (:class:`CodebookMismatchError`).

>>> import torch
>>> x = torch.randn(5, 8)
>>> codes, scales = quantize_int8(x)
>>> bool((dequantize_int8(codes, scales) - x).abs().max() <= scales.max() / 2 + 1e-6)
True
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kalm_rag.errors import MissingDependencyError, StoreError

__all__ = [
    "COMPACT_STORAGES",
    "DEFAULT_TRAIN_PASSAGES",
    "STORAGES",
    "Codebook",
    "CodebookError",
    "CodebookMismatchError",
    "CorruptCodebookError",
    "check_storage",
    "dequantize_int8",
    "quantize_int8",
    "register_codebook",
    "registered_codebook",
    "residual_bits",
    "train_codebook",
]

#: Every ``storage=`` value: the two exact float formats (entry format 1) and the compact codecs (format 2).
STORAGES = ("float32", "bfloat16", "int8", "res4", "res2", "res1")
COMPACT_STORAGES = ("int8", "res4", "res2", "res1")
#: Passages whose pooled vectors train a namespace's codebook (``kalm-rag index`` takes the first ones).
DEFAULT_TRAIN_PASSAGES = 256
#: At most this many vectors go into k-means (a random sample beyond it), and at most this many centroids.
MAX_TRAIN_VECTORS = 65536
MAX_CENTROIDS = 1024
_POINTS_PER_CENTROID = 39  # faiss warns below 39 training points per centroid

_MAGIC = b"KLMC"
_VERSION = 1
_HEAD = struct.Struct("<4sBBHII")  # magic, version, bits, reserved, K, d
_ID_SIZE = 16


class CodebookError(StoreError):
    """A codebook cannot be used (base class of the codebook errors)."""


class CorruptCodebookError(CodebookError):
    """Stored codebook bytes failed their checks (truncated, bad checksum, unknown version)."""


class CodebookMismatchError(CodebookError):
    """An entry encoded with one codebook was about to be decoded with another."""


def check_storage(value: object, name: str = "storage") -> str:
    """``value`` if it is one of :data:`STORAGES`.

    Raises:
        InvalidInputError: an unknown storage name (the message lists the known ones).
    """
    if not isinstance(value, str) or value not in STORAGES:
        from kalm_rag.errors import InvalidInputError

        raise InvalidInputError(f"{name} must be one of {', '.join(STORAGES)}; got {value!r:.80}")
    return value


def residual_bits(storage: str) -> int:
    """``N`` of ``resN`` (0 for the other storages)."""
    return int(storage[3:]) if storage.startswith("res") else 0


# ----- int8 ---------------------------------------------------------------------------------------


def quantize_int8(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes ``(W, d)`` and float32 scales ``(W,)``: ``x ~= code * scale``, ``|error| <= scale / 2``."""
    x = vectors.detach().float()  # (W, d)
    scales = x.abs().amax(dim=1) / 127.0  # (W,)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(x / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 vectors ``(W, d)`` from :func:`quantize_int8`'s codes and scales."""
    return codes.float() * scales[:, None]


# ----- residual codebooks -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Codebook:
    """Centroids and per-dimension residual buckets of one namespace.

    Attributes:
        bits: residual bits per dimension (1, 2 or 4).
        centroids: ``(K, d)`` float32 k-means centroids.
        cutoffs: ``(d, 2**bits - 1)`` float32 bucket boundaries of the residual, per dimension.
        weights: ``(d, 2**bits)`` float32 value each bucket decodes to, per dimension.
    """

    bits: int
    centroids: np.ndarray
    cutoffs: np.ndarray
    weights: np.ndarray
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        """Vector width ``d``."""
        return int(self.centroids.shape[1])

    @property
    def num_centroids(self) -> int:
        """``K``."""
        return int(self.centroids.shape[0])

    @property
    def code_bytes(self) -> int:
        """Packed residual bytes per vector: ``ceil(d * bits / 8)``."""
        return math.ceil(self.dim * self.bits / 8)

    def to_bytes(self) -> bytes:
        """Serialised codebook; its last 16 bytes are the blake2b-128 of the rest (its id and checksum)."""
        if "bytes" not in self._cache:
            body = b"".join(
                (
                    _HEAD.pack(_MAGIC, _VERSION, self.bits, 0, self.num_centroids, self.dim),
                    self.centroids.astype("<f4").tobytes(),
                    self.cutoffs.astype("<f4").tobytes(),
                    self.weights.astype("<f4").tobytes(),
                )
            )
            self._cache["bytes"] = body + hashlib.blake2b(body, digest_size=_ID_SIZE).digest()
        return bytes(self._cache["bytes"])

    @property
    def id(self) -> bytes:
        """The codebook's identity: blake2b-128 of its serialised bytes (16 bytes)."""
        return self.to_bytes()[-_ID_SIZE:]

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> Codebook:
        """Parse and verify :meth:`to_bytes` output.

        Raises:
            CorruptCodebookError: wrong size, magic, version or checksum.
        """
        data = bytes(blob)
        if len(data) < _HEAD.size + _ID_SIZE:
            raise CorruptCodebookError(f"codebook of {len(data)} bytes is truncated")
        body, digest = data[:-_ID_SIZE], data[-_ID_SIZE:]
        if hashlib.blake2b(body, digest_size=_ID_SIZE).digest() != digest:
            raise CorruptCodebookError("codebook checksum mismatch")
        magic, version, bits, _, K, d = _HEAD.unpack_from(body)
        if magic != _MAGIC or version != _VERSION or bits not in (1, 2, 4) or K < 1 or d < 1:
            raise CorruptCodebookError(f"not a codebook this kalm-rag reads (version {version}, bits {bits})")
        levels = 1 << bits
        sizes = [K * d, d * (levels - 1), d * levels]
        if len(body) != _HEAD.size + 4 * sum(sizes):
            raise CorruptCodebookError("codebook size does not match its header")
        arrays, offset = [], _HEAD.size
        for n in sizes:
            arrays.append(np.frombuffer(body, dtype="<f4", count=n, offset=offset).astype(np.float32))
            offset += 4 * n
        book = cls(bits, arrays[0].reshape(K, d), arrays[1].reshape(d, levels - 1), arrays[2].reshape(d, levels))
        book._cache["bytes"] = data
        return book

    # -- encode / decode ---------------------------------------------------------------------------

    def _search(self, x: np.ndarray) -> np.ndarray:
        """Nearest centroid id of each row of ``x`` ``(W, d)`` (faiss exact L2 search)."""
        faiss = _faiss()
        index = self._cache.get("index")
        if index is None:
            index = faiss.IndexFlatL2(self.dim)
            index.add(np.ascontiguousarray(self.centroids))
            self._cache["index"] = index
        _, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return ids[:, 0].astype(np.int64)

    def encode(self, vectors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Centroid ids ``(W,)`` uint16 and packed residual codes ``(W, code_bytes)`` uint8 of ``(W, d)`` vectors."""
        x = vectors.detach().float().cpu().numpy()
        if x.shape[1] != self.dim:
            raise CodebookMismatchError(f"vectors of width {x.shape[1]} cannot use a codebook of width {self.dim}")
        ids = self._search(x) if len(x) else np.zeros(0, dtype=np.int64)
        residual = x - self.centroids[ids]  # (W, d)
        codes = (residual[:, :, None] > self.cutoffs[None]).sum(axis=2).astype(np.uint8)  # (W, d) in [0, 2**b)
        return ids.astype(np.uint16), _pack(codes, self.bits)

    def decode(self, ids: np.ndarray, packed: np.ndarray) -> torch.Tensor:
        """float32 vectors ``(W, d)`` from :meth:`encode`'s ids and packed codes.

        One table lookup per code byte: ``byte_table[j * 256 + byte]`` holds the decoded residual values of the
        ``8 / bits`` dimensions that byte ``j`` packs, so no per-dimension unpacking is needed.
        """
        tables = self._cache.get("tables")
        if tables is None:
            per_byte = 8 // self.bits
            nbytes = self.code_bytes
            mask = (1 << self.bits) - 1
            byte = np.arange(256)[:, None]  # (256, 1)
            codes = (byte >> (np.arange(per_byte) * self.bits)) & mask  # (256, per_byte)
            padded = np.zeros((nbytes * per_byte, 1 << self.bits), dtype=np.float32)
            padded[: self.dim] = self.weights
            dims = np.arange(nbytes)[:, None, None] * per_byte + np.arange(per_byte)[None, None, :]  # (nbytes, 1, pb)
            table = padded[dims, codes[None]]  # (nbytes, 256, per_byte)
            offsets = torch.arange(nbytes, dtype=torch.int64) * 256
            flat = torch.from_numpy(np.ascontiguousarray(table.reshape(nbytes * 256, per_byte)))
            tables = (torch.from_numpy(self.centroids), flat, offsets)
            self._cache["tables"] = tables
        centroids, table, offsets = tables
        index = torch.from_numpy(packed.astype(np.int64)) + offsets  # (W, nbytes)
        residual = table[index].reshape(len(packed), -1)[:, : self.dim]  # (W, d)
        return centroids[torch.from_numpy(ids.astype(np.int64))] + residual


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``(W, d)`` codes of ``bits`` bits -> ``(W, ceil(d * bits / 8))`` bytes, low bits first."""
    W, d = codes.shape
    per_byte = 8 // bits
    padded = np.zeros((W, math.ceil(d / per_byte) * per_byte), dtype=np.uint8)
    padded[:, :d] = codes
    groups = padded.reshape(W, -1, per_byte)
    out = np.zeros(groups.shape[:2], dtype=np.uint8)
    for j in range(per_byte):
        out |= (groups[:, :, j] << (j * bits)).astype(np.uint8)
    return out


def _unpack(packed: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Inverse of :func:`_pack`: ``(W, dim)`` uint8 codes."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (packed[:, :, None] >> shifts) & mask  # (W, bytes, per_byte)
    return codes.reshape(packed.shape[0], -1)[:, :dim]


def train_codebook(vectors: torch.Tensor | np.ndarray, *, bits: int, seed: int = 0) -> Codebook:
    """Train a ``resN`` codebook on sample vectors ``(n, d)`` (pooled passage vectors of the corpus).

    ``K`` is the largest power of two with at least 39 vectors per centroid (1 to 1024); k-means is faiss's
    (20 iterations, at most 65,536 sampled vectors). The residual buckets are the per-dimension quantiles of
    the sample's residuals to their centroids.

    Raises:
        MissingDependencyError: faiss-cpu is not installed (a kalm-rag dependency: ``pip install faiss-cpu``).
        CodebookError: no vectors, or ``bits`` not 1, 2 or 4.
    """
    if bits not in (1, 2, 4):
        raise CodebookError(f"residual bits must be 1, 2 or 4, got {bits!r}")
    x = vectors.detach().float().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise CodebookError(f"a codebook needs sample vectors (n, d) with n >= 1, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    if len(x) > MAX_TRAIN_VECTORS:
        x = x[rng.choice(len(x), MAX_TRAIN_VECTORS, replace=False)]
    n, d = x.shape
    K = 1 << max(0, min(int(math.log2(max(1, n // _POINTS_PER_CENTROID))), int(math.log2(MAX_CENTROIDS))))
    if K > 1:
        faiss = _faiss()
        kmeans = faiss.Kmeans(d, K, niter=20, seed=seed, verbose=False, max_points_per_centroid=n)
        kmeans.train(x)
        centroids = np.asarray(kmeans.centroids, dtype=np.float32).reshape(K, d)
        _, assign = kmeans.index.search(x, 1)
        residual = x - centroids[assign[:, 0]]
    else:
        centroids = x.mean(axis=0, keepdims=True)
        residual = x - centroids
    cutoffs, weights = _lloyd_max(residual, 1 << bits)
    book = Codebook(
        bits, centroids, np.ascontiguousarray(cutoffs, np.float32), np.ascontiguousarray(weights, np.float32)
    )
    return register_codebook(book)


def _lloyd_max(residual: np.ndarray, levels: int, iterations: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension scalar quantiser of ``residual`` ``(n, d)``: cutoffs ``(d, levels - 1)``, values ``(d, levels)``.

    Starts from the quantiles and runs Lloyd-Max (values = mean of their bucket, cutoffs = midpoints), which
    lowers the error on heavy-tailed dimensions, where quantile midpoints leave the tails far off.
    """
    n, d = residual.shape
    weights = np.quantile(residual, (np.arange(levels) + 0.5) / levels, axis=0).T.astype(np.float64)  # (d, L)
    flat_offsets = np.arange(d) * levels  # (d,)
    for _ in range(iterations):
        cutoffs = (weights[:, 1:] + weights[:, :-1]) / 2  # (d, L - 1)
        codes = (residual[:, :, None] > cutoffs[None]).sum(axis=2)  # (n, d)
        index = (codes + flat_offsets).ravel()
        sums = np.bincount(index, weights=residual.ravel().astype(np.float64), minlength=d * levels)
        counts = np.bincount(index, minlength=d * levels)
        means = sums / np.maximum(counts, 1)
        weights = np.where(counts > 0, means, weights.ravel()).reshape(d, levels)
        weights = np.sort(weights, axis=1)
    cutoffs = (weights[:, 1:] + weights[:, :-1]) / 2
    return cutoffs.astype(np.float32), weights.astype(np.float32)


def _faiss() -> Any:
    try:
        import faiss
    except ModuleNotFoundError as exc:
        raise MissingDependencyError('storage="resN" needs faiss-cpu: pip install faiss-cpu') from exc
    return faiss


# ----- the process's codebooks, by id (ids are content hashes, so any store's copy is the same codebook) ------

_REGISTRY: dict[bytes, Codebook] = {}
_REGISTRY_LOCK = threading.Lock()


def register_codebook(book: Codebook) -> Codebook:
    """Remember ``book`` by id for decoding; returns the registered instance (the first one with that id)."""
    with _REGISTRY_LOCK:
        return _REGISTRY.setdefault(book.id, book)


def registered_codebook(codebook_id: bytes) -> Codebook | None:
    """The codebook of ``codebook_id`` this process has seen, or ``None``."""
    return _REGISTRY.get(bytes(codebook_id))
