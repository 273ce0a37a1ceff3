"""Registers the device overrides (each module guards its own availability)."""

from __future__ import annotations


def register_all() -> None:
    """Overrides are added as their backend modules land; the reference always works."""
