"""Registers the device overrides (each backend module guards its own availability)."""

from __future__ import annotations


def register_all() -> None:
    from llmo.ops.cpu import register_cpu
    from llmo.ops.cuda import register_cuda
    from llmo.ops.triton_kernels import register_triton

    register_cpu()
    register_cuda()
    register_triton()
