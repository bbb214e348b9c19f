"""kalm-rag eval: developer tooling that compares rerankers on BEIR-format test sets (never imported by the engine)."""
