"""The on-disk (and on-wire) format of one stored passage: a small fixed header and raw tensor bytes.

Persistent backends (SQLite, Redis) store exactly the bytes :func:`encode_entry` returns and read them
back with :func:`decode_entry`; nothing is ever pickled. Layout, all little-endian::

    offset size  field
    0      4     magic b"KLMP"
    4      1     format version (1)
    5      1     dtype code: 1 float32, 2 bfloat16, 3 float16
    6      2     flags: bit 0 = explicit per-window counts follow the vectors
    8      4     ratio (the base ratio the windows were pooled at)
    12     4     W, number of windows
    16     4     d, vector width
    20     4     real tokens in the passage (the sum of the window counts)
    24     16    blake2b-128 of the namespace
    40     16    blake2b-128 of the key
    56     4     reserved, zero
    60     4     CRC-32 of bytes 0..59 and of the payload (the checksum)
    64     ...   payload: W*d vectors in the dtype, then (only with flag bit 0) W int32 counts

Format 2 (the compact storages ``int8`` and ``resN``, :mod:`kalm_rag.store.quantize`) has the same first
56 bytes with byte 5 the codec (4 int8, 5 residual), byte 6 the residual bits, byte 7 the flags, then::

    56     16    id of the codebook the entry was encoded with (zero for int8)
    72     4     CRC-32 of bytes 0..71 and of the payload
    76     ...   int8: W float32 scales, W*d int8 codes; residual: W uint16 centroid ids, W*ceil(d*bits/8)
                 packed codes; then (only with flag bit 0) W int32 counts

Format 1 entries are still written for ``float32``/``bfloat16`` (byte for byte as before) and read as before;
a format-2 entry names its codec and codebook, so it is never read as anything else.

The counts of a passage pooled by MEP from right-padded tokens are always ``[r, ..., r, rest]``, so they
follow from ``ratio``, ``W`` and the token count and are not stored: an entry is exactly
``HEADER_SIZE + W * d * itemsize`` bytes. Any other (valid, all > 0) counts are stored explicitly.

:func:`decode_entry` verifies everything (size, magic, version, dtype, shape, checksum, namespace, key,
counts, finite values) and raises :class:`CorruptEntryError` on any mismatch; backends turn that into a miss, drop the
value and count it in ``stats()["corrupt"]``, so a bad value is recomputed and never served.

>>> import torch
>>> entry = PooledPassage(torch.ones(3, 2), torch.tensor([4, 4, 1], dtype=torch.int32), 4)
>>> blob = encode_entry("ns", "k", entry)
>>> len(blob) == HEADER_SIZE + 3 * 2 * 4
True
>>> decode_entry(blob, namespace="ns", key="k").counts.tolist()
[4, 4, 1]
>>> decode_entry(blob, namespace="other", key="k")
Traceback (most recent call last):
...
kalm_rag.store.codec.CorruptEntryError: entry belongs to another namespace
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from kalm_rag.errors import StoreError
from kalm_rag.store.base import PooledPassage
from kalm_rag.store.quantize import (
    Codebook,
    CodebookMismatchError,
    dequantize_int8,
    quantize_int8,
    register_codebook,
    registered_codebook,
    residual_bits,
)

__all__ = [
    "COMPACT_FORMAT_VERSION",
    "DTYPE_CODES",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "CorruptEntryError",
    "decode_entry",
    "encode_entry",
    "entry_size",
    "validate_entry",
]

MAGIC = b"KLMP"
FORMAT_VERSION = 1
FLAG_EXPLICIT_COUNTS = 1

_PREFIX = struct.Struct("<4sBBHIIII16s16sI")  # everything the checksum covers
_CHECKSUM = struct.Struct("<I")
_DIGEST_SIZE = 16
HEADER_SIZE = _PREFIX.size + _CHECKSUM.size  # 64 bytes

COMPACT_FORMAT_VERSION = 2
_PREFIX2 = struct.Struct("<4sBBBBIIII16s16s16s")  # format 2: magic, version, codec, bits, flags, ..., codebook id
HEADER2_SIZE = _PREFIX2.size + _CHECKSUM.size  # 76 bytes
CODEC_INT8 = 4
CODEC_RESIDUAL = 5
_NO_CODEBOOK = bytes(16)
_FLOAT_STORAGES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: A store's way to find a codebook by id (its own copy for the namespace), or ``None``.
CodebookLookup = Callable[[bytes], "Codebook | None"]

#: dtype code -> (torch dtype, little-endian numpy dtype of its bits). bfloat16 travels as its raw 16 bits.
_DTYPES: dict[int, tuple[torch.dtype, str]] = {
    1: (torch.float32, "<f4"),
    2: (torch.bfloat16, "<i2"),
    3: (torch.float16, "<f2"),
}
DTYPE_CODES: dict[torch.dtype, int] = {dtype: code for code, (dtype, _) in _DTYPES.items()}
_ITEMSIZE: dict[torch.dtype, int] = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPE_CODES}


class CorruptEntryError(StoreError):
    """A stored value failed a check: truncated, bad checksum, unknown format, another namespace/key, or
    non-finite values (NaN/inf written with a valid checksum).

    Backends never let it reach the caller: they count it, drop the value and report a miss.

    Attributes:
        reason: what failed, in a few words.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@functools.lru_cache(maxsize=4096)
