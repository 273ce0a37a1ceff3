"""Shared runtime of every LLMO service: settings, logging, errors, gRPC server and
client helpers, the NATS JetStream event bus and SQL storage."""
