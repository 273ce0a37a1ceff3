"""Cost service."""
