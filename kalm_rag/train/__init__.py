"""kalm-rag train: developer tooling that rebuilds kalm-mini from training material (never imported by the engine)."""
