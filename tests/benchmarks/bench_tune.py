"""`llmo bench tune`: LoRA vs QLoRA, the domain gain, and a distilled student, on the demo model.

    llmo bench tune --data ../shared/data [--steps 30] [--save-adapter DIR]

* Domain: grade-school math word problems with worked answers (GSM8K problems, MIT licence,
  from ``routing/gsm8k/gsm8k_responses.csv``). That file holds two models' worked solutions
  with a correctness flag; the completion is a solution marked correct (Mixtral's, which keeps
  GSM8K's own ``<<calc>>`` / ``####`` layout, else GPT-4's). Problems listed in
  ``contaminated_prompts.jsonl`` are left out. File order: the first ``--train-problems`` train,
  the last ``--eval-problems`` are the domain held-out set (loss on the answer tokens).
* General held-out text: the last 10% of ``text/tinyshakespeare.txt``, the part the demo model
  never trained on (scripts/train_demo_model.py's split).
* (a) LoRA and QLoRA (each 4-bit backend) train on the same base, data and seed, each by
  ``llmo tune ...`` in its own process; its peak RSS comes from ``wait4`` on that child. A
  second child per variant only loads the model (imports + base + LoRA wrap), so the RSS that
  training itself adds is visible.
* (b) Perplexity of base, LoRA, QLoRA (on its 4-bit base, and on the fp base) and the student,
  on the domain and the general held-out text.
* (c) ``llmo tune distill``: a 2-layer student of the LoRA-tuned model (merged), on the domain
  training text; size and greedy tokens/s next to the teacher's, with transformers' ``generate``
  and with the project's engine (``LLMEngine``, batch 1 and all prompts together).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llmo.core.logging import configure_logging

DEMO_MODEL = Path(__file__).resolve().parents[2] / "services" / "inference" / "demo_model"
PROMPT = "Question: {question}\nAnswer: "
SOLVERS = ("mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview")
QUANT_BACKENDS = ("llmo-int4", "bnb-nf4")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmo bench tune", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the shared data folder (holds routing/ and text/)")
    p.add_argument("--model", type=Path, default=DEMO_MODEL, help="base Llama checkpoint (default: the demo model)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per LoRA / QLoRA run")
    p.add_argument("--distill-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--train-problems", type=int, default=800)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--general-tokens", type=int, default=8192, help="tokens of general held-out text scored")
    p.add_argument("--quant-backends", default=",".join(QUANT_BACKENDS), help="comma list of QLoRA bases to run")
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--speed-prompts", type=int, default=8)
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--speed-rounds", type=int, default=2, help="interleaved engine timing rounds")
    p.add_argument("--interleaved-rounds", type=int, default=4,
                   help="steps per variant of the in-process, interleaved step timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-adapter", type=Path, default=None, help="copy the trained LoRA adapter here")
    p.add_argument("--work", type=Path, default=None, help="keep the run's files here (default: a temp dir)")
    return p.parse_args(argv)


def domain_rows(data: Path) -> list[tuple[str, str]]:
    """(question, worked answer) for every GSM8K problem with a correct solution, in file order."""
    folder = data / "routing" / "gsm8k"
    contaminated = set()
    with (folder / "contaminated_prompts.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                contaminated.add(json.loads(line)["eval_prompt"].strip())
    rows = []
    with (folder / "gsm8k_responses.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            question = row["prompt"].strip()
            if question in contaminated:
                continue
            answer = next((row[f"{s}_response"].strip() for s in SOLVERS if row[s] == "True"), None)
            if answer:
                rows.append((question, answer))
    return rows


def general_heldout(data: Path) -> str:
    text = (data / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return text[int(len(text) * 0.9):]  # the demo model's split: its last 10% was never trained on


def run_child(command: list[str], log: Path) -> tuple[int, float, float, str]:
    """(exit code, peak RSS MiB of that child alone, wall s, stdout)."""
    began = time.perf_counter()
    with log.open("w") as stdout, (log.with_suffix(".err")).open("w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    return proc.returncode, usage.ru_maxrss / 1024, wall, log.read_text()


LOAD_ONLY = """
import sys, torch
from pathlib import Path
from llmo.tune.lora import LoraSpec, TrainConfig, build_model
torch.set_num_threads(int(sys.argv[3]))
quantize = None if sys.argv[2] == "none" else sys.argv[2]
config = TrainConfig(base=Path(sys.argv[1]), data=Path(sys.argv[1]), output=Path("."), quantize=quantize,
                     lora=LoraSpec(rank=int(sys.argv[4])))
