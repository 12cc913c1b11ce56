"""KV-cache blocks: allocation, reference counts and prefix caching. Plain Python, no torch.

A sequence's tokens live in fixed-size blocks listed in its block table. A block that is full and
whose K/V have been computed gets a hash chained over every token before it, so another request
whose prompt starts with the same tokens can share the block instead of recomputing it. Freed
blocks keep their hash (and stay findable) until they are handed out again, least recently freed
first; handing one out drops its stale hash from the index.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once full and computed
    token_ids: tuple[int, ...] | None = None  # the tokens behind `hash`, to rule out collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered: oldest free first
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up at admission
        self.prefix_hits = 0  # of those, found in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    @staticmethod
    def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    # -- admission -------------------------------------------------------------------------------

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Only blocks that end before the last token can be hits: at least one token is always
        computed, so the sequence gets logits to sample from. Returns False, changing nothing,
        when there are not enough free blocks.
        """
        assert not seq.block_table, f"{seq} already has blocks"
        size = self.block_size
        hits: list[int] = []
        if self.enable_prefix_caching:
            prev = None
            for start in range(0, len(seq) - 1 - size + 1, size):
                tokens = tuple(seq.token_ids[start:start + size])
                key = self.chain_hash(prev, tokens)
                block_id = self.hash_to_block.get(key)
                if block_id is None or self.blocks[block_id].token_ids != tokens:
                    break
                hits.append(block_id)
                prev = key
        fresh = self.blocks_needed(len(seq)) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # cached but free: they use up free slots
        if fresh + revived > self.num_free:
            return False
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits + [self._take_free() for _ in range(fresh)]
        seq.num_computed = seq.num_cached = len(hits) * size
        seq.num_hashed_blocks = len(hits)
        self.prefix_queries += len(seq)
        self.prefix_hits += seq.num_cached
        return True

    # -- growth, release -------------------------------------------------------------------------

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens`; False (nothing taken) if blocks run out."""
        extra = self.blocks_needed(num_tokens) - len(seq.block_table)
        if extra > self.num_free:
            return False
        seq.block_table += [self._take_free() for _ in range(max(extra, 0))]
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past those `num_tokens` need: the ones taken for draft tokens that were
        rejected (speculative decoding). They are the sequence's own fresh blocks, never full of computed
        tokens, so they hold no hash and nobody else refers to them."""
        keep = self.blocks_needed(num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            block = self.blocks[block_id]
            assert block.ref_count == 1 and block.hash is None, f"block {block_id} is not a draft's"
            block.ref_count = 0
            self.free_ids[block_id] = None
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody uses become free (tail blocks first, so
        that shared prefixes are the last to be overwritten)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def register_computed(self, seq: Sequence) -> None:
        """Index the sequence's blocks that are now full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        full = min(seq.num_computed // size, len(seq.block_table))
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            prev = self.blocks[seq.block_table[i - 1]].hash if i else None
            tokens = tuple(seq.token_ids[i * size:(i + 1) * size])
            block.hash, block.token_ids = self.chain_hash(prev, tokens), tokens
            # The newest copy wins when two requests computed the same block in one step.
            self.hash_to_block[block.hash] = block.block_id
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix of the free blocks (blocks in use keep theirs), as vLLM's
        `reset_prefix_cache`: a benchmark repeating the same prompts must compute them again."""
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash = block.token_ids = None
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.blocks[b].ref_count}

    # -- internals -------------------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id = next(iter(self.free_ids))
        del self.free_ids[block_id]
        block = self.blocks[block_id]
        # Its content is about to be overwritten: forget the old hash if the index still points here.
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id
