"""Which sequences run in the next step, and how many tokens each. Plain Python, no torch.

Every step is mixed, as in vLLM: each decoding sequence feeds its next token, and the rest of the
token budget goes to prompt chunks (prompts under way first, then new requests in arrival order), so a
long prompt is prefilled in pieces while the others keep decoding, and no step is spent on a few
decode rows alone. The model runner packs the step's tokens into one input, so chunks of any length
cost no padding. A paused sequence (its stream's reader fell behind) keeps its blocks but gets no
decode token until it is resumed. When a decoding sequence finds no free block, a running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later.

Fairness between requests (a group: one request's n choices): a waiting sequence is admitted from the
group running the fewest sequences first (then in arrival order), and the sequence preempted is the
newest of the group running the most. A waiting sequence whose group runs at least two fewer sequences
than the largest group preempts that group's newest to get a slot or blocks, so one request with n=16
and huge max_tokens cannot keep a small request waiting until it ends.

Speculative decoding (engine/speculative.py): a decoding sequence may also feed draft tokens after its
next one, as many as the drafter decides for the step's decoding sequences together (`draft_lens`: where
they are expected to pay for their rows) and the free blocks allow; drafts take what the budget leaves after
the decode tokens and prompt chunks, and never preempt anyone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens each sequence feeds, from its num_computed on, its draft tokens included
    # draft tokens each sequence feeds after its last token; the scheduler reserves room for them
    # (num_tokens and blocks), the drafter fills them in (`set_drafts`)
    drafts: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.drafts = self.drafts or [[] for _ in self.seqs]

    @property
    def samples(self) -> list[bool]:
        """Whether each sequence reaches its last token this step (and so samples a new one)."""
        return [s.num_computed + n - len(d) == len(s) for s, n, d in zip(self.seqs, self.num_tokens, self.drafts)]

    @property
    def draft_slots(self) -> list[int]:
        """Draft tokens each sequence has room for: what its num_tokens holds beyond its own tokens."""
        return [s.num_computed + n - len(s) if n > len(s) - s.num_computed else 0
                for s, n in zip(self.seqs, self.num_tokens)]

    def set_drafts(self, drafts: list[list[int]]) -> None:
        """The drafter's tokens (at most `draft_slots` each); num_tokens shrinks to what is fed."""
        self.num_tokens = [len(s) - s.num_computed + len(d) if d or slots else n
                           for s, n, d, slots in zip(self.seqs, self.num_tokens, drafts, self.draft_slots)]
        self.drafts = drafts


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 draft_lens: Callable[[list[Sequence], int, int], list[int]] | None = None) -> None:
        """draft_lens(seqs, rows, budget): how many draft tokens each decoding sequence feeds, in a step of
        `rows` rows before drafts, `budget` at most in all (None: the engine does not speculate)."""
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.blocks = block_manager
        self.draft_lens = draft_lens
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def expired(self, max_wait: float) -> list[Sequence]:
        """Waiting sequences that never started (preempted ones did) and arrived more than `max_wait` s ago."""
        now = time.monotonic()
        return [s for s in self.waiting if not s.num_preemptions and now - s.arrival > max_wait]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.abort(seq)

    def schedule(self) -> ScheduledStep | None:
        self._rebalance()
        seqs, num_tokens = self._schedule_decode()
        decoding = len(seqs)
        budget = self.max_num_batched_tokens - sum(num_tokens)
        remaining = lambda s: len(s) - s.num_computed  # noqa: E731
        for seq in [s for s in self.running if s.in_prefill]:
            if budget <= 0:
                break
            seqs.append(seq)
            num_tokens.append(min(remaining(seq), budget))
            budget -= num_tokens[-1]
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if not self.blocks.allocate(seq):
                break  # wait for blocks to free up
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_tokens.append(min(remaining(seq), budget))  # after any prefix-cache hit
            budget -= num_tokens[-1]
        if self.draft_lens is not None and decoding and budget > 0:
            self._reserve_drafts(seqs[:decoding], num_tokens, budget)
        return ScheduledStep(seqs, num_tokens) if seqs else None

    def _reserve_drafts(self, seqs: list[Sequence], num_tokens: list[int], budget: int) -> None:
        """Room for the draft tokens the drafter wants after the decoding sequences' (the first) tokens."""
        for i, (seq, k) in enumerate(zip(seqs, self.draft_lens(seqs, sum(num_tokens), budget))):
            if k > 0 and self.blocks.ensure_capacity(seq, len(seq) + k):  # only free blocks: drafts preempt no one
                num_tokens[i] += k

    def _schedule_decode(self) -> tuple[list[Sequence], list[int]]:
        """One token for every decoding sequence, preempting the newest running ones for blocks."""
        scheduled: list[Sequence] = []
        for seq in [s for s in self.running if not s.in_prefill and not s.paused]:
            if seq.status is not Status.RUNNING:
                continue  # preempted below to make room for an older sequence
            while not self.blocks.ensure_capacity(seq, len(seq)):
                victim = self._victim([s for s in self.running if s not in scheduled])  # never one already in the step
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                scheduled.append(seq)
        return scheduled, [1] * len(scheduled)

    def _running_in(self, group: str) -> int:
        return sum(s.group == group for s in self.running)

    def _victim(self, candidates: list[Sequence]) -> Sequence:
        """The newest of `candidates` (running sequences, in admission order) of the group running the most."""
        return max(reversed(candidates), key=lambda s: self._running_in(s.group))

    def _next_waiting(self) -> Sequence:
        """The first waiting sequence of the group running the fewest."""
        return min(self.waiting, key=lambda s: self._running_in(s.group))

    def _rebalance(self) -> None:
        """Before a step: while the next waiting sequence finds no slot or too few free blocks (prefix hits
        aside), preempt the newest of the largest group, if it runs at least two more than the waiting one's."""
        if not self.waiting:
            return
        seq = self._next_waiting()
        while self.running and (len(self.running) >= self.max_num_seqs
                                or self.blocks.blocks_needed(len(seq)) > self.blocks.num_free):
            victim = self._victim(self.running)
            if self._running_in(victim.group) < self._running_in(seq.group) + 2:
                return
            self._preempt(victim)

    def recompute(self, seq: Sequence) -> None:
        """Compute a running sequence's K/V again from its first token, into the blocks it holds (Phi-3's
        longrope once the sequence outgrows the original context, as transformers' generate does); with no
        block free for its newest token, it is preempted, which recomputes it too."""
        if self.blocks.ensure_capacity(seq, len(seq)):
            seq.num_computed = seq.num_cached = 0
        else:
            self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = seq.num_cached = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
