"""Fairness between requests in the scheduler (a group: one request's n choices): a small request is
admitted while a big one holds every slot, the big one does not win its slot back, the preempted victim
is the biggest group's newest, and a request that never started ends after --max-queue-wait."""

import time

from minillm import SamplingParams
from minillm.engine.block_manager import BlockManager
from minillm.engine.scheduler import Scheduler
from minillm.engine.sequence import Sequence

LONG = SamplingParams(max_tokens=1000)


def run_step(scheduler):
    step = scheduler.schedule()
    for seq, count in zip(step.seqs, step.num_tokens):
        seq.num_computed += count
        if seq.num_computed == len(seq):
            seq.token_ids.append(7)
    return [s.request_id for s in step.seqs]


def test_a_small_request_gets_a_slot_while_a_big_one_holds_them_all():
    scheduler = Scheduler(BlockManager(64, 16, False), max_num_seqs=8)
    for i in range(8):
        scheduler.add(Sequence([1] * 20, LONG, f"big{i}", group="big"))
    run_step(scheduler)
    scheduler.add(Sequence([1] * 5, LONG, "small", group="small"))
    assert "small" in run_step(scheduler)
    assert [s.request_id for s in scheduler.waiting] == ["big7"]  # the big group's newest gave way
    for _ in range(3):  # and it does not take the slot back: 7 running against 1 is within one of fair
        assert "big7" not in run_step(scheduler)


def test_no_preemption_within_one_of_fair():
    scheduler = Scheduler(BlockManager(64, 16, False), max_num_seqs=2)
    for group in ("a", "b"):
        scheduler.add(Sequence([1] * 20, LONG, f"{group}0", group=group))
    run_step(scheduler)
    scheduler.add(Sequence([1] * 5, LONG, "c0", group="c"))
    run_step(scheduler)  # one each: c waits for a slot (and --max-queue-wait bounds how long)
    assert [s.request_id for s in scheduler.waiting] == ["c0"] and scheduler.num_preemptions == 0


def test_blocks_are_shared_fairly_too():
    scheduler = Scheduler(BlockManager(8, 16, False), max_num_seqs=16)  # 8 blocks: the big group fills them
    for i in range(4):
        scheduler.add(Sequence([1] * 30, LONG, f"big{i}", group="big"))
    run_step(scheduler)
    scheduler.add(Sequence([1] * 20, LONG, "small", group="small"))
    assert "small" in run_step(scheduler)


def test_only_requests_that_never_started_expire():
    scheduler = Scheduler(BlockManager(64, 16, False), max_num_seqs=1)
    running, waiting = Sequence([1] * 5, LONG, "running"), Sequence([1] * 5, LONG, "waiting")
    scheduler.add(running)
    run_step(scheduler)
    scheduler.add(waiting)
    assert scheduler.expired(10.0) == []
    waiting.arrival = running.arrival = time.monotonic() - 11
    assert scheduler.expired(10.0) == [waiting]
