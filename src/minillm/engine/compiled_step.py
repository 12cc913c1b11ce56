"""`torch.compile` of the engine step, as gpt-fast compiles its decode_one_token: inductor fuses a small
model's hundreds of tiny ops. Every step is packed ([N] tokens of B sequences), so one dynamic graph
serves them all (the KV pools static, sizes of 1 not specialised); warm-up traces the two graphs
dynamo makes and no later step recompiles them (tests/test_compiled_step.py). Opt-in, paid at engine
start: what it gains and costs is in docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor


def compile_step(forward: Callable[..., Tensor], static_tensors: Iterable[Tensor]) -> Callable[..., Tensor]:
    for tensor in static_tensors:
        torch._dynamo.mark_static(tensor)
    # size_asserts off: inductor's per-call checks of every input's sizes and strides cost as much as a small step
    compiled = torch.compile(forward, dynamic=True, fullgraph=True, options={"size_asserts": False})

    def step(*args, **kwargs) -> Tensor:
        with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):
            return compiled(*args, **kwargs)

    return step
