"""`llmo bench kernels`: LLMO kernels side by side with PyTorch on this machine.

Measures, in one run and with the same thread count for both sides:

* a STREAM-style copy (the machine's DRAM bandwidth, the yardstick);
* INT4 weight-only and INT8 W8A8 GEMM vs ``torch.matmul`` fp32 / bf16 and
  torch's own int8 dynamic-quantized linear (fbgemm) at decode (M = 1, 4, 16)
  and prefill (M = 256) shapes;
* paged decode attention vs ``scaled_dot_product_attention`` over a contiguous
  cache of the same length;
* batched multi-adapter LoRA (``llmo.ops.batched_lora``): the native kernel vs the
  reference one-adapter-at-a-time loop, at 1 / 8 / 32 distinct adapters for decode
  rows (one per request, shuffled) and prefill rows (each adapter's tokens a run).

Weights and caches smaller than ``--rotate-mb`` (by default 1.5x the last-level
cache read from sysfs) are replicated and rotated so every call streams from DRAM
rather than the last-level cache; the STREAM buffers are twice the LLC. Times are the
minimum over interleaved rounds (the machines are shared and noisy); medians are
reported too. Prints/returns one JSON-serialisable dict.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import llmo.ops as ops
from llmo.core.logging import configure_logging
from llmo.ops import force_backend

Timed = dict[str, Callable[[], Any]]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmo bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="stream,gemm,attention,lora", help="comma list of stream,gemm,attention,lora")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for torch and llmo_native")
    p.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds per case (decode shapes)")
    p.add_argument("--prefill-rounds", type=int, default=3, help="timing rounds for M >= 256")
    p.add_argument("--ms", default="1,4,16,256", help="GEMM activation rows")
    p.add_argument("--kn", default="4096x4096,4096x11008,11008x4096", help="GEMM K x N shapes")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--attn", default="1x512,1x8192,8x512,8x4096,32x1024",
                   help="paged attention batch x context cases (issue grid: contexts 512..8192, batches 1..32)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--lora-rows", default="32,256", help="batched_lora token rows (decode 32, prefill 256)")
    p.add_argument("--lora-adapters", default="1,8,32", help="distinct adapters in the batch")
    p.add_argument("--lora-dim", type=int, default=896, help="LoRA input and output features (K = M)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-dtypes", default="float32,bfloat16")
    llc = llc_mib()
    p.add_argument("--rotate-mb", type=float, default=max(96.0, 1.5 * llc),
                   help=f"replicate buffers up to this size (default 1.5x the {llc:.0f} MiB LLC)")
    p.add_argument("--stream-mb", type=float, default=max(256.0, 2.0 * llc),
                   help="STREAM copy buffer size (default 2x the LLC)")
    p.set_defaults(llc_mib=llc)
    return p.parse_args(argv)


_SIZE_UNITS = {"K": 1, "M": 1024, "G": 1024 * 1024}  # sysfs cache sizes, in KiB


def llc_mib(sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> float:
    """Size of the last-level (highest-level) cache in MiB; 32 when sysfs does not say."""
    best_level, best_kib = 0, 32 * 1024
    for index in sorted(glob.glob(f"{sysfs}/index*")):
        try:
            with open(f"{index}/level") as f:
                level = int(f.read())
            with open(f"{index}/size") as f:
                size = f.read().strip()
            kib = int(size[:-1]) * _SIZE_UNITS[size[-1]] if size[-1:] in _SIZE_UNITS else int(size) // 1024
        except (OSError, ValueError):
            continue
        if level > best_level:
            best_level, best_kib = level, kib
    return best_kib / 1024


def _time(cases: Timed, rounds: int) -> dict[str, dict[str, float]]:
    """Interleave the cases round by round so load spikes hit every side alike."""
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: {"min_ms": min(v) * 1e3, "median_ms": statistics.median(v) * 1e3} for k, v in samples.items()}


def _copies(nbytes: int, rotate_mb: float) -> int:
    return max(1, math.ceil(rotate_mb * 2**20 / max(nbytes, 1)))


class _Rotor:
    """Cycles through replicated buffers on every call."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.i = 0

    def next(self) -> Any:
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def bench_stream(args: argparse.Namespace) -> dict[str, float]:
    """STREAM-style copy (bytes read + written) and a read-only sweep (what a GEMV does)."""
    n = int(args.stream_mb * 2**20 / 4)
    src = torch.ones(n)
    dst = torch.empty(n)
    t = _time({"copy": lambda: dst.copy_(src), "read": lambda: src.sum()}, max(args.rounds, 5))
    copy_gbps = 2 * n * 4 / t["copy"]["min_ms"] / 1e6
    read_gbps = n * 4 / t["read"]["min_ms"] / 1e6
    return {"bytes": n * 4, "copy_gbps": copy_gbps, "read_gbps": read_gbps, "dram_gbps": max(copy_gbps, read_gbps)}


