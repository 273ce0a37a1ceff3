"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) with a dense and a paged-KV forward.

Parameter names follow the Hugging Face checkpoints so a safetensors file loads
with `load_state_dict` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmo import ops
from llmo.inference.models import layers
from llmo.inference.models.config import ModelConfig, rope_inv_freq

OPS_BLOCK_SIZES = (8, 16, 32)


@dataclass
class PagedBatch:
    """One engine step: the tokens of several sequences flattened into one row.

    Sequences are ordered prefills first, then decodes (one token each).
    `query_lens[i]` tokens of sequence i are in this step; its context after the
    step is `context_lens[i]` tokens, whose KV lives in the blocks of `block_tables[i]`.
    """

    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64: cache slot each token's K/V is written to
    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor  # [S, max_blocks] int64 (padded with 0)
    num_prefills: int  # the first num_prefills sequences go through the prefill path
    logits_indices: torch.Tensor  # [S'] rows of the flattened batch whose logits are wanted
    context_lens_t: torch.Tensor | None = None  # [S] context_lens as a tensor
    prefill_start_loc: torch.Tensor | None = None  # [num_prefills + 1] query row offsets of the prefills

    def __post_init__(self) -> None:
        device = self.token_ids.device
        if self.context_lens_t is None:
            self.context_lens_t = torch.tensor(self.context_lens, dtype=torch.int64, device=device)
        if self.prefill_start_loc is None:
            starts = [0]
            for qlen in self.query_lens[: self.num_prefills]:
                starts.append(starts[-1] + qlen)
            self.prefill_start_loc = torch.tensor(starts, dtype=torch.int64, device=device)


class KVCache:
    """Paged KV storage: per layer [num_blocks, block_size, kv_heads, head_dim] for K and V."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.key = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.value = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        per_layer = 2 * block_size * config.num_kv_heads * config.head_dim * torch.empty(0, dtype=dtype).element_size()
        return per_layer * config.num_layers


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.sliding_window = config.sliding_window
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        q, k = layers.rotary_embedding(q, k, cos, sin)
        return q, k, v

    def forward_dense(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))
        mask = None
        if self.sliding_window is not None and t > self.sliding_window:
            i = torch.arange(t, device=x.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.sliding_window)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward_paged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PagedBatch,
                      k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)
        assert batch.context_lens_t is not None and batch.prefill_start_loc is not None
        n_pre = batch.num_prefills
        prefill_rows = int(batch.prefill_start_loc[-1])
        if self.sliding_window is not None or k_cache.shape[1] not in OPS_BLOCK_SIZES:
            # The op registry's kernels have no sliding window and take block sizes 8/16/32 only.
            return self.o_proj(self._paged_reference(q, k, v, batch, k_cache, v_cache).reshape(x.shape[0], -1))
        ops.write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
        parts = []
        if n_pre:
            parts.append(ops.chunked_prefill_attention(
                q[:prefill_rows], k_cache, v_cache, batch.block_tables[:n_pre], batch.context_lens_t[:n_pre],
                batch.prefill_start_loc, self.scale,
            ))
        if prefill_rows < q.shape[0]:
            parts.append(ops.paged_attention_decode(
                q[prefill_rows:], k_cache, v_cache, batch.block_tables[n_pre:], batch.context_lens_t[n_pre:],
                self.scale,
            ))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.o_proj(out.reshape(x.shape[0], -1))

    def _paged_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch,
                         k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        layers.write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
        out = torch.empty_like(q)
        n_pre = batch.num_prefills
        start = 0
        for i in range(n_pre):
            qlen = batch.query_lens[i]
            out[start:start + qlen] = layers.prefill_attention(
                q[start:start + qlen], k_cache, v_cache, batch.block_tables[i], batch.context_lens[i],
                self.scale, self.sliding_window,
            )
            start += qlen
        if start < q.shape[0]:
            assert batch.context_lens_t is not None
            out[start:] = layers.paged_attention_decode(
                q[start:], k_cache, v_cache, batch.block_tables[n_pre:], batch.context_lens_t[n_pre:],
                self.scale, self.sliding_window,
            )
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(layers.silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layers.rms_norm(x, self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaBackbone(nn.Module):
    layers: list[DecoderLayer]  # an nn.ModuleList at run time

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))  # type: ignore[assignment]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope), persistent=False)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward over [batch, time] tokens; returns logits for every position."""
        h = self.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary(positions, h.dtype)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        for layer in self.model.layers:
            h = h + layer.self_attn.forward_dense(layer.input_layernorm(h), cos, sin)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.model.norm(h))

    def forward_paged(self, batch: PagedBatch, cache: KVCache) -> torch.Tensor:
        """One engine step over flattened tokens; returns logits at `batch.logits_indices` (float32)."""
        h = self.model.embed_tokens(batch.token_ids)
        cos, sin = self.rotary(batch.positions, h.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        for idx, layer in enumerate(self.model.layers):
            h = h + layer.self_attn.forward_paged(
                layer.input_layernorm(h), cos, sin, batch, cache.key[idx], cache.value[idx]
            )
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h[batch.logits_indices])
        return self.lm_head(h).float()