def _digest(text: str) -> bytes:
    """blake2b-128 of a namespace or key (cached: the same few namespaces are hashed over and over)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=_DIGEST_SIZE).digest()


def _checksum(prefix: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    """CRC-32 of header and payload: detects bit rot and torn writes (not tampering) at ~2 GB/s.

    (blake2b ran at ~0.5 GB/s here and was most of the time of a 100-entry fetch.)
    """
    return _CHECKSUM.pack(zlib.crc32(payload, zlib.crc32(prefix)))


def entry_size(num_windows: int, dim: int, dtype: torch.dtype, *, explicit_counts: bool = False) -> int:
    """Bytes :func:`encode_entry` produces for a ``(num_windows, dim)`` entry in ``dtype``."""
    counts = 4 * num_windows if explicit_counts else 0
    return HEADER_SIZE + num_windows * dim * _itemsize(dtype) + counts


def _itemsize(dtype: torch.dtype) -> int:
    if dtype not in _ITEMSIZE:
        raise StoreError(f"cannot store vectors of dtype {dtype}; supported: {sorted(map(str, DTYPE_CODES))}")
    return _ITEMSIZE[dtype]


def _implicit_counts(counts: torch.Tensor, ratio: int) -> bool:
    """Whether ``counts`` is the MEP pattern ``[ratio, ..., ratio, rest]`` with ``1 <= rest <= ratio``."""
    W = counts.shape[0]
    if W == 0:
        return True
    last = int(counts[-1])
    return 1 <= last <= ratio and bool((counts[:-1] == ratio).all())


def _tensor_bytes(t: torch.Tensor, np_dtype: str) -> bytes:
    """Raw little-endian bytes of a CPU tensor (bfloat16 as its 16-bit pattern)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(np_dtype, copy=False).tobytes()


def validate_entry(entry: PooledPassage) -> None:
    """Check that ``entry`` can be stored and served: shapes, dtype, counts, and finite vectors.

    Every backend calls it before writing, so a value that :func:`decode_entry` would refuse (or that
    would make every later score on the passage non-finite) never enters a store.

    Raises:
        StoreError: the entry is malformed, names what is wrong.
    """
    vectors, counts, ratio = entry.vectors, entry.counts, entry.ratio
    if not isinstance(vectors, torch.Tensor) or not isinstance(counts, torch.Tensor):
        raise StoreError("vectors and counts must be tensors")
    if vectors.dim() != 2:
        raise StoreError(f"vectors must be (W, d), got shape {tuple(vectors.shape)}")
    W, d = vectors.shape
    if counts.shape != (W,):
        raise StoreError(f"counts must be ({W},) to match vectors {tuple(vectors.shape)}, got {tuple(counts.shape)}")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise StoreError(f"ratio must be an int >= 1, got {ratio!r}")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise StoreError(f"counts must be integers, got {counts.dtype}")
    if W and int(counts.min()) < 1:
        raise StoreError("every window count must be >= 1 (empty windows are not stored)")
    if vectors.dtype not in DTYPE_CODES:
        raise StoreError(f"cannot store vectors of dtype {vectors.dtype}; supported: {sorted(map(str, DTYPE_CODES))}")
    if not bool(torch.isfinite(vectors).all()):
        raise StoreError("vectors hold NaN or infinite values; such an entry would poison every later score")