def _torch_dynamic_int8(weight: torch.Tensor) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        lin.weight.data.copy_(weight)
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)


def _gemm_cases(
    x: torch.Tensor, g: int, r4: _Rotor, r8: _Rotor, rf: _Rotor, rb: _Rotor, rq: _Rotor
) -> Timed:
    xb = x.to(torch.bfloat16)

    def torch_dequant_fp32(x: torch.Tensor = x) -> torch.Tensor:
        p, s, z = r4.next()
        return torch.matmul(x, ops.dequantize_int4(p, s, z, g).t())

    def llmo_int4() -> torch.Tensor:
        p, s, z = r4.next()
        return ops.int4_gemm(x, p, s, z, g)

    def llmo_int8() -> torch.Tensor:
        q, s = r8.next()
        return ops.int8_linear(x, q, s)

    return {
        "llmo_int4": llmo_int4,
        "llmo_int8": llmo_int8,
        "torch_fp32": lambda: torch.matmul(x, rf.next().t()),
        "torch_bf16": lambda: torch.matmul(xb, rb.next().t()),
        "torch_int8_dynamic": lambda: rq.next()(x),
        # The large-M bar for INT4: PyTorch dequantize + dense matmul.
        **({"torch_int4_dequant_matmul": torch_dequant_fp32} if x.shape[0] >= 64 else {}),
    }


def _gemm_shape(args: argparse.Namespace, k: int, n: int, dram_gbps: float) -> list[dict[str, Any]]:
    g = args.group_size
    w = torch.randn(n, k) * 0.02
    packed, scales, zeros = ops.quantize_int4(w, g)
    w_scales = w.abs().amax(dim=1) / 127
    w_q = torch.round(w / w_scales[:, None]).to(torch.int8)
    int4_bytes = packed.numel() + scales.numel() * 2 + zeros.numel()
    int8_bytes = w_q.numel() + w_scales.numel() * 4
    r4 = _Rotor([(packed.clone(), scales.clone(), zeros.clone()) for _ in range(_copies(int4_bytes, args.rotate_mb))])
    r8 = _Rotor([(w_q.clone(), w_scales.clone()) for _ in range(_copies(int8_bytes, args.rotate_mb))])
    # A server packs its INT8 weights once, at load: do that for every copy before timing.
    for q, s in r8.items:
        ops.int8_linear(torch.zeros(1, k), q, s)
    rf = _Rotor([w.clone() for _ in range(_copies(w.numel() * 4, args.rotate_mb))])
    rb = _Rotor([w.to(torch.bfloat16) for _ in range(_copies(w.numel() * 2, args.rotate_mb))])
    rq = _Rotor([_torch_dynamic_int8(w) for _ in range(_copies(int8_bytes, args.rotate_mb))])
    weight_bytes = {"llmo_int4": int4_bytes, "llmo_int8": int8_bytes, "torch_fp32": w.numel() * 4,
                    "torch_bf16": w.numel() * 2, "torch_int8_dynamic": int8_bytes,
                    "torch_int4_dequant_matmul": int4_bytes}
    rows = []
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, k)
        cases = _gemm_cases(x, g, r4, r8, rf, rb, rq)
        with force_backend("cpu"):
            # llmo's kernels quantize activations: report their error against fp32 once.
            want = x @ w.t()
            err4 = float((cases["llmo_int4"]() - want).abs().mean() / want.abs().mean())
            err8 = float((cases["llmo_int8"]() - want).abs().mean() / want.abs().mean())
            err_fbgemm = float((cases["torch_int8_dynamic"]() - want).abs().mean() / want.abs().mean())
            timing = _time(cases, args.rounds if m < 256 else args.prefill_rounds)
        row: dict[str, Any] = {"K": k, "N": n, "M": m, "int4_rel_err_vs_fp32": err4, "int8_rel_err_vs_fp32": err8,
                               "torch_int8_dynamic_rel_err_vs_fp32": err_fbgemm}
        for name, t in timing.items():
            gbps = weight_bytes[name] / t["min_ms"] / 1e6
            row[name] = {**t, "weight_gbps": gbps, "dram_fraction": gbps / dram_gbps}
        for ours in ("llmo_int4", "llmo_int8"):
            for peer in ("torch_fp32", "torch_bf16", "torch_int8_dynamic", "torch_int4_dequant_matmul"):
                if peer in timing and not (ours == "llmo_int8" and peer == "torch_int4_dequant_matmul"):
                    row[f"{ours}_speedup_vs_{peer}"] = timing[peer]["min_ms"] / timing[ours]["min_ms"]
        rows.append(row)
        print(json.dumps(_brief(row)), file=sys.stderr)
    return rows


