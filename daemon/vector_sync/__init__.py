"""vector-sync: keeps pgvector embeddings of a table in step with its rows, driven by events."""

__version__ = "0.1.0"
