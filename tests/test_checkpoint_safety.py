"""A checkpoint is data (issue #15, items 1, 2 and 8): no code of its own runs, no pickle is loaded, its
identity covers every byte, and a name that is not a local folder fails at once without the network.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from kalm_rag import KalmError, ModelLoadError, Reranker
from kalm_rag.models import fingerprint
from kalm_rag.models.mini import EMBEDDED_DIR
from kalm_rag.models.t5gemma2 import weights_identity

# ----- item 1: no code from a checkpoint ------------------------------------------------------------

EVIL_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("code from the checkpoint ran")
"""


def _evil_code(folder: Path, marker: Path, module: str = "modeling_evil") -> None:
    (folder / f"{module}.py").write_text(EVIL_MODULE.format(marker=str(marker)))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(file: Path, **changes: object) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_checkpoint_naming_its_own_code_is_refused_and_nothing_runs(tiny_checkpoint, tmp_path, where):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    marker = tmp_path / "marker"
    _evil_code(ckpt, marker)
    auto_map = (
        {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForSeq2SeqLM": "modeling_evil.EvilModel"}
        if where == "config.json"
        else {"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}
    )
    _edit_json(ckpt / where, auto_map=auto_map)
    with pytest.raises(ModelLoadError, match=r"asks to run code shipped with the checkpoint \(auto_map"):
        Reranker.from_pretrained(ckpt)
    assert not marker.exists()


def test_an_unknown_model_type_with_its_own_code_is_refused_before_transformers_reads_it(tmp_path):
    # transformers would ask "Do you wish to run the custom code? [y/N]" on a terminal for this one
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "marker"
    _evil_code(ckpt, marker)
    (ckpt / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig"}})
    )
    with pytest.raises(ModelLoadError, match="never runs a checkpoint's own code"):
        Reranker.from_pretrained(ckpt)
    assert not marker.exists()


def test_transformers_is_always_told_not_to_trust_remote_code(tiny_checkpoint, monkeypatch):
    import transformers

    seen: list[tuple[str, object, object]] = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForSeq2SeqLM"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code"), kwargs.get("local_files_only")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    Reranker.from_pretrained(tiny_checkpoint)
    assert {name for name, _, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForSeq2SeqLM"}
    # every call, ours and transformers' own nested ones: never trusting, never downloading
    assert all(trust is False and local is True for _, trust, local in seen), seen


def test_pickle_weights_are_never_loaded(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    torch.save(state, ckpt / "pytorch_model.bin")  # a pickle: loading one can run code
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no safetensors weights \(only pytorch_model.bin: pickle files"):
        Reranker.from_pretrained(ckpt)


@pytest.mark.parametrize("key", ["encoder_module", "encoder"])  # the old key, and the allow-list's
@pytest.mark.parametrize("module", ["evil_encoder", "evil_package.sub"])
def test_a_kalm_mini_checkpoint_cannot_name_a_module_to_import(tmp_path, monkeypatch, module, key):
    ckpt = _copy(EMBEDDED_DIR, tmp_path / "ckpt")
    _edit_json(ckpt / "config.json", **{key: module})
    marker = tmp_path / "marker"
    top = module.split(".")[0]
    package = tmp_path / "site" / top
    package.mkdir(parents=True)
    # find_spec("evil_package.sub") would import evil_package: its __init__ must not run either
    (package / "__init__.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    (package / "sub.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # "a checkpoint folder next to the user's script"
    try:
        with pytest.raises(KalmError):
            Reranker.from_pretrained(ckpt)
        assert not marker.exists(), "a module named by the checkpoint was imported"
    finally:
        for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[name]


# ----- item 2: the identity covers every byte --------------------------------------------------------


def _fake_checkpoint(folder: Path, weights: bytes, tokenizer: str = '{"model": "bpe"}') -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "t5gemma2"}')
    (folder / "tokenizer.json").write_text(tokenizer)
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_checkpoints_that_differ_in_the_middle_of_a_weight_file_have_different_identities(tmp_path):
    weights = os.urandom(3 << 20)  # 3 MiB: the middle MiB lies outside the first and last MiB
    middle = bytearray(weights)
    middle[len(weights) // 2] ^= 0x01
    a = _fake_checkpoint(tmp_path / "a", weights)
    b = _fake_checkpoint(tmp_path / "b", bytes(middle))
    a_again = _fake_checkpoint(tmp_path / "a_copy", weights)
    assert weights_identity(str(a)) != weights_identity(str(b))
    assert weights_identity(str(a)) == weights_identity(str(a_again))  # content, not path


def test_the_tokenizer_is_part_of_the_identity(tmp_path):
    weights = os.urandom(1024)
    a = _fake_checkpoint(tmp_path / "a", weights, tokenizer='{"vocab": {"yes": 1}}')
    b = _fake_checkpoint(tmp_path / "b", weights, tokenizer='{"vocab": {"yes": 2}}')
    assert weights_identity(a) != weights_identity(b)


def test_a_weight_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = _fake_checkpoint(tmp_path / "ckpt", os.urandom(1 << 20))
    real = fingerprint.hashlib.sha256
    hashed: list[int] = []

    class CountingSha256:
        def __init__(self, data: bytes = b"") -> None:
            hashed.append(1)
            self._h = real(data)

        def update(self, data: bytes) -> None:
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    first = weights_identity(ckpt)
    assert len(list((tmp_path / "cache" / "kalm-rag" / "sha256").iterdir())) == 3  # in the user cache
    assert not (ckpt / ".model.safetensors.kalm-rag-sha256").exists()  # nothing next to the checkpoint
    monkeypatch.setattr(fingerprint.hashlib, "sha256", CountingSha256)
    hashed.clear()
    assert weights_identity(ckpt) == first
    # the identity's own digest and the cache key of each of the 3 files, but no file read again
    assert len(hashed) == 1 + 3
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a rewrite changes the mtime
    hashed.clear()
    assert weights_identity(ckpt) != first
    assert len(hashed) == 1 + 3 + 1  # the changed file was hashed again


def test_a_symlinked_weight_file_is_cached_outside_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(os.urandom(4096))
    ckpt = _fake_checkpoint(tmp_path / "snapshot", b"")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(blob)  # as in the hub cache
    first = weights_identity(ckpt)
    assert not list(ckpt.glob(".*kalm-rag-sha256"))  # nothing written into the (hub-managed) snapshot folder
    cached = list((tmp_path / "cache" / "kalm-rag" / "sha256").iterdir())
    assert len(cached) == 3  # one digest per file of the checkpoint, the symlinked blob's among them
    assert weights_identity(ckpt) == first


def test_a_damaged_hash_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = _fake_checkpoint(tmp_path / "ckpt", os.urandom(4096))
    first = weights_identity(ckpt)
    for cache in (tmp_path / "cache" / "kalm-rag" / "sha256").iterdir():
        cache.write_text('{"size": 1, "sha256": "not hex"}')
    assert weights_identity(ckpt) == first


def test_the_hash_is_kept_next_to_the_file_when_the_user_cache_is_read_only(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    try:
        ckpt = _fake_checkpoint(tmp_path / "ckpt", os.urandom(4096))
        first = weights_identity(ckpt)
        if os.geteuid() != 0:  # root writes anywhere: the fallback cannot be observed
            assert (ckpt / ".model.safetensors.kalm-rag-sha256").is_file()
        assert weights_identity(ckpt) == first
    finally:
        cache.chmod(0o700)


# ----- item 8: offline first ---------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) any attempt to open a network connection or resolve a name."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("offline", ["1", None])
@pytest.mark.parametrize(
    "name, says, suggests",
    [
        ("kalm-mni", "neither a local checkpoint folder", "'kalm-mini'"),
        ("path/to/KaLM-Reranker-V1-Nano", "there is no folder", "'KaLM-Embedding/KaLM-Reranker-V1-Nano'"),
        ("./KaLM-Reranker-V1-Smal", "neither a local checkpoint folder", "'KaLM-Embedding/KaLM-Reranker-V1-Small'"),
    ],
)
def test_a_name_that_is_no_folder_nor_hub_id_fails_at_once_without_the_network(
    name, says, suggests, offline, monkeypatch, no_network, empty_hub_cache
):
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        Reranker.from_pretrained(name)
    assert time.monotonic() - start < 2.0
    assert says in str(err.value) and suggests in str(err.value) and "nothing was downloaded" in str(err.value)
    assert no_network == []


def test_a_hub_id_not_in_the_cache_fails_at_once_when_offline(monkeypatch, no_network, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not in the local hub cache; HF_HUB_OFFLINE is set") as err:
        Reranker.from_pretrained("KaLM-Embedding/KaLM-Reranker-V1-Nan0")
    assert time.monotonic() - start < 2.0
    assert "'KaLM-Embedding/KaLM-Reranker-V1-Nano'" in str(err.value)
    assert no_network == []


def test_a_hub_id_in_the_local_cache_loads_without_the_network(
    tiny_checkpoint, monkeypatch, no_network, empty_hub_cache
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = empty_hub_cache / "models--some-org--tiny-reranker"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    from_hub = Reranker.from_pretrained("some-org/tiny-reranker")
    local = Reranker.from_pretrained(tiny_checkpoint)
    assert from_hub.backend.weights_id == local.backend.weights_id
    query, passages = "capital of France?", ["Paris is in France.", "Bananas are yellow."]
    assert from_hub.score(query, passages) == pytest.approx(local.score(query, passages), abs=1e-6)
    assert no_network == []


def test_the_identity_never_falls_back_to_the_name(monkeypatch, no_network, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local hub cache"):
        weights_identity("some-org/not-cached")  # before: "hub:some-org/not-cached", whatever the weights
    with pytest.raises(ModelLoadError, match="no checkpoint files"):
        weights_identity(empty_hub_cache)  # an empty folder
