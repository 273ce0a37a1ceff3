"""Train the inference service's demo model: a byte-level BPE tokenizer and a small Llama.

    python scripts/train_demo_model.py ../shared/data/text/tinyshakespeare.txt \
        --out services/inference/demo_model

Writes a Hugging Face style directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json) and prints the held-out perplexity (the last 10% of the
text, never trained on). Everything is seeded; the defaults take ~20 minutes on
one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmo.inference.models.config import ModelConfig, RopeConfig
from llmo.inference.models.llama import LlamaForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}:\n{{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, ids: torch.Tensor, ctx: int, batch: int = 16) -> float:
    model.eval()
    n = (len(ids) - 1) // ctx
    xs = ids[: n * ctx].view(n, ctx)
    ys = ids[1 : n * ctx + 1].view(n, ctx)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        logits = model.forward_dense(xs[i : i + batch])
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), ys[i : i + batch].flatten(), reduction="sum"
        )
        total += float(loss)
        count += ys[i : i + batch].numel()
    model.train()
    return math.exp(total / count)


def write_checkpoint(out: Path, model: LlamaForCausalLM, tok: Tokenizer, config: ModelConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": config.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0],
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
    }, indent=2) + "\n")


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", type=Path)
    p.add_argument("--out", type=Path, default=Path("services/inference/demo_model"))
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--holdout", type=float, default=0.1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    text = args.text.read_text(encoding="utf-8")
    split = int(len(text) * (1 - args.holdout))
    train_text, held_text = text[:split], text[split:]
    tok = train_tokenizer(train_text, args.vocab_size)
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.int64)
    held_ids = torch.tensor(tok.encode(held_text).ids, dtype=torch.int64)
    print(f"tokenizer: vocab={tok.get_vocab_size()} train_tokens={len(train_ids)} held_tokens={len(held_ids)}",
          flush=True)

    eos = tok.token_to_id("<|endoftext|>")
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=tok.get_vocab_size(), hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads, max_position_embeddings=2 * args.ctx,
        rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0), bos_token_id=eos, eos_token_ids=(eos,),
    )
    model = LlamaForCausalLM(config)
    for name, param in model.named_parameters():
        if param.dim() == 2:
            torch.nn.init.normal_(param, std=0.02 if "o_proj" not in name and "down_proj" not in name
                                  else 0.02 / math.sqrt(2 * args.layers))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(step / warmup, 0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(train_ids) - args.ctx - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[o : o + args.ctx] for o in offsets.tolist()])
        y = torch.stack([train_ids[o + 1 : o + args.ctx + 1] for o in offsets.tolist()])
        logits = model.forward_dense(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss={loss.item():.4f} lr={lr:.2e} elapsed={time.time() - start:.0f}s",
                  flush=True)
    ppl = perplexity(model, held_ids, args.ctx)
    print(f"held-out perplexity: {ppl:.3f} ({len(held_ids)} tokens, last {args.holdout:.0%} of the text)",
          flush=True)
    write_checkpoint(args.out, model, tok, config)
    print(f"wrote {args.out} in {time.time() - start:.0f}s", flush=True)
    return ppl


if __name__ == "__main__":
    main()
