"""Fixtures of the LangChain adapter tests: kalm-rag's adapter fixtures (tests/integrations/fixtures.py).

Run from the kalm-rag repository root: ``python -m pytest integrations/langchain-kalm``.
"""

from tests.integrations.fixtures import kalm_checkpoint, reranker, store  # noqa: F401  (pytest fixtures)