def bench_gemm(args: argparse.Namespace, dram_gbps: float) -> list[dict[str, Any]]:
    results = []
    for shape in args.kn.split(","):
        k, n = (int(v) for v in shape.split("x"))
        results += _gemm_shape(args, k, n, dram_gbps)
    return results


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if not isinstance(v, dict)}


def _attention_case(args: argparse.Namespace, batch: int, ctx: int, dram_gbps: float) -> dict[str, Any]:
    h, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    dtype = getattr(torch, args.kv_dtype)
    blocks_per_seq = ctx // bs
    num_blocks = batch * blocks_per_seq
    kv_bytes = 2 * batch * ctx * hkv * d * torch.finfo(dtype).bits // 8
    paged, dense = [], []
    for _ in range(_copies(kv_bytes, args.rotate_mb)):
        kc = torch.randn(num_blocks, bs, hkv, d).to(dtype)
        vc = torch.randn(num_blocks, bs, hkv, d).to(dtype)
        # Scatter each sequence over random blocks, as a long-running server's cache is.
        tables = torch.randperm(num_blocks).to(torch.int32).reshape(batch, blocks_per_seq)
        paged.append((kc, vc, tables))
        k_dense = kc[tables.long()].reshape(batch, ctx, hkv, d).transpose(1, 2).contiguous()
        v_dense = vc[tables.long()].reshape(batch, ctx, hkv, d).transpose(1, 2).contiguous()
        dense.append((k_dense, v_dense))
    rp, rd = _Rotor(paged), _Rotor(dense)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, h, d).to(dtype)
    q4 = q.unsqueeze(2)

    def llmo_paged() -> torch.Tensor:
        kc, vc, tables = rp.next()
        return ops.paged_attention_decode(q, kc, vc, tables, lens)

    def torch_sdpa() -> torch.Tensor:
        kd, vd = rd.next()
        return F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=h != hkv)

    with force_backend("cpu"):
        err = float((llmo_paged().float() - torch_sdpa().squeeze(2).float()).abs().max())
        timing = _time({"llmo_paged": llmo_paged, "torch_sdpa_contiguous": torch_sdpa}, args.rounds)
    row: dict[str, Any] = {"batch": batch, "context": ctx, "heads": h, "kv_heads": hkv, "head_dim": d,
                           "block_size": bs, "kv_dtype": args.kv_dtype, "max_abs_diff": err}
    for name, t in timing.items():
        gbps = kv_bytes / t["min_ms"] / 1e6
        row[name] = {**t, "kv_gbps": gbps, "dram_fraction": gbps / dram_gbps}
    row["paged_time_over_sdpa"] = timing["llmo_paged"]["min_ms"] / timing["torch_sdpa_contiguous"]["min_ms"]
    print(json.dumps(_brief(row)), file=sys.stderr)
    return row


