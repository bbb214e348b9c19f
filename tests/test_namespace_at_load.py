"""The store namespace is computed once, at load time, from what was loaded (issue 24 item 4): no file is
fingerprinted again on a store access, and files changed in the checkpoint folder after loading do not move it.
"""

from __future__ import annotations

import shutil

import pytest

from kalm_rag import Reranker
from kalm_rag.models import fingerprint
from kalm_rag.models.mini import backend as mini_backend


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_kalm_mini_fingerprints_its_encoder_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch, mini_backend, "encoder_fingerprint")
    rr = Reranker.from_pretrained("kalm-mini", device="cpu")
    at_load = len(calls)
    assert at_load == 1
    namespace = rr.namespace
    rr.score("What is the capital of France?", ["Paris is the capital of France.", "Bananas are yellow."])
    for _ in range(5):
        assert rr.namespace == namespace
    assert len(calls) == at_load  # no store access fingerprinted the encoder's files again


def test_t5gemma2_namespace_ignores_files_changed_after_load(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    rr = Reranker.from_pretrained(folder)
    namespace = rr.namespace
    calls = _count_calls(monkeypatch, fingerprint, "checkpoint_identity")
    (folder / "extra.safetensors").write_bytes(b"new file")
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    rr.score("q", ["a passage"])
    assert rr.namespace == namespace
    assert calls == []
    # a reranker loaded from the changed folder does get another namespace: the identity reads the files
    assert Reranker.from_pretrained(folder).namespace != namespace
