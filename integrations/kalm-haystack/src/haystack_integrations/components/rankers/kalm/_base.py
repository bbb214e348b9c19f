"""What the Haystack ranker and encoder share: model and store settings, lazy loading, serialization."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from haystack import Document
from haystack.core.errors import SerializationError
from haystack.utils import ComponentDevice, Secret

from kalm_rag import InvalidInputError, PassageStore, Reranker
from kalm_rag.adapters import RerankerHandle, check_title_key, document_text, store_url
from kalm_rag.store import redact_url


class KaLMComponentBase:
    """Model, store, device, batch size and title key of a KaLM component; the model loads in :meth:`warm_up`.

    Components configured with the same model and store URL share one loaded model and one cache.
    """

    def __init__(
        self,
        *,
        model: str | Path,
        store: str | PassageStore | Secret,
        device: ComponentDevice | str | None,
        batch_size: int,
        title_key: str | None = None,
        storage: str | None = None,
    ) -> None:
        self.title_key = check_title_key(title_key)
        if isinstance(device, str):
            try:
                device = ComponentDevice.from_str(device)
            except ValueError as exc:  # haystack's own error for a malformed device string
                raise InvalidInputError(
                    f"device {device!r} is not a device string such as 'cpu' or 'cuda:0': {exc}"
                ) from None
        if device is not None and not isinstance(device, ComponentDevice):
            raise InvalidInputError(f"device must be a ComponentDevice, a device string or None, got {device!r}")
        self.model = os.fspath(model)
        self.store = store  # a Secret stays one: to_dict writes where it comes from, never its value
        self.device = device
        self.batch_size = batch_size
        self.storage = storage
        # cheap: validates the settings, loads nothing
        self._handle = RerankerHandle(
            model=self.model,
            store=_resolve_store(store),
            device=None if device is None else device.to_torch_str(),
            batch_size=batch_size,
            storage=storage,
        )

    def warm_up(self) -> None:
        """Load the model (or attach to the one already loaded for these settings). Idempotent."""
        self._handle.get()

    def get_reranker(self) -> Reranker:
        """The ``kalm_rag.Reranker`` in use, loading the model on the first call."""
        return self._handle.get()

    def passage_texts(self, documents: list[Document]) -> list[str | None]:
        """The passage text of each document: ``content``, with ``meta[title_key]`` in front when it is set."""
        return [document_text(d.content, d.meta, self.title_key) for d in documents]

    def _base_init_parameters(self) -> dict[str, Any]:
        if isinstance(self.store, Secret):
            try:
                secret = self.store.to_dict()
            except ValueError as exc:  # a token Secret: its value would be written out
                raise SerializationError(
                    f"{type(self).__name__}'s store is a token Secret, which cannot be serialized; "
                    "use Secret.from_env_var('KALM_RAG_STORE') instead"
                ) from exc
            return dict(
                model=self.model,
                store=secret,
                device=None if self.device is None else self.device.to_dict(),
                batch_size=self.batch_size,
                title_key=self.title_key,
            )
        url = store_url(self.store)
        if url is not None and redact_url(url) != url:  # a password in the URL would be saved with the pipeline
            raise SerializationError(
                f"{type(self).__name__}'s store URL {redact_url(url)!r} holds credentials, which a serialized "
                "pipeline would keep in clear; pass store=Secret.from_env_var('KALM_RAG_STORE') (the URL in that "
                "environment variable) to make the component serializable"
            )
        if url is None:
            raise SerializationError(
                f"{type(self).__name__} was given a {type(self.store).__name__} object, which has no portable form; "
                "pass the store as a URL (e.g. store='sqlite:///passages.db') to make the component serializable"
            )
        return dict(
            model=self.model,
            store=url,
            device=None if self.device is None else self.device.to_dict(),
            batch_size=self.batch_size,
            title_key=self.title_key,
            storage=self.storage,
        )


def _resolve_store(store: str | PassageStore | Secret) -> str | PassageStore:
    """The store URL or object to open: a :class:`~haystack.utils.Secret` gives its value (a URL)."""
    if not isinstance(store, Secret):
        return store
    try:
        url = store.resolve_value()
    except ValueError as exc:  # a strict environment variable Secret whose variable is unset
        raise InvalidInputError(f"the store Secret has no value: {exc}") from None
    if not isinstance(url, str) or not url:
        raise InvalidInputError("the store Secret has no value (is its environment variable set?)")
    return url


def deserialize_store(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a component's ``to_dict``) with a serialized store Secret turned back into a Secret (a copy).

    A plain store URL (what earlier versions wrote, and what a URL without credentials still gives) stays a string.
    """
    params = data.get("init_parameters", {})
    if not isinstance(params.get("store"), dict):
        return data
    return {**data, "init_parameters": {**params, "store": Secret.from_dict(params["store"])}}
