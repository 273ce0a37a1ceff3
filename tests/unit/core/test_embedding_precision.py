"""The shared MiniLM embedder's precisions: bf16 autocast gives vectors a search cannot tell from fp32's,
"auto" picks bf16 only on CPUs that multiply bf16 natively, and the two never share a cache file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmo.embedding import Embedder, resolve_precision

TEXTS = ["How do I choose an anvil for a small forge?", "Anvil prices went up by 12% in 2025.",
         "The river kayaking season starts in May.", "Acme Analytics measures how answer engines cite brands.",
         ""]


def test_auto_is_bf16_only_where_the_cpu_has_native_bf16() -> None:
    assert resolve_precision("auto", {"avx2", "avx512f", "avx512_bf16"}) == "bf16"
    assert resolve_precision("auto", {"avx2", "amx_bf16", "amx_tile"}) == "bf16"
    assert resolve_precision("auto", {"avx2", "avx512f", "avx512_vnni"}) == "fp32"
    assert resolve_precision("fp32", {"avx512_bf16"}) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", set())


def test_bf16_vectors_are_unit_length_and_rank_like_fp32(tmp_path: Path) -> None:
    fp32 = Embedder(max_seq_length=128).encode(TEXTS)
    bf16 = Embedder(max_seq_length=128, precision="bf16").encode(TEXTS)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert np.allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert (bf16 * fp32).sum(axis=1).min() > 0.995
    # The nearest text to each query is the same under both precisions.
    assert ((fp32 @ fp32.T).argsort(axis=1)[:, -2] == (bf16 @ bf16.T).argsort(axis=1)[:, -2]).all()


def test_precisions_keep_separate_caches(tmp_path: Path) -> None:
    Embedder(cache_dir=tmp_path, max_seq_length=128).encode(TEXTS[:2])
    Embedder(cache_dir=tmp_path, max_seq_length=128, precision="bf16").encode(TEXTS[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm-l6-v2-128-bf16.npz", "minilm-l6-v2-128.npz"]
