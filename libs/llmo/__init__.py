"""LLMO: one namespace for the shared libraries (`llmo.core`, `llmo.protos`) and every service (`llmo.<service>`)."""

__version__ = "0.1.0"
