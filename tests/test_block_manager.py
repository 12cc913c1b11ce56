"""Block manager and scheduler alone (plain Python, no model): the known failure modes."""

import pytest

from minillm.engine.block_manager import BlockManager
from minillm.engine.scheduler import Scheduler
from minillm.engine.sequence import Sequence, Status
from minillm.sampling_params import SamplingParams


def seq(tokens, max_tokens=4):
    return Sequence(list(tokens), SamplingParams(max_tokens=max_tokens))


def compute(bm: BlockManager, s: Sequence, upto: int | None = None) -> None:
    """Pretend a forward pass computed the sequence's tokens up to `upto` (default: all but none left)."""
    s.num_computed = len(s) if upto is None else upto
    bm.register_computed(s)


def all_free(bm: BlockManager) -> bool:
    return bm.num_free == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_blocks_are_shared_and_counted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(10))  # blocks: [0-3] [4-7] [8-9]
    assert bm.allocate(a) and a.num_cached == 0 and len(a.block_table) == 3
    compute(bm, a)
    b = seq(list(range(8)) + [50, 51, 52])
    assert bm.allocate(b)
    assert b.num_cached == 8 and b.num_computed == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.prefix_hits == 8 and bm.prefix_queries == 21
    bm.free(a)
    bm.free(b)
    assert all_free(bm)


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(8))  # exactly two full blocks
    bm.allocate(a)
    compute(bm, a)
    b = seq(range(8))
    assert bm.allocate(b)
    assert b.num_cached == 4  # the block holding the last token is not a hit
    assert b.num_computed < len(b)
    assert b.block_table[1] != a.block_table[1]  # and gets its own block, so nothing shared is written


def test_reused_block_drops_its_stale_hash():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute(bm, a)
    old_block, old_hash = a.block_table[0], bm.blocks[a.block_table[0]].hash
    assert bm.hash_to_block[old_hash] == old_block
    bm.free(a)
    b = seq([9, 9, 9, 9, 9, 9])  # needs both blocks: the cached one is overwritten
    assert bm.allocate(b)
    assert old_hash not in bm.hash_to_block
    compute(bm, b)
    bm.free(b)
    c = seq([1, 2, 3, 4, 5])  # must not "hit" the block that now holds b's tokens
    assert bm.allocate(c) and c.num_cached == 0


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(9))
    bm.allocate(a)
    compute(bm, a)
    bm.free(a)
    b = seq(range(9))
    assert bm.allocate(b) and b.num_cached == 8  # revived from the free list
    assert bm.num_free == 1


def test_two_identical_prefixes_in_one_step():
    """Blocks are indexed only once computed, so a twin admitted in the same step gets no hit on
    K/V that does not exist yet; when both finish, the index points at one live copy."""
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = seq(range(9)), seq(range(9))
    assert bm.allocate(a) and bm.allocate(b)
    assert a.num_cached == b.num_cached == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    compute(bm, a)
    compute(bm, b)
    first_hash = bm.blocks[a.block_table[0]].hash
    assert bm.hash_to_block[first_hash] in (a.block_table[0], b.block_table[0])
    bm.free(b)
    bm.free(a)
    c = seq(range(9))
    assert bm.allocate(c) and c.num_cached == 8
    for s in (c,):
        bm.free(s)
    assert all_free(bm)


def test_not_enough_blocks_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(range(9))
    assert bm.allocate(a)
    b = seq(range(100, 105))
    assert not bm.allocate(b)
    assert b.block_table == [] and bm.num_free == 0
    assert not bm.ensure_capacity(a, 13)
    assert len(a.block_table) == 3


def make_scheduler(num_blocks, block_size=4, max_num_seqs=8, budget=64):
    bm = BlockManager(num_blocks, block_size)
    return bm, Scheduler(bm, max_num_seqs, budget)


