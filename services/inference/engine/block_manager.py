"""Paged KV block allocator: free list, reference counts, prefix caching by chained block hash."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


class NoFreeBlocksError(RuntimeError):
    pass


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Hash of a full block, chained on the previous block so equal hashes mean equal prefixes."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Unreferenced blocks that still hold a cached prefix, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._block_of.pop(self._hash_of.pop(block), None)
        else:
            raise NoFreeBlocksError("no free KV blocks")
        self.ref_counts[block] = 1
        return block

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {count} KV blocks, {self.num_free_blocks} free")
        return [self._take() for _ in range(count)]

    def share(self, blocks: list[int]) -> None:
        for block in blocks:
            self.ref_counts[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"KV block {block} released more often than allocated")
            if self.ref_counts[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def match_prefix(self, token_ids: list[int], salt: bytes = b"") -> tuple[list[int], list[bytes]]:
        """Longest run of cached full blocks for `token_ids`, referenced for the caller.

        At least one token is always left uncached so the model computes logits for it.
        `salt` starts the hash chain: blocks computed under another salt (another LoRA
        adapter) never match.
        """
        if not self.enable_prefix_caching:
            return [], []
        usable = (len(token_ids) - 1) // self.block_size
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent = salt
        for i in range(usable):
            h = block_hash(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        for block in blocks:
            if self.ref_counts[block] == 0:
                self._evictable.pop(block, None)
            self.ref_counts[block] += 1
        self.prefix_queries += len(token_ids)
        self.prefix_hits += len(blocks) * self.block_size
        return blocks, hashes

    def register(self, block: int, h: bytes) -> None:
        """Record that `block` now holds the full block with hash `h` (first writer wins)."""
        if self.enable_prefix_caching and h not in self._block_of and block not in self._hash_of:
            self._block_of[h] = block
            self._hash_of[block] = h

    def reset_prefix_cache(self) -> None:
        for block in list(self._evictable):
            self._free.append(block)
        self._evictable.clear()
        self._hash_of.clear()
        self._block_of.clear()
