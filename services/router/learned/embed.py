"""Moved to `llmo.embedding` (shared with the retrieval service); re-exported for old imports."""

from llmo.embedding import EMBEDDING_DIM, EMBEDDING_MODEL, Embedder, model_path, text_key

__all__ = ["EMBEDDING_DIM", "EMBEDDING_MODEL", "Embedder", "model_path", "text_key"]
