"""The value format: exact sizes, lossless round trips, and every kind of damage detected."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from kalm_rag.errors import StoreError
from kalm_rag.store import PooledPassage, codec, passage_key
from kalm_rag.store.codec import HEADER_SIZE, CorruptEntryError, decode_entry, encode_entry, entry_size
from tests.store.helpers import make_entry, same_entry

NS = "t5gemma2:0123456789abcdef"
KEY = passage_key("Paris is the capital of France.")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio", [1, 4, 16])
def test_size_is_windows_times_width_times_itemsize_plus_header(dtype, ratio):
    n, d = 1024, 640  # Nano: 1024 passage tokens, 640-wide vectors
    entry = make_entry(0, n_tokens=n - 3, ratio=ratio, dim=d, dtype=dtype)
    blob = encode_entry(NS, KEY, entry)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert len(blob) == math.ceil((n - 3) / ratio) * d * itemsize + HEADER_SIZE
    assert HEADER_SIZE <= 128
    assert same_entry(decode_entry(blob, namespace=NS, key=KEY), entry)


def test_non_mep_counts_are_stored_explicitly_and_round_trip():
    entry = PooledPassage(torch.randn(3, 4), torch.tensor([2, 5, 1], dtype=torch.int32), 4)
    blob = encode_entry(NS, KEY, entry)
    assert len(blob) == entry_size(3, 4, torch.float32, explicit_counts=True)
    assert same_entry(decode_entry(blob, namespace=NS, key=KEY), entry)


def test_bfloat16_bits_and_special_values_survive():
    # signed zeros, the extremes of the range (infinities are refused: see test_non_finite_*)
    vectors = torch.tensor([[0.0, -0.0, 1e30, -1e-30], [3.3e38, 3.140625, -2.5, 1.0]], dtype=torch.bfloat16)
    entry = PooledPassage(vectors, torch.tensor([1, 1], dtype=torch.int32), 1)
    out = decode_entry(encode_entry(NS, KEY, entry), namespace=NS, key=KEY)
    assert out.vectors.dtype == torch.bfloat16
    assert torch.equal(out.vectors.view(torch.int16), vectors.view(torch.int16))


def test_decoded_tensors_own_writable_memory():
    out = decode_entry(encode_entry(NS, KEY, make_entry(1)), namespace=NS, key=KEY)
    out.vectors.add_(1.0)  # would fail (or warn) on a read-only buffer


def test_empty_passage_round_trips():
    entry = PooledPassage(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int32), 4)
    out = decode_entry(encode_entry(NS, KEY, entry), namespace=NS, key=KEY)
    assert out.vectors.shape == (0, 4)


def _flip(blob: bytes, offset: int) -> bytes:
    damaged = bytearray(blob)
    damaged[offset] ^= 0x01
    return bytes(damaged)


@pytest.mark.parametrize("offset", [0, 4, 5, 6, 8, 12, 16, 20, 24, 40, 56, 60, HEADER_SIZE, HEADER_SIZE + 37, -1])
def test_any_flipped_bit_is_detected(offset):
    blob = encode_entry(NS, KEY, make_entry(2))
    with pytest.raises(CorruptEntryError):
        decode_entry(_flip(blob, offset), namespace=NS, key=KEY)


@pytest.mark.parametrize("cut", [0, 10, HEADER_SIZE - 1, HEADER_SIZE, -1])
def test_truncated_and_extended_values_are_detected(cut):
    blob = encode_entry(NS, KEY, make_entry(3))
    with pytest.raises(CorruptEntryError):
        decode_entry(blob[:cut], namespace=NS, key=KEY)
    with pytest.raises(CorruptEntryError):
        decode_entry(blob + b"\0", namespace=NS, key=KEY)


def test_a_value_of_another_namespace_or_key_is_refused():
    blob = encode_entry(NS, KEY, make_entry(4))
    with pytest.raises(CorruptEntryError, match="another namespace"):
        decode_entry(blob, namespace=NS + "x", key=KEY)
    with pytest.raises(CorruptEntryError, match="another key"):
        decode_entry(blob, namespace=NS, key=passage_key("other text"))


def _reseal(blob: bytearray) -> None:
    """Recompute the checksum of an edited value, as a buggy or hostile writer would."""
    blob[HEADER_SIZE - 4 : HEADER_SIZE] = codec._checksum(bytes(blob[: HEADER_SIZE - 4]), bytes(blob[HEADER_SIZE:]))


def test_a_future_format_version_is_refused_even_with_a_valid_checksum():
    blob = bytearray(encode_entry(NS, KEY, make_entry(5)))
    blob[4] = codec.COMPACT_FORMAT_VERSION + 1
    _reseal(blob)
    with pytest.raises(CorruptEntryError, match="version"):
        decode_entry(bytes(blob), namespace=NS, key=KEY)


def test_a_header_with_inconsistent_token_count_is_refused_even_with_a_valid_checksum():
    blob = bytearray(encode_entry(NS, KEY, make_entry(6, n_tokens=13, ratio=4)))  # 4 windows
    struct.pack_into("<I", blob, 20, 99)  # 99 tokens cannot fill 4 windows of 4
    _reseal(blob)
    with pytest.raises(CorruptEntryError, match="tokens"):
        decode_entry(bytes(blob), namespace=NS, key=KEY)


def test_corrupt_entry_error_is_a_store_error():
    assert issubclass(CorruptEntryError, StoreError)


@pytest.mark.parametrize(
    "entry, message",
    [
        (PooledPassage(torch.zeros(2, 3, 4), torch.ones(2, dtype=torch.int32), 1), "must be \\(W, d\\)"),
        (PooledPassage(torch.zeros(2, 3), torch.ones(3, dtype=torch.int32), 1), "counts must be"),
        (PooledPassage(torch.zeros(2, 3), torch.tensor([1, 0], dtype=torch.int32), 1), ">= 1"),
        (PooledPassage(torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.int32), 1), "dtype"),
        (PooledPassage(torch.zeros(2, 3), torch.ones(2, dtype=torch.int32), 0), "ratio"),
    ],
)
def test_malformed_entries_are_refused_when_written(entry, message):
    with pytest.raises(StoreError, match=message):
        encode_entry(NS, KEY, entry)


def test_the_store_package_never_uses_pickle():
    import pathlib
    import re

    import kalm_rag.store

    for path in pathlib.Path(kalm_rag.store.__file__).parent.glob("*.py"):
        assert not re.search(r"import (c?pickle|marshal|shelve)|pickle\.|torch\.load", path.read_text()), path.name