model = build_model(config, torch.device("cpu"))
with torch.no_grad():
    model(input_ids=torch.zeros(1, 8, dtype=torch.long))
"""


def train_variant(args: argparse.Namespace, name: str, quantize: str | None, data: Path, work: Path) -> dict[str, Any]:
    output = work / name
    command = [sys.executable, "-m", "llmo.cli.main", "tune", "qlora" if quantize else "lora",
               "--base", str(args.model), "--data", str(data), "--output", str(output),
               "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--lr", str(args.lr), "--rank", str(args.rank),
               "--alpha", str(args.alpha), "--eval-fraction", "0.05", "--seed", str(args.seed),
               "--threads", str(args.threads), "--checkpoint-every", "0", "--json"]
    if quantize:
        command += ["--quant-backend", quantize]
    code, rss, wall, stdout = run_child(command, work / f"{name}.log")
    if code != 0:
        raise RuntimeError(f"{name} training failed ({code}): {(work / f'{name}.err').read_text()[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    load_code, load_rss, _, _ = run_child(
        [sys.executable, "-c", LOAD_ONLY, str(args.model), quantize or "none", str(args.threads), str(args.rank)],
        work / f"{name}-load.log")
    if load_code != 0:
        raise RuntimeError(f"{name} load-only child failed: {(work / f'{name}-load.err').read_text()[-2000:]}")
    return {
        "adapter": str(output),
        "peak_rss_mb": round(rss, 1),
        "load_only_rss_mb": round(load_rss, 1),
        "training_adds_rss_mb": round(rss - load_rss, 1),
        "base_weight_mb": round(result["base_weight_bytes"] / 2**20, 2),
        "trainable_parameters": result["trainable_parameters"],
        "steps": result["steps"],
        "seconds_per_step_mean": round(result["seconds_per_step"], 3),
        "seconds_per_step_median": round(result["median_seconds_per_step"], 3),
        "tokens_per_s_mean": round(result["tokens_per_s"], 1),
        "tokens_per_s_median_step": round(result["train_tokens"] / result["steps"] / result["median_seconds_per_step"], 1),
        "final_eval_perplexity": round(result["final_eval_perplexity"], 3),
        "eval_history": [{k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()}
                         for h in result["history"]],
        "wall_s": round(wall, 1),
    }


def interleaved_step_seconds(args: argparse.Namespace, data: Path, variants: dict[str, str | None],
                             rounds: int) -> dict[str, dict[str, float]]:
    """Seconds per optimizer step of each variant, all built in this process and stepped in turn on
    the same batches, so a busy machine slows them alike; median and best of ``rounds``."""
    from llmo.tune.base import load_tokenizer
    from llmo.tune.data import collate, read_jsonl, tokenize
    from llmo.tune.lora import LoraSpec, TrainConfig, build_model
    from llmo.tune.metrics import forward_logits, token_nll

    tok = load_tokenizer(args.model)
    records = read_jsonl(data).records[: args.batch_size * rounds]
    examples = tokenize(records, tok, tok.eos_id, args.max_length)
    models, optimizers = {}, {}
    for name, quantize in variants.items():
        config = TrainConfig(base=args.model, data=data, output=data.parent, quantize=quantize, seed=args.seed,
                             lora=LoraSpec(rank=args.rank, alpha=args.alpha))
        models[name] = build_model(config, torch.device("cpu")).train()
        optimizers[name] = torch.optim.AdamW([p for p in models[name].parameters() if p.requires_grad], lr=args.lr)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        batch = collate(examples[r * args.batch_size:(r + 1) * args.batch_size], tok.pad_id)
        for name, model in models.items():
            began = time.perf_counter()
            nll, count = token_nll(forward_logits(model, batch), batch["labels"])
            optimizers[name].zero_grad(set_to_none=True)
            (nll / count).backward()
            optimizers[name].step()
            times[name].append(time.perf_counter() - began)
    return {name: {"median": round(statistics.median(t), 3), "best": round(min(t), 3)} for name, t in times.items()}


def engine_speeds(paths: dict[str, Path], prompts: list[list[int]], tokens: int, rounds: int) -> dict[str, Any]:
    """Greedy tokens/s in the project's engine, one prompt at a time and all prompts together,
    models interleaved round by round; the best and the median round of each (shared, noisy VMs)."""
    from llmo.inference.engine.engine import EngineConfig, LLMEngine
    from llmo.inference.engine.params import SamplingParams
    from llmo.inference.models.loader import load_model

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engines = {name: LLMEngine(load_model(path), EngineConfig(max_num_seqs=len(prompts), enable_prefix_caching=False))
               for name, path in paths.items()}
    for engine in engines.values():
        engine.generate(prompts[:1], params)  # warm-up
    samples: dict[str, dict[str, list[float]]] = {name: {"batch1": [], f"batch{len(prompts)}": []} for name in paths}
    for _ in range(rounds):
        for name, engine in engines.items():
            began = time.perf_counter()
            single = sum(len(engine.generate([p], params)[0]) for p in prompts)
            samples[name]["batch1"].append(single / (time.perf_counter() - began))
            began = time.perf_counter()
            batched = sum(len(out) for out in engine.generate(prompts, params))
            samples[name][f"batch{len(prompts)}"].append(batched / (time.perf_counter() - began))
    return {name: {f"{mode}_tokens_per_s": {"best": round(max(v), 1), "median": round(statistics.median(v), 1)}
                   for mode, v in modes.items()} for name, modes in samples.items()}


def main(argv: list[str]) -> dict[str, Any]:
    args = _parse(argv)
    configure_logging("bench", level="warning")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llmo.tune.base import load_llama, load_tokenizer
    from llmo.tune.data import Example, Record, tokenize
    from llmo.tune.distill import DistillConfig, StudentShape, distill, save_checkpoint
    from llmo.tune.lora import load_adapter
    from llmo.tune.metrics import perplexity
    from llmo.tune.quant4 import quiet_peft_warnings

    rows = domain_rows(args.data)
    if len(rows) < args.train_problems + args.eval_problems:
        raise SystemExit(f"only {len(rows)} usable problems; lower --train-problems / --eval-problems")
    train_rows, eval_rows = rows[: args.train_problems], rows[-args.eval_problems:]
    tok = load_tokenizer(args.model)
    domain_eval = tokenize([Record(i, prompt=PROMPT.format(question=q), completion=a)
                            for i, (q, a) in enumerate(eval_rows)], tok, tok.eos_id, args.max_length)
    general_ids = tok.encode(general_heldout(args.data))[: args.general_tokens]
    general_eval = [Example(general_ids[i:i + args.max_length], general_ids[i:i + args.max_length])
                    for i in range(0, len(general_ids) - 1, args.max_length)]
    backends = [b for b in args.quant_backends.split(",") if b]
    unknown = set(backends) - set(QUANT_BACKENDS)
    if unknown:
        raise SystemExit(f"unknown --quant-backends {sorted(unknown)}; choose from {', '.join(QUANT_BACKENDS)}")

    work_root = args.work or Path(tempfile.mkdtemp(prefix="llmo-bench-tune-"))
    work_root.mkdir(parents=True, exist_ok=True)
    try:
        train_file = work_root / "gsm8k-train.jsonl"
        with train_file.open("w", encoding="utf-8") as f:
            for q, a in train_rows:
                f.write(json.dumps({"prompt": PROMPT.format(question=q), "completion": a}) + "\n")

        # (a) LoRA vs QLoRA, each in its own process.
        variants: dict[str, dict[str, Any]] = {"lora": train_variant(args, "lora", None, train_file, work_root)}
        for backend in backends:
            variants[f"qlora_{backend.replace('-', '_')}"] = train_variant(
                args, f"qlora-{backend}", backend, train_file, work_root)

        keys = {"lora": None} | {f"qlora_{b.replace('-', '_')}": b for b in backends}
        interleaved = interleaved_step_seconds(args, train_file, keys, args.interleaved_rounds)

        # (b) Perplexity on the domain and general held-out text.
        def score(model: torch.nn.Module) -> dict[str, float]:
            return {"domain": round(perplexity(model, domain_eval, tok.pad_id, args.batch_size).perplexity, 3),
                    "general": round(perplexity(model, general_eval, tok.pad_id, args.batch_size).perplexity, 3)}

        scores: dict[str, dict[str, float]] = {"base": score(load_llama(args.model))}
        scores["lora"] = score(load_adapter(args.model, variants["lora"]["adapter"]))
        for backend in backends:
            key = f"qlora_{backend.replace('-', '_')}"
            scores[key] = score(load_adapter(args.model, variants[key]["adapter"], quantize=backend))
            with quiet_peft_warnings():
                on_fp = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(args.model)),
                                                  variants[key]["adapter"]).eval()
            scores[f"{key}_on_fp_base"] = score(on_fp)

        # (c) Distil a smaller student from the LoRA-tuned model.
        student_dir, teacher_dir = work_root / "student", work_root / "teacher"
        distilled = distill(DistillConfig(
            teacher=args.model, teacher_adapter=Path(variants["lora"]["adapter"]), corpus=train_file,
            output=student_dir, student=StudentShape(layers=args.student_layers), steps=args.distill_steps,
            batch_size=args.batch_size, max_length=args.max_length, lr=args.lr, eval_fraction=0.05, seed=args.seed,
            speed_prompts=args.speed_prompts, speed_tokens=args.speed_tokens))
        student = LlamaForCausalLM.from_pretrained(str(student_dir)).eval()
        scores["student"] = score(student)
        merged = load_adapter(args.model, variants["lora"]["adapter"]).merge_and_unload()
        assert isinstance(merged, LlamaForCausalLM)
        save_checkpoint(merged, args.model, teacher_dir)
        prompts = [e.input_ids[: next(i for i, t in enumerate(e.labels) if t >= 0)]
                   for e in domain_eval[: args.speed_prompts]]
        serving = engine_speeds({"teacher": teacher_dir, "student": student_dir}, prompts, args.speed_tokens,
                                args.speed_rounds)

        if args.save_adapter:
            args.save_adapter.mkdir(parents=True, exist_ok=True)
            for name in ("adapter_config.json", "adapter_model.safetensors", "training_summary.json"):
                shutil.copyfile(Path(variants["lora"]["adapter"]) / name, args.save_adapter / name)

        quantized = {k: v for k, v in variants.items() if k.startswith("qlora")}
        return {
            "setup": {"model": str(args.model), "threads": args.threads, "steps": args.steps,
                      "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
                      "rank": args.rank, "alpha": args.alpha, "seed": args.seed,
                      "domain": "GSM8K word problems with worked answers (loss and perplexity on the answer)",
                      "train_problems": len(train_rows), "domain_eval_problems": len(eval_rows),
                      "domain_eval_tokens": sum(e.label_tokens for e in domain_eval),
                      "general_eval_tokens": sum(len(e.input_ids) - 1 for e in general_eval)},
            "lora_vs_qlora": {k: {f: v for f, v in d.items() if f != "adapter"} for k, d in variants.items()},
            "seconds_per_step_interleaved": interleaved,
            "qlora_fastest_backend": min(quantized, key=lambda k: interleaved[k]["median"]) if quantized else None,
            "qlora_smallest_rss_backend": min(quantized, key=lambda k: quantized[k]["peak_rss_mb"]) if quantized else None,
            "perplexity": scores,
            "distill": {
                "student_shape": distilled.student_config, "init": distilled.init, "steps": distilled.steps,
                "train_seconds": round(distilled.train_seconds, 1),
                "student_parameters": distilled.student.parameters, "teacher_parameters": distilled.teacher.parameters,
                "size_ratio": round(distilled.student.parameters / distilled.teacher.parameters, 3),
                "student_weight_mb": round(distilled.student.weight_bytes / 2**20, 2),
                "teacher_weight_mb": round(distilled.teacher.weight_bytes / 2**20, 2),
                "greedy_tokens_per_s_transformers": {
                    "teacher": round(distilled.teacher.greedy_tokens_per_s, 1),
                    "student": round(distilled.student.greedy_tokens_per_s, 1)},
                "greedy_tokens_per_s_engine": serving,
            },
            "saved_adapter": str(args.save_adapter) if args.save_adapter else None,
            "seconds_total": round(time.perf_counter() - began, 1),
        }
    finally:
        if args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
