"""Llama-family model definitions and the local checkpoint loader."""
