"""`llmo bench inference`: serving benchmark in the style of vLLM's benchmark_serving.

Poisson arrivals, mixed prompt/output lengths, a fixed seed, at most
`--concurrency` requests in flight. The project's native engine (continuous
batching, paged KV cache) and Hugging Face Transformers `generate` (static
batching: the next batch starts when the previous one is done) serve the same
workload on the same weights, one after the other in one run. Reports request
and output-token throughput, TTFT and TPOT p50/p99, goodput under an SLO, our
KV-cache waste, and the ratios ours / transformers.

    llmo bench inference --model demo --requests 48 --rate 8
    llmo bench inference --model random-0.5b --requests 32 --quantization none,int8,int4
    llmo bench inference --model demo --adapters 1,8,32 --skip-transformers

`--adapters` serves the same workload with that many distinct LoRA adapters (random
weights, rank `--adapter-rank` on every projection), spread uniformly over the
requests, all in the same engine steps, next to the base model alone; and times one
`llmo.ops.batched_lora` call against the one-adapter-at-a-time loop at the model's
shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmo import ops
from llmo.inference.engine.adapters import AdapterRegistry
from llmo.inference.engine.engine import EngineConfig, LLMEngine
from llmo.inference.engine.params import SamplingParams
from llmo.inference.models.loader import DEMO_MODEL_DIR, LoadedModel, load_model
from llmo.inference.models.lora import TARGETS, AdapterSlots, LoraAdapter, projection_shapes
from llmo.ops import reference


@dataclass
class Req:
    rid: str
    arrival: float
    prompt: list[int]
    output_len: int
    token_times: list[float] = field(default_factory=list)


def workload(args: argparse.Namespace, vocab: int) -> list[Req]:
    rng = random.Random(args.seed)
    t = 0.0
    reqs = []
    for i in range(args.requests):
        t += rng.expovariate(args.rate) if args.rate > 0 else 0.0
        plen = rng.randint(args.prompt_min, args.prompt_max)
        olen = rng.randint(args.output_min, args.output_max)
        reqs.append(Req(f"r{i}", t, [rng.randrange(3, vocab) for _ in range(plen)], olen))
    return reqs


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(reqs: list[Req], wall: float, slo_ttft: float, slo_tpot: float) -> dict[str, float]:
    ttft = [r.token_times[0] - r.arrival for r in reqs]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in reqs if len(r.token_times) > 1]
    good = sum(
        1 for r in reqs
        if r.token_times[0] - r.arrival <= slo_ttft
        and (len(r.token_times) < 2 or (r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) <= slo_tpot)
    )
    out_tokens = sum(len(r.token_times) for r in reqs)
    return {
        "duration_s": round(wall, 3),
        "request_throughput": round(len(reqs) / wall, 4),
        "output_token_throughput": round(out_tokens / wall, 3),
        "ttft_p50_s": round(_pct(ttft, 50), 4), "ttft_p99_s": round(_pct(ttft, 99), 4),
        "tpot_p50_s": round(_pct(tpot, 50), 4), "tpot_p99_s": round(_pct(tpot, 99), 4),
        "mean_ttft_s": round(statistics.fmean(ttft), 4),
        "goodput_rps": round(good / wall, 4),
    }


def random_adapter(loaded: LoadedModel, rank: int, seed: int, targets: tuple[str, ...] = TARGETS) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter(rank, float(2 * rank), 2.0)
    for layer in range(loaded.config.num_layers):
        for module, (fan_in, fan_out) in projection_shapes(loaded.config).items():
            if module not in targets:
                continue
            adapter.weights[(layer, module)] = (torch.randn(rank, fan_in, generator=gen) * 0.02,
                                                torch.randn(fan_out, rank, generator=gen) * 0.02)
    return adapter


def with_adapters(loaded: LoadedModel, count: int, rank: int, targets: tuple[str, ...] = TARGETS) -> AdapterRegistry:
    registry = AdapterRegistry(AdapterSlots(loaded.model, loaded.config, count, rank, loaded.dtype), "base")
    for i in range(count):
        registry.load(f"adapter-{i}", random_adapter(loaded, rank, seed=1000 + i, targets=targets), "random")
    return registry


def run_ours(model_path: Path, quantization: str, reqs: list[Req], args: argparse.Namespace,
             adapters: int = 0) -> dict[str, Any]:
    """Our engine on the workload; `adapters` > 0 gives request i adapter i % adapters."""
    loaded = load_model(model_path, quantization=quantization)
    num_blocks = args.kv_blocks
    registry = with_adapters(loaded, adapters, args.adapter_rank, tuple(args.adapter_targets.split(","))) \
        if adapters else None
    engine = LLMEngine(loaded, EngineConfig(block_size=args.block_size, num_blocks=num_blocks, max_num_seqs=args.concurrency,
                                            max_num_batched_tokens=args.batched_tokens, max_queue=10**6),
                       adapters=registry)
    adapter_of = {r.rid: (f"adapter-{i % adapters}" if adapters else None) for i, r in enumerate(reqs)}
    params = {r.rid: SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs}
    by_id = {r.rid: r for r in reqs}
    pending = list(reqs)
    in_flight: set[str] = set()
    waste_num = waste_den = 0.0
    start = time.perf_counter()
    done = 0
    while done < len(reqs):
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now and len(in_flight) < args.concurrency:
            r = pending.pop(0)
            engine.add_request(r.rid, r.prompt, params[r.rid], adapter=adapter_of[r.rid])
            in_flight.add(r.rid)
        if not in_flight:
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        deltas = engine.step()
        t = time.perf_counter() - start
        stats = engine.stats()
        allocated = (stats.kv_blocks_total - stats.kv_blocks_free) * engine.config.block_size
        waste_num += stats.kv_waste * allocated
        waste_den += allocated
        for d in deltas:
            by_id[d.request_id].token_times.append(t)
            if d.finish_reason:
                in_flight.discard(d.request_id)
                done += 1
    wall = time.perf_counter() - start
    result: dict[str, Any] = summarize(reqs, wall, args.slo_ttft, args.slo_tpot)
    result["kv_cache_waste"] = round(waste_num / waste_den, 4) if waste_den else 0.0
    result["preemptions"] = engine.stats().num_preemptions
    return result


def time_lora_op(loaded: LoadedModel, rows: int, adapters: int, rank: int, targets: list[str],
                 repeats: int = 50) -> dict[str, Any]:
    """One batched_lora call vs the one-adapter-at-a-time loop, summed over the adapted projections of one layer."""
    dtype = loaded.dtype
    gen = torch.Generator().manual_seed(7)
    cases = []
    for module, (fan_in, fan_out) in projection_shapes(loaded.config).items():
        if module not in targets:
            continue
        x = torch.randn(rows, fan_in, generator=gen).to(dtype)
        a = (torch.randn(adapters, rank, fan_in, generator=gen) * 0.02).to(dtype)
        b = (torch.randn(adapters, fan_out, rank, generator=gen) * 0.02).to(dtype)
        idx = torch.arange(rows, dtype=torch.int64) % adapters
        cases.append((x, a, b, idx, torch.full((adapters,), 2.0), torch.zeros(rows, fan_out, dtype=dtype)))

    def timed(fn: Any) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                for x, a, b, idx, scale, out in cases:
                    fn(x, a, b, idx, scale, out)
            best = min(best, (time.perf_counter() - start) / repeats)
        return best

    with torch.inference_mode():
        batched = timed(ops.batched_lora)
        loop = timed(reference.batched_lora)
    return {"rows": rows, "adapters": adapters, "rank": rank, "backend": ops.selected_backend("batched_lora", *cases[0]),
            "batched_us": round(batched * 1e6, 1), "loop_us": round(loop * 1e6, 1),
            "speedup_vs_loop": round(loop / batched, 2)}


def run_transformers(model_path: Path, reqs: list[Req], args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    class StepClock(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            self.times.append(time.perf_counter() - start)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)  # type: ignore[return-value]

    pending = list(reqs)
    start = time.perf_counter()
    while pending:
        now = time.perf_counter() - start
        if pending[0].arrival > now:
            time.sleep(pending[0].arrival - now)
            continue
        batch: list[Req] = []
        while pending and pending[0].arrival <= now and len(batch) < args.concurrency:
            batch.append(pending.pop(0))
        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding, as generate expects for decoder-only models
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        steps = max(r.output_len for r in batch)
        clock = StepClock()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
        for r in batch:  # generous to the peer: a request counts as done at its own last token
            r.token_times = clock.times[: r.output_len]
    wall = time.perf_counter() - start
    return summarize(reqs, wall, args.slo_ttft, args.slo_tpot)


def random_llama(out: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                 seed: int) -> Path:
    """A random-initialised Llama-shaped checkpoint using the demo model's tokenizer."""
    vocab = json.loads((DEMO_MODEL_DIR / "config.json").read_text())["vocab_size"]
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    state = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden),
             "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(intermediate, hidden),
            p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    config.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=2048)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((DEMO_MODEL_DIR / name).read_bytes())
    return out


