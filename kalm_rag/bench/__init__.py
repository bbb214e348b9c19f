"""The ``kalm-rag bench`` suite: online scoring cost of FBNL against the official recipe and a cross-encoder."""
