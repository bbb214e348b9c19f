"""Developer tooling, never imported by the engine: the kalm-rag bench suite (suite) and the random
checkpoints that the suite, the tests and benchmarks/ build (checkpoints).
"""
