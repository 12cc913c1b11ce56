"""A request as the scheduler sees it: tokens, progress, blocks. Plain Python, no torch."""

from __future__ import annotations

import time
from enum import Enum
from itertools import count
from typing import Any

_ids = count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt plus generated tokens; `num_computed` of them have K/V in the cache.

    After a preemption `num_computed` drops to 0 and the whole token list (prompt and output so
    far) is computed again as a longer prompt; the output already produced is kept.
    """

    def __init__(self, prompt_ids: list[int], params: Any, request_id: str | None = None,
                 group: str | None = None) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.group = group if group is not None else self.request_id  # sequences that share fairly (one request's n)
        self.arrival = time.monotonic()
        self.params = params
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_cached = 0  # of those, how many came from the prefix cache at admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks already indexed for prefix caching
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.paused = False  # its consumer is not reading: no decode steps until it catches up
        self.state: Any = None  # per-request data of the layers above (sampler, detokenizer)
        self.spec: Any = None  # the drafter's per-sequence state when the engine speculates (engine/drafters.py)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def in_prefill(self) -> bool:
        """Tokens other than the last are not yet in the cache (a prompt, or a recompute)."""
        return self.num_computed < len(self.token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.status.value}, tokens={len(self)}, "
                f"computed={self.num_computed}, blocks={self.block_table})")
