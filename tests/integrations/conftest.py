"""The adapter fixtures (shared with integrations/*/tests)."""

from tests.integrations.fixtures import kalm_checkpoint, reranker, store  # noqa: F401  (pytest fixtures)
