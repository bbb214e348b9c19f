"""The package version, in a module of its own so that ``kalm-rag --version`` and the build read it without torch."""

__version__ = "0.2.0"