def encode_entry(namespace: str, key: str, entry: PooledPassage) -> bytes:
    """Serialise ``entry`` (stored under ``namespace``/``key``) into header + raw tensor bytes.

    Raises:
        StoreError: the entry is malformed (shapes, dtype, counts, non-finite values) and would not decode.
    """
    validate_entry(entry)
    blob = entry.blob
    if blob is not None and blob[24:40] == _digest(namespace) and blob[40:56] == _digest(key):
        return blob  # read from a store for this very namespace/key: keep its bytes (never re-quantise)
    storage = entry.storage
    if storage is not None and storage not in _FLOAT_STORAGES:
        return _encode_compact(namespace, key, entry, storage)
    if storage is not None and entry.vectors.dtype != _FLOAT_STORAGES[storage]:
        entry = replace(entry, vectors=entry.vectors.to(_FLOAT_STORAGES[storage]))
    vectors, counts, ratio = entry.vectors, entry.counts, int(entry.ratio)
    W, d = vectors.shape
    code = DTYPE_CODES[vectors.dtype]
    explicit = not _implicit_counts(counts, ratio)
    payload = _tensor_bytes(vectors, _DTYPES[code][1])
    if explicit:
        payload += _tensor_bytes(counts.to(torch.int32), "<i4")
    prefix = _PREFIX.pack(
        MAGIC,
        FORMAT_VERSION,
        code,
        FLAG_EXPLICIT_COUNTS if explicit else 0,
        ratio,
        W,
        d,
        int(counts.sum()),
        _digest(namespace),
        _digest(key),
        0,
    )
    return b"".join((prefix, _checksum(prefix, payload), payload))


