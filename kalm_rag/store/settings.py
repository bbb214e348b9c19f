"""The settings that shape stored vectors travel with the store: recorded once per model, adopted by readers.

``base_ratio``, ``storage`` and ``max_passage_tokens`` decide what a stored passage vector is, and they are
part of the store namespace: a reranker opened with other values finds nothing and re-encodes everything.
So the first reranker (or ``kalm-rag index``) that writes vectors of a model into a store records its
settings there (the store record ``settings`` of the model's scope, first writer wins), and a reranker
opened later on that store with these options left out adopts them; one given an option that contradicts
the record is refused with :class:`StoreSettingsError`.

Without a record, the model family's defaults apply (:func:`family_defaults`), except on a store written by
kalm-rag before records existed: when it holds entries under the namespace of the old defaults (base ratio
1, float32, 1024 tokens), those are adopted, so an existing store keeps scoring exactly as before.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from kalm_rag.errors import InvalidInputError, StoreError
from kalm_rag.store.base import PassageStore
from kalm_rag.store.quantize import check_storage

__all__ = [
    "LEGACY_DEFAULTS",
    "SETTINGS_RECORD",
    "StoreSettingsError",
    "VectorSettings",
    "family_defaults",
    "read_settings",
    "record_settings",
]

SETTINGS_RECORD = "settings"


class StoreSettingsError(InvalidInputError):
    """The store holds this model's vectors made with other settings than the ones given."""


@dataclass(frozen=True)
class VectorSettings:
    """What shapes a model's stored passage vectors.

    Attributes:
        base_ratio: MEP ratio the vectors are pooled at (call ratios are multiples of it).
        storage: how they are kept: ``float32``, ``bfloat16``, ``int8``, ``res4``, ``res2`` or ``res1``.
        max_passage_tokens: passages are cut to this many tokens before encoding.
    """

    base_ratio: int
    storage: str
    max_passage_tokens: int

    def to_bytes(self) -> bytes:
        """The record as stored (JSON)."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> VectorSettings:
        """Parse a record (raises :class:`StoreError` on a damaged one)."""
        try:
            raw = json.loads(blob)
            settings = cls(int(raw["base_ratio"]), check_storage(raw["storage"]), int(raw["max_passage_tokens"]))
        except (ValueError, KeyError, TypeError, InvalidInputError) as exc:
            raise StoreError(f"the store's settings record is damaged: {exc}") from None
        return settings


#: What kalm-rag stored before settings were recorded (and still the official checkpoints' default).
LEGACY_DEFAULTS = VectorSettings(base_ratio=1, storage="float32", max_passage_tokens=1024)
#: kalm-mini's compact default: ratio-4 windows (its default call ratio, so scoring is unchanged), 4-bit
#: residuals (docs/benchmarks/storage.md: >= 30x fewer bytes than LEGACY_DEFAULTS).
COMPACT_DEFAULTS = VectorSettings(base_ratio=4, storage="res4", max_passage_tokens=1024)


def family_defaults(family: str) -> VectorSettings:
    """The settings a model family stores with when neither the caller nor the store says otherwise.

    kalm-mini stores compact vectors; the official checkpoints keep exact float32 at base ratio 1, so their
    scores stay equal to the official recipe's (compact storage is one option away: ``storage="res4"``).
    """
    return COMPACT_DEFAULTS if family == "kalm-mini" else LEGACY_DEFAULTS


def read_settings(store: PassageStore, scope: str) -> VectorSettings | None:
    """The settings recorded for ``scope`` (a model) in ``store``, or ``None``."""
    try:
        blob = store.get_meta(scope, SETTINGS_RECORD)
    except StoreError:
        return None
    return None if blob is None else VectorSettings.from_bytes(blob)


def record_settings(store: PassageStore, scope: str, settings: VectorSettings) -> None:
    """Record ``settings`` for ``scope`` unless a record exists.

    Raises:
        StoreSettingsError: the store already records other settings for this model.
        StoreError: the record cannot be written.
    """
    stored = VectorSettings.from_bytes(store.put_meta_if_absent(scope, SETTINGS_RECORD, settings.to_bytes()))
    if stored != settings:
        raise StoreSettingsError(conflict_message(store, stored, settings))


def resolve(
    store: PassageStore,
    scope: str,
    *,
    family: str,
    given: dict[str, object],
    legacy_present: bool,
) -> tuple[VectorSettings, str]:
    """The settings to use and where they came from (``"store"``, ``"legacy store"`` or ``"defaults"``).

    ``given`` holds the options the caller set (the others are ``None``); ``legacy_present`` says whether the
    store holds entries under the namespace of :data:`LEGACY_DEFAULTS` (checked by the caller, who knows how
    to name a namespace).

    Raises:
        StoreSettingsError: a given option contradicts the store's record.
    """
    chosen = {k: v for k, v in given.items() if v is not None}
    recorded = read_settings(store, scope)
    if recorded is not None:
        conflicts = {k: v for k, v in chosen.items() if getattr(recorded, k) != v}
        if conflicts:
            wanted = VectorSettings(**{**asdict(recorded), **conflicts})
            raise StoreSettingsError(conflict_message(store, recorded, wanted))
        return recorded, "store"
    base = LEGACY_DEFAULTS if legacy_present else family_defaults(family)
    source = "legacy store" if legacy_present else "defaults"
    return VectorSettings(**{**asdict(base), **chosen}), source


def conflict_message(store: PassageStore, recorded: VectorSettings, wanted: VectorSettings) -> str:
    diff = ", ".join(
        f"{k}={getattr(recorded, k)!r} (asked: {getattr(wanted, k)!r})"
        for k in ("base_ratio", "storage", "max_passage_tokens")
        if getattr(recorded, k) != getattr(wanted, k)
    )
    return (
        f"the store {store!r} holds this model's passage vectors made with {diff}; leave these options out to "
        "adopt the store's settings, or use another store (or clear this one) to store vectors made otherwise"
    )
