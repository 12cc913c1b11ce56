"""What a step of R rows costs on this machine, measured once at start-up: speculative decoding's cost model
(engine/drafters.py weighs a draft row's cost against the tokens it is expected to save).

A step's time grows with its rows in a way that depends on the device and the model: on the 2-core CPU the
fused GGUF decoder is compute-bound from one row on (a row costs ~0.3 of a one-row step: speculation pays
at batch 1, hardly at batch 16), a GPU reads the weights once for up to dozens of rows nearly for free.
So the engine times it rather than guessing: steps of 1, 2, 4, ... sequences feeding one token each after
CONTEXT tokens (attention over a realistic context costs each row too), on scratch blocks of the fresh cache
(as `ModelRunner.warmup`), each the fastest of a few runs, read between the points by linear interpolation
and beyond the last by its slope. Where decode steps replay CUDA graphs, a step with a draft
runs eagerly: such steps are timed too (`spec`), so the first draft row pays for leaving the graph.
"""

from __future__ import annotations

import bisect
import time
from types import SimpleNamespace

import torch

from ..sampling_params import SamplingParams
from .model_runner import ModelRunner
from .scheduler import ScheduledStep
from .sequence import Sequence

ROWS = (1, 2, 4, 8, 16, 32, 64)  # the rows timed, as far as the step budget and the scratch blocks allow
CONTEXT = 256  # tokens before each timed row (fewer if the cache is smaller), in blocks the rows share
REPEATS = 5  # the fastest of these runs counts (other work on the machine only ever adds time)
LONG_STEP = 0.1  # seconds: no larger step is timed once one takes this long (a big model on a CPU)


class StepCost:
    """`time(rows)`: a decode step's seconds; `spec_time(rows)`: a step that verifies drafts."""

    def __init__(self, points: list[tuple[int, float]], spec_points: list[tuple[int, float]] | None = None) -> None:
        self.points = points
        self.spec_points = spec_points or points

    def time(self, rows: float) -> float:
        return _interpolate(self.points, rows)

    def spec_time(self, rows: float) -> float:
        return _interpolate(self.spec_points, rows)

    @classmethod
    def linear(cls, first: float, per_row: float) -> StepCost:
        """A step of R rows taking `first` + `per_row` (R - 1) seconds (a stated model, for tests)."""
        return cls([(1, first), (2, first + per_row)])

    @classmethod
    @torch.inference_mode()
    def measure(cls, runner: ModelRunner, max_rows: int) -> StepCost:
        """Time `runner`'s steps on its fresh cache (blocks 0.. are scratch: nothing is cached yet)."""
        blocks, size = runner.cache.num_blocks, runner.cache.block_size
        longest = runner.model.config.max_seq_len - 2  # a draft's row comes after the row timed
        context = min(min(CONTEXT, longest) // size, max(0, blocks - min(max_rows, ROWS[-1])))
        limit = min(max_rows, blocks - context)
        rows = [r for r in ROWS if r <= limit] or [1]
        points = _time_steps(runner, rows, context, draft=False)
        spec = _time_steps(runner, [r for r in rows if r >= 2], context, draft=True) if runner.graphs else None
        return cls(points, spec)


def _time_steps(runner: ModelRunner, rows: list[int], context: int, draft: bool) -> list[tuple[int, float]]:
    """Steps of `r` sequences feeding one token after `context` blocks they share, each into a block of its
    own (with `draft`, the first feeds a second row as a one-token draft: the way a verification step runs).
    The sizes take turns, so that a burst of other work on the machine slows all of them, not one."""
    params = SamplingParams(max_tokens=2, temperature=0)
    start = context * runner.cache.block_size
    steps = []
    for r in rows:
        seqs = []
        for b in range(r - int(draft)):
            seq = Sequence([0] * (start + 1), params)
            seq.block_table, seq.num_computed = list(range(context)) + [context + b], start
            seq.state = SimpleNamespace(matcher=None, generator=None)
            seqs.append(seq)
        steps.append(ScheduledStep(seqs, [2 if draft and b == 0 else 1 for b in range(len(seqs))],
                                   [[0] if draft and b == 0 else [] for b in range(len(seqs))]))
        if _run(runner, steps[-1]) > LONG_STEP and len(steps) >= 2:  # also the warm-up of this shape
            break
    times = [float("inf")] * len(steps)
    for _ in range(REPEATS):
        times = [min(t, _run(runner, step)) for t, step in zip(times, steps)]
    points = []
    for r, t in zip(rows, times):  # never less than a smaller step (timing noise must not make rows look free)
        points.append((r, max([t] + [y for _, y in points])))
    return points


def _run(runner: ModelRunner, step: ScheduledStep) -> float:
    began = time.perf_counter()
    runner.run(step)
    return time.perf_counter() - began


def _interpolate(points: list[tuple[int, float]], rows: float) -> float:
    if len(points) == 1:
        return points[0][1] * rows  # one point only: as if every row cost as much
    xs = [x for x, _ in points]
    i = min(max(bisect.bisect_left(xs, rows), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)