def decode_entry(
    blob: bytes | bytearray | memoryview,
    *,
    namespace: str,
    key: str,
    codebook: Codebook | None = None,
    lookup: CodebookLookup | None = None,
    verify: bool = True,
) -> PooledPassage:
    """Parse and verify a value written by :func:`encode_entry` for ``namespace``/``key``.

    Args:
        blob: the stored bytes.
        namespace: the namespace the value was read under.
        key: the key the value was read under.
        codebook: the codebook a ``resN`` entry must have been encoded with (checked against the entry's id).
        lookup: otherwise, how to find the entry's codebook by id (after this process's known codebooks).
        verify: check the CRC and finiteness (an in-process memory tier skips both: its bytes never left RAM).

    Raises:
        CorruptEntryError: anything does not check out, or the codebook the entry names cannot be found;
            the value must not be served.
        CodebookMismatchError: ``codebook`` is not the codebook the entry was encoded with.
    """
    view = memoryview(blob)
    if len(view) < HEADER_SIZE:
        raise CorruptEntryError(f"value of {len(view)} bytes is shorter than the {HEADER_SIZE}-byte header")
    if view[4] == COMPACT_FORMAT_VERSION and view[:4] == MAGIC:
        return _decode_compact(_as_bytes(blob), view, namespace, key, codebook=codebook, lookup=lookup, verify=verify)
    magic, version, code, flags, ratio, W, d, n_tokens, ns_digest, key_digest, reserved = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntryError("not a kalm-rag passage value (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"format version {version} is not supported (this build reads {FORMAT_VERSION})")
    if code not in _DTYPES or flags & ~FLAG_EXPLICIT_COUNTS or ratio < 1 or reserved:
        raise CorruptEntryError(f"bad header fields (dtype code {code}, flags {flags}, ratio {ratio})")
    dtype, np_dtype = _DTYPES[code]
    explicit = bool(flags & FLAG_EXPLICIT_COUNTS)
    expected = entry_size(W, d, dtype, explicit_counts=explicit)
    if len(view) != expected:
        raise CorruptEntryError(f"value is {len(view)} bytes, its header says {expected}")
    payload = view[HEADER_SIZE:]
    if verify and _checksum(view[: _PREFIX.size], payload) != view[_PREFIX.size : HEADER_SIZE]:
        raise CorruptEntryError("checksum mismatch")
    _check_owner(ns_digest, key_digest, namespace, key)
    n_vec = W * d
    # astype copies into native byte order: the tensors own writable memory
    flat = np.frombuffer(payload, dtype=np_dtype, count=n_vec).astype(np_dtype[1:], copy=True)
    vectors = torch.from_numpy(flat).view(dtype) if dtype == torch.bfloat16 else torch.from_numpy(flat)
    vectors = vectors.reshape(W, d)
    if verify and not bool(torch.isfinite(vectors).all()):  # a valid checksum over NaN/inf: recompute
        raise CorruptEntryError("vectors hold NaN or infinite values")
    counts = _read_counts(payload, n_vec * _itemsize(dtype), W, ratio, n_tokens, explicit)
    storage = "bfloat16" if dtype == torch.bfloat16 else "float32" if dtype == torch.float32 else None
    return PooledPassage(vectors, counts, ratio, storage=storage, blob=_as_bytes(blob))


def _as_bytes(blob: bytes | bytearray | memoryview) -> bytes:
    return blob if isinstance(blob, bytes) else bytes(blob)


def _check_owner(ns_digest: bytes, key_digest: bytes, namespace: str, key: str) -> None:
    # the checksum also covers these digests, so a mismatch here is a misplaced value, not bit rot
    if ns_digest != _digest(namespace):
        raise CorruptEntryError("entry belongs to another namespace")
    if key_digest != _digest(key):
        raise CorruptEntryError("entry belongs to another key")


def _read_counts(payload: memoryview, offset: int, W: int, ratio: int, n_tokens: int, explicit: bool) -> torch.Tensor:
    if not explicit:
        return _mep_counts(W, ratio, n_tokens)
    raw = np.frombuffer(payload, dtype="<i4", count=W, offset=offset)
    counts = torch.from_numpy(raw.astype(np.int32, copy=True))
    if W and int(counts.min()) < 1:
        raise CorruptEntryError("a window count is < 1")
    if int(counts.sum()) != n_tokens:
        raise CorruptEntryError(f"window counts sum to {int(counts.sum())}, the header says {n_tokens} tokens")
    return counts


def compact_entry_size(num_windows: int, dim: int, storage: str, *, explicit_counts: bool = False) -> int:
    """Bytes :func:`encode_entry` produces for a ``(num_windows, dim)`` entry in a compact ``storage``."""
    bits = residual_bits(storage)
    per_vector = 2 + -(-dim * bits // 8) if bits else 4 + dim
    return HEADER2_SIZE + num_windows * per_vector + (4 * num_windows if explicit_counts else 0)


def _encode_compact(namespace: str, key: str, entry: PooledPassage, storage: str) -> bytes:
    """Format 2: int8 or centroid + residual codes (see the module docstring)."""
    vectors, counts, ratio = entry.vectors, entry.counts, int(entry.ratio)
    W, d = vectors.shape
    bits = residual_bits(storage)
    if storage == "int8":
        codes, scales = quantize_int8(vectors)
        payload = scales.numpy().astype("<f4").tobytes() + codes.numpy().tobytes()
        codec, book_id = CODEC_INT8, _NO_CODEBOOK
    elif bits:
        book = entry.codebook
        if book is None or book.bits != bits:
            raise StoreError(f"storage {storage} needs a {bits}-bit residual codebook to encode an entry")
        if book.dim != d:
            raise CodebookMismatchError(f"vectors of width {d} cannot use a codebook of width {book.dim}")
        register_codebook(book)  # so that this process decodes what it wrote without a store read
        ids, packed = book.encode(vectors)
        payload = ids.astype("<u2").tobytes() + packed.tobytes()
        codec, book_id = CODEC_RESIDUAL, book.id
    else:
        raise StoreError(f"unknown storage {storage!r}")
    explicit = not _implicit_counts(counts, ratio)
    if explicit:
        payload += _tensor_bytes(counts.to(torch.int32), "<i4")
    prefix = _PREFIX2.pack(
        MAGIC,
        COMPACT_FORMAT_VERSION,
        codec,
        bits,
        FLAG_EXPLICIT_COUNTS if explicit else 0,
        ratio,
        W,
        d,
        int(counts.sum()),
        _digest(namespace),
        _digest(key),
        book_id,
    )
    return b"".join((prefix, _checksum(prefix, payload), payload))


def _decode_compact(
    raw: bytes,
    view: memoryview,
    namespace: str,
    key: str,
    *,
    codebook: Codebook | None,
    lookup: CodebookLookup | None,
    verify: bool,
) -> PooledPassage:
    if len(view) < HEADER2_SIZE:
        raise CorruptEntryError(f"value of {len(view)} bytes is shorter than the {HEADER2_SIZE}-byte header")
    _, _, codec, bits, flags, ratio, W, d, n_tokens, ns_digest, key_digest, book_id = _PREFIX2.unpack_from(view)
    if codec not in (CODEC_INT8, CODEC_RESIDUAL) or flags & ~FLAG_EXPLICIT_COUNTS or ratio < 1 or d < 1:
        raise CorruptEntryError(f"bad header fields (codec {codec}, flags {flags}, ratio {ratio})")
    if (codec == CODEC_INT8) != (bits == 0) or bits not in (0, 1, 2, 4):
        raise CorruptEntryError(f"bad header fields (codec {codec}, bits {bits})")
    explicit = bool(flags & FLAG_EXPLICIT_COUNTS)
    storage = "int8" if codec == CODEC_INT8 else f"res{bits}"
    expected = compact_entry_size(W, d, storage, explicit_counts=explicit)
    if len(view) != expected:
        raise CorruptEntryError(f"value is {len(view)} bytes, its header says {expected}")
    payload = view[HEADER2_SIZE:]
    if verify and _checksum(view[: _PREFIX2.size], payload) != view[_PREFIX2.size : HEADER2_SIZE]:
        raise CorruptEntryError("checksum mismatch")
    _check_owner(ns_digest, key_digest, namespace, key)
    book = None
    if codec == CODEC_INT8:
        scales = torch.from_numpy(np.frombuffer(payload, dtype="<f4", count=W).astype(np.float32))
        codes = torch.from_numpy(np.frombuffer(payload, dtype=np.int8, count=W * d, offset=4 * W).reshape(W, d).copy())
        vectors = dequantize_int8(codes, scales)
        used = 4 * W + W * d
    else:
        book = _find_codebook(book_id, codebook, lookup)
        if book.bits != bits or book.dim != d:
            raise CorruptEntryError(f"codebook ({book.bits} bits, width {book.dim}) does not fit the entry")
        ids = np.frombuffer(payload, dtype="<u2", count=W)
        if W and int(ids.max()) >= book.num_centroids:
            raise CorruptEntryError("a centroid id is out of the codebook's range")
        nbytes = book.code_bytes
        packed = np.frombuffer(payload, dtype=np.uint8, count=W * nbytes, offset=2 * W).reshape(W, nbytes)
        vectors = book.decode(ids, packed)
        used = 2 * W + W * nbytes
    if verify and not bool(torch.isfinite(vectors).all()):
        raise CorruptEntryError("vectors hold NaN or infinite values")
    counts = _read_counts(payload, used, W, ratio, n_tokens, explicit)
    return PooledPassage(vectors, counts, ratio, storage=storage, codebook=book, blob=raw)


def _find_codebook(book_id: bytes, codebook: Codebook | None, lookup: CodebookLookup | None) -> Codebook:
    if codebook is not None:
        if codebook.id != book_id:
            raise CodebookMismatchError(
                f"the entry was encoded with codebook {book_id.hex()[:12]}, not {codebook.id.hex()[:12]}"
            )
        return codebook
    book = registered_codebook(book_id)
    if book is None and lookup is not None:
        book = lookup(book_id)
    if book is None or book.id != book_id:
        raise CorruptEntryError(f"the codebook {book_id.hex()[:12]} the entry was encoded with is not in the store")
    return book


def _mep_counts(W: int, ratio: int, n_tokens: int) -> torch.Tensor:
    """The counts ``[ratio] * (W - 1) + [rest]`` of ``n_tokens`` real tokens in ``W`` windows."""
    rest = n_tokens - (W - 1) * ratio
    if W and not 1 <= rest <= ratio:
        raise CorruptEntryError(f"{n_tokens} tokens do not fill {W} windows of {ratio}")
    if not W and n_tokens:
        raise CorruptEntryError(f"{n_tokens} tokens in 0 windows")
    counts = np.full(W, ratio, dtype=np.int32)
    if W:
        counts[-1] = rest
    return torch.from_numpy(counts)
