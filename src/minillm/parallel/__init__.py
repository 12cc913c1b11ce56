"""Tensor parallelism over torch.distributed: one model sharded over several processes (ranks), on one machine or
several; rank 0 (the engine's process) schedules and samples, every rank runs each step on its shard.

- shard.py: which part of each weight a rank holds (heads, hidden features, vocabulary rows);
- layers.py: the collectives wrapped around a shard's modules (two all-reduces a layer, the logits' gather);
- group.py: joining the process group, start-up messages, each step's inputs broadcast from rank 0;
- driver.py: rank 0's side (start the workers, send the steps, notice a dead rank, stop them);
- worker.py: the other ranks' process.

docs/scale_out.md says how to use it."""

from .driver import TensorParallel, preflight, start_tensor_parallel
from .shard import TensorShard, check_tensor_parallel

__all__ = ["TensorParallel", "TensorShard", "check_tensor_parallel", "preflight", "start_tensor_parallel"]
