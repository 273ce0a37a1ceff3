from __future__ import annotations

import pytest

from llmo.inference.engine.block_manager import BlockManager, NoFreeBlocksError, block_hash


def test_free_list_and_reference_counts() -> None:
    bm = BlockManager(4, 2)
    a = bm.allocate(3)
    assert bm.num_free_blocks == 1
    bm.share(a[:1])
    bm.release(a)
    assert bm.num_free_blocks == 3 and bm.ref_counts[a[0]] == 1
    bm.release(a[:1])
    assert bm.num_free_blocks == 4
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(5)
    with pytest.raises(RuntimeError, match="released more often"):
        bm.release(a[:1])


def test_prefix_match_reuses_registered_blocks_and_leaves_one_token() -> None:
    bm = BlockManager(8, 2)
    tokens = [1, 2, 3, 4, 5, 6]
    blocks = bm.allocate(3)
    parent = b""
    for i, block in enumerate(blocks):
        parent = block_hash(parent, tokens[2 * i:2 * i + 2])
        bm.register(block, parent)
    bm.release(blocks)
    matched, hashes = bm.match_prefix(tokens)
    # 6 tokens = 3 full blocks, but the last token must be computed again for its logits.
    assert matched == blocks[:2] and len(hashes) == 2
    assert all(bm.ref_counts[b] == 1 for b in matched)
    assert bm.match_prefix([1, 2, 9, 9, 9])[0] == [blocks[0]]
    assert bm.match_prefix([7, 7, 7])[0] == []
    assert bm.prefix_hit_rate() == pytest.approx(6 / 14)


def test_cached_blocks_are_evicted_least_recently_used_first() -> None:
    bm = BlockManager(2, 1)
    a, b = bm.allocate(2)
    bm.register(a, block_hash(b"", [1]))
    bm.register(b, block_hash(b"", [2]))
    bm.release([a])
    bm.release([b])
    assert bm.num_free_blocks == 2
    (c,) = bm.allocate(1)
    assert c == a
    assert bm.match_prefix([1, 0])[0] == []
    assert bm.match_prefix([2, 0])[0] == [b]


def test_disabled_prefix_caching_never_matches() -> None:
    bm = BlockManager(2, 1, enable_prefix_caching=False)
    (a,) = bm.allocate(1)
    bm.register(a, block_hash(b"", [1]))
    assert bm.match_prefix([1, 2])[0] == []
