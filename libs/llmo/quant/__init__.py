"""Offline quantization: SmoothQuant W8A8, AWQ-style INT4 search, and a tool that
writes Llama-family checkpoints in the project's quantized safetensors format
(``python -m llmo.quant --help``; format documented in native/README.md)."""

from llmo.quant.awq import awq_search, quantize_int4_awq
from llmo.quant.format import QuantizedCheckpoint, load_quantized
from llmo.quant.smoothquant import quantize_int8_per_channel, smooth_scales

__all__ = [
    "QuantizedCheckpoint",
    "awq_search",
    "load_quantized",
    "quantize_int4_awq",
    "quantize_int8_per_channel",
    "smooth_scales",
]
