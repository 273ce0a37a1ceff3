"""The retrieval service: collections, ingestion, BM25 + MiniLM/FAISS indexes and hybrid search."""
