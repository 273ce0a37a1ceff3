"""The project's quantized safetensors checkpoint ("llmo-quant-v1").

See native/README.md for the full description. In short, a quantized directory
holds ``config.json`` (with ``quantization_config``), the tokenizer files and
one ``model.safetensors`` where each quantized projection ``<p>`` (``<p>.weight``
removed) is stored as

* INT4 (``bits = 4``): ``<p>.qweight`` uint8 ``[N, K/2]`` (llmo-int4-v1 packing),
  ``<p>.scales`` fp16 ``[N, K/group]``, ``<p>.qzeros`` uint8 ``[N, K/group]``;
* INT8 W8A8 (``bits = 8``): ``<p>.qweight`` int8 ``[N, K]``, ``<p>.weight_scale``
  fp32 ``[N]`` (activations are quantized per token at run time).

Every other tensor keeps its name and dtype (norm weights already carry the
folded SmoothQuant / AWQ factors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import llmo.ops as ops
from llmo.quant.llama import Linear

FORMAT = "llmo-quant-v1"


@dataclass
class QuantizedCheckpoint:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def quantization(self) -> dict[str, Any]:
        return dict(self.config.get("quantization_config") or {})

    @property
    def bits(self) -> int:
        return int(self.quantization.get("bits", 16))

    @property
    def group_size(self) -> int:
        return int(self.quantization.get("group_size", 0))

    def linear(self) -> Linear:
        """Apply a projection by name through the llmo.ops kernels (dense where not quantized)."""
        t, bits, group = self.tensors, self.bits, self.group_size

        def apply(prefix: str, x: torch.Tensor) -> torch.Tensor:
            bias = t.get(f"{prefix}.bias")
            if f"{prefix}.qweight" not in t:
                out = x @ t[f"{prefix}.weight"].float().t()
                return out if bias is None else out + bias.float()
            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            if bits == 4:
                y = ops.int4_gemm(x2, t[f"{prefix}.qweight"], t[f"{prefix}.scales"], t[f"{prefix}.qzeros"], group, bias)
            else:
                y = ops.int8_linear(x2, t[f"{prefix}.qweight"], t[f"{prefix}.weight_scale"], bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])

        return apply


def load_quantized(path: Path | str) -> QuantizedCheckpoint:
    root = Path(path)
    cfg_file, weights = root / "config.json", root / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ValueError(f"{root} is not a quantized checkpoint (needs config.json and model.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    q = cfg.get("quantization_config") or {}
    if q.get("format") != FORMAT:
        raise ValueError(f"{root} is not in the {FORMAT} format (quantization_config.format={q.get('format')!r})")
    return QuantizedCheckpoint(cfg, load_file(str(weights)))
