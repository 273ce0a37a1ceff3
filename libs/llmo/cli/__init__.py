"""The `llmo` command line."""