def run_step(bm, sched, step, token=7):
    """Apply a scheduled step as the engine would: advance, index blocks, append sampled tokens."""
    for s, n, samples in zip(step.seqs, step.num_tokens, step.samples):
        s.num_computed += n
        bm.register_computed(s)
        if samples:
            s.token_ids.append(token)
            if s.num_outputs >= s.params.max_tokens:
                sched.finish(s, "length")


def test_preempted_request_is_readmitted_and_nothing_leaks():
    bm, sched = make_scheduler(num_blocks=6, block_size=4)
    seqs = [seq(range(i * 10, i * 10 + 7), max_tokens=9) for i in range(3)]  # 7 + 9 = 16 tokens: 4 blocks each
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        step = sched.schedule()
        assert step is not None, "the scheduler stalled"
        run_step(bm, sched, step)
        steps += 1
        assert steps < 500
    assert sched.num_preemptions > 0, "the cache was too small not to preempt"
    assert all(s.num_outputs == 9 and s.status is Status.FINISHED for s in seqs)
    assert sum(s.num_preemptions for s in seqs) == sched.num_preemptions
    assert all_free(bm)


def test_long_prompt_is_chunked_while_others_decode_in_the_same_steps():
    bm, sched = make_scheduler(num_blocks=64, block_size=4, budget=16)
    short = seq(range(3), max_tokens=20)
    sched.add(short)
    run_step(bm, sched, sched.schedule())  # short prefilled, now decoding
    long = seq(range(100, 160), max_tokens=2)  # 60 tokens: chunks of 15 beside short's token
    sched.add(long)
    chunks = []
    while long.in_prefill or long.status is Status.WAITING:
        step = sched.schedule()
        assert sum(step.num_tokens) <= 16
        assert short in step.seqs and step.num_tokens[step.seqs.index(short)] == 1  # never stalled
        chunks.append(step.num_tokens[step.seqs.index(long)])
        run_step(bm, sched, step)
    assert chunks == [15, 15, 15, 15]
    assert short.num_outputs == 5


def test_abort_frees_blocks_at_once():
    bm, sched = make_scheduler(num_blocks=8)
    a, b = seq(range(9)), seq(range(20, 25))
    sched.add(a)
    sched.add(b)
    run_step(bm, sched, sched.schedule())
    sched.abort(a)
    sched.abort(b)
    assert all_free(bm) and not sched.has_unfinished()


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = seq(range(9)), seq(range(100, 109))
    for s in (a, b):
        bm.allocate(s)
        compute(bm, s)
    bm.free(a)  # a's blocks are free but findable; b's are in use
    bm.reset_prefix_cache()
    again_a, again_b = seq(range(9)), seq(range(100, 109))
    bm.allocate(again_a)
    bm.allocate(again_b)
    assert again_a.num_cached == 0 and again_b.num_cached == 8


@pytest.mark.parametrize("n", [1, 5])
def test_hits_are_capped_below_the_prompt_length(n):
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(4 * n))
    bm.allocate(a)
    compute(bm, a)
    b = seq(range(4 * n))
    bm.allocate(b)
    assert b.num_cached == 4 * (n - 1)


def test_steps_fill_the_token_budget_and_every_prompt_finishes():
    bm, sched = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=16, budget=64)
    lengths = [40, 5, 38, 6, 60, 3, 33, 17]
    seqs = [seq(range(i * 100, i * 100 + n), max_tokens=3) for i, n in enumerate(lengths)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        decoding = [s for s in sched.running if not s.in_prefill]
        prompt_tokens_left = sum(len(s) - s.num_computed for s in sched.running + list(sched.waiting) if s.in_prefill
                                 or s.status is Status.WAITING)
        step = sched.schedule()
        assert all(s in step.seqs for s in decoding)  # every decoding sequence moves on every step
        assert sum(step.num_tokens) == min(64, len(decoding) + prompt_tokens_left)  # no budget left idle
        run_step(bm, sched, step)
        steps += 1
        assert steps < 50, "a prompt starved"
    assert all(s.num_outputs == 3 for s in seqs)
    assert steps == 6  # 202 prompt tokens + decodes in steps of 64, then the last decodes
    assert all_free(bm)
