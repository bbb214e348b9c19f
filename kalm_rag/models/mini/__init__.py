"""kalm-mini: the small FBNL reranker that ships inside kalm-rag.

An FBNL ("fast but not late interaction") model in the spirit of KaLM-Reranker-V1, scaled down to run
offline on a laptop CPU. The passage side is the frozen all-MiniLM-L6-v2 encoder, reading a passage in
256-position windows whose final states are MEP-pooled and cached; the query side is a small decoder
(:mod:`~kalm_rag.models.mini.modeling`) that reads the same encoder's states of the instruction and the
query and attends to the cached passage vectors. Modules: ``config`` (the architecture, the encoder
allow-list), ``modeling`` (layers and decoder, pure torch), ``backend`` (loading, tokenisation, the
engine interface).
"""

from kalm_rag.models.mini.backend import EMBEDDED_DIR, MiniBackend, encoder_dir
from kalm_rag.models.mini.config import ENCODERS, MODEL_TYPE, MiniConfig
from kalm_rag.models.mini.modeling import MiniDecoder

__all__ = ["EMBEDDED_DIR", "ENCODERS", "MODEL_TYPE", "MiniBackend", "MiniConfig", "MiniDecoder", "encoder_dir"]