def run_adapters(path: Path, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Base alone vs 1..N distinct adapters on the same workload, runs alternated so drift hits both."""
    counts = [int(c) for c in args.adapters.split(",")]
    targets = args.adapter_targets.split(",")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"--adapter-targets: unknown projections {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    section: dict[str, Any] = {"rank": args.adapter_rank, "targets": targets, "base": [], "mixed": {}}
    for count in counts:
        section["mixed"][str(count)] = []
    for _ in range(args.repeats):
        section["base"].append(run_ours(path, "none", workload(args, vocab), args))
        for count in counts:
            section["mixed"][str(count)].append(run_ours(path, "none", workload(args, vocab), args, adapters=count))
    base_tok = statistics.median(r["output_token_throughput"] for r in section["base"])
    summary: dict[str, Any] = {"base_output_tok_s": round(base_tok, 2)}
    for count in counts:
        runs = section["mixed"][str(count)]
        tok = statistics.median(r["output_token_throughput"] for r in runs)
        summary[f"adapters_{count}"] = {
            "output_tok_s": round(tok, 2), "ratio_vs_base": round(tok / base_tok, 3),
            "ttft_p99_s": statistics.median(r["ttft_p99_s"] for r in runs),
            "tpot_p50_s": statistics.median(r["tpot_p50_s"] for r in runs),
        }
    loaded = load_model(path)
    section["op"] = [time_lora_op(loaded, rows, count, args.adapter_rank, targets)
                     for rows in (args.concurrency, args.batched_tokens // 2) for count in counts]
    top = max(counts)
    summary["goal_32_adapters_ge_0.8x_base"] = summary.get("adapters_32", {}).get("ratio_vs_base", 0) >= 0.8 \
        if 32 in counts else None
    summary[f"op_speedup_vs_loop_at_{top}_adapters_decode"] = next(
        o["speedup_vs_loop"] for o in section["op"] if o["adapters"] == top and o["rows"] == args.concurrency)
    section["summary"] = summary
    return section


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="llmo bench inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="'demo', 'random-0.5b' or a checkpoint directory")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate (requests/s); 0 = all at once")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=256)
    p.add_argument("--output-min", type=int, default=8)
    p.add_argument("--output-max", type=int, default=128)
    p.add_argument("--quantization", default="none", help="comma list of none,int8,int4 (ours only)")
    p.add_argument("--kv-blocks", type=int, default=1024)
    p.add_argument("--batched-tokens", type=int, default=512)
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO: TTFT seconds")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="goodput SLO: TPOT seconds")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both engines (1 is fastest on a shared 2-core VM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--adapters", default="", help="comma list of distinct LoRA adapter counts, e.g. 1,8,32")
    p.add_argument("--adapter-rank", type=int, default=16)
    p.add_argument("--adapter-targets", default=",".join(TARGETS),
                   help="projections each adapter adapts (PEFT's Llama default is q_proj,v_proj)")
    p.add_argument("--repeats", type=int, default=1, help="--adapters: runs of each configuration (medians reported)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "demo":
            path = DEMO_MODEL_DIR
        elif args.model == "random-0.5b":
            path = random_llama(Path(tmp) / "random-0.5b", hidden=1280, layers=28, intermediate=3456, heads=20,
                                kv_heads=4, seed=args.seed)
        else:
            path = Path(args.model)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        params = load_model(path).model
        result: dict[str, Any] = {
            "model": args.model, "parameters": sum(t.numel() for t in params.parameters()),
            "requests": args.requests, "rate": args.rate, "concurrency": args.concurrency, "seed": args.seed,
            "prompt_len": [args.prompt_min, args.prompt_max], "output_len": [args.output_min, args.output_max],
            "threads": args.threads, "block_size": args.block_size, "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        }
        del params
        if not args.skip_transformers:
            result["transformers"] = run_transformers(path, workload(args, vocab), args)
        if args.adapters:
            result["adapters"] = run_adapters(path, args, vocab)
            return result
        for q in args.quantization.split(","):
            ours = run_ours(path, q, workload(args, vocab), args)
            key = "ours" if q == "none" else f"ours_{q}"
            result[key] = ours
            if "transformers" in result:
                hf = result["transformers"]
                ours["output_throughput_ratio_vs_transformers"] = round(
                    ours["output_token_throughput"] / hf["output_token_throughput"], 3)
                ours["ttft_p99_ratio_vs_transformers"] = round(ours["ttft_p99_s"] / max(hf["ttft_p99_s"], 1e-9), 3)
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(main(sys.argv[1:]), indent=2))