def bench_attention(args: argparse.Namespace, dram_gbps: float) -> list[dict[str, Any]]:
    results = []
    for case in args.attn.split(","):
        batch, ctx = (int(v) for v in case.split("x"))
        results.append(_attention_case(args, batch, ctx, dram_gbps))
    return results


def _lora_case(args: argparse.Namespace, rows: int, adapters: int, dtype: torch.dtype) -> dict[str, Any]:
    k = m = args.lora_dim
    r = args.lora_rank
    # Decode: one row per request, requests of different adapters interleaved. Prefill:
    # the adapters' prompts one after the other (runs of equal index).
    if rows <= 64:
        indices = (torch.arange(rows) % adapters)[torch.randperm(rows)]
    else:
        indices = torch.arange(rows) * adapters // rows
    x = torch.randn(rows, k).to(dtype)
    scaling = torch.full((adapters,), 2.0)
    weight_bytes = adapters * r * (k + m) * torch.finfo(dtype).bits // 8
    stacks = _Rotor([
        ((torch.randn(adapters, r, k) / k**0.5).to(dtype), (torch.randn(adapters, m, r) * 0.01).to(dtype))
        for _ in range(_copies(weight_bytes, args.rotate_mb))
    ])
    outs = {"llmo_native": torch.zeros(rows, m, dtype=dtype), "torch_reference_loop": torch.zeros(rows, m, dtype=dtype)}

    def call(side: str, backend: str) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            a, b = stacks.next()
            with force_backend(backend, "batched_lora"):
                return ops.batched_lora(x, a, b, indices, scaling, outs[side])
        return fn

    cases = {"llmo_native": call("llmo_native", "cpu"), "torch_reference_loop": call("torch_reference_loop", "reference")}
    a, b = stacks.items[0]
    got, want = torch.zeros(rows, m, dtype=dtype), torch.zeros(rows, m, dtype=dtype)
    with force_backend("cpu", "batched_lora"):
        ops.batched_lora(x, a, b, indices, scaling, got)
    with force_backend("reference", "batched_lora"):
        ops.batched_lora(x, a, b, indices, scaling, want)
    err = float((got.float() - want.float()).abs().max())
    timing = _time(cases, args.rounds)
    row: dict[str, Any] = {"N": rows, "K": k, "M": m, "R": r, "adapters": adapters, "dtype": str(dtype).removeprefix("torch."),
                           "layout": "decode_shuffled" if rows <= 64 else "prefill_runs", "max_abs_diff": err}
    for name, t in timing.items():
        row[name] = {**t, "weight_gbps": weight_bytes / t["min_ms"] / 1e6}
    row["native_speedup_vs_reference"] = timing["torch_reference_loop"]["min_ms"] / timing["llmo_native"]["min_ms"]
    print(json.dumps(_brief(row)), file=sys.stderr)
    return row


def bench_lora(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for dtype_name in args.lora_dtypes.split(","):
        for rows in (int(v) for v in args.lora_rows.split(",")):
            for adapters in (int(v) for v in args.lora_adapters.split(",")):
                results.append(_lora_case(args, rows, adapters, getattr(torch, dtype_name)))
    return results


def main(argv: list[str]) -> dict[str, Any]:
    args = _parse(argv)
    configure_logging("bench", level="warning")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from llmo.ops.cpu import native

    lib = native()
    if lib is None:
        raise SystemExit("llmo_native is not built: run `make native` first")
    lib.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    out: dict[str, Any] = {
        "machine": {"threads": args.threads, "llc_mib": args.llc_mib, "rotate_mb": args.rotate_mb, "torch": torch.__version__, "isa": lib.isa(),
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
    }
    stream = bench_stream(args)
    out["stream"] = stream
    dram = stream["dram_gbps"]
    if "gemm" in sections:
        out["gemm"] = bench_gemm(args, dram)
    if "attention" in sections:
        out["attention"] = bench_attention(args, dram)
    if "lora" in sections:
        out["lora"] = bench_lora(args)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
