"""`torch.compile` of the engine's step, as gpt-fast compiles its decode_one_token.

A step of a small model is hundreds of small operations whose per-op cost (Python, dispatch, one
pass over memory each) is much of its time; inductor fuses the elementwise ones into a few C++
loops. Every engine step is packed ([1, N] tokens of B sequences, decode rows and prompt chunks
alike), so one graph serves them all: shapes are dynamic, the KV pools are marked static, and
sizes of 1 are not specialised (`backed_size_oblivious`) nor equated with other sizes that happen to
match (`use_duck_shape`). Warm-up traces the two graphs dynamo makes, one for a single sequence
and one for several, and no later step recompiles them (tests/test_compiled_step.py).
On `minillm bench --throughput` (bf16, 2 cores) compiling cut the engine's wall time from 24.9 s to
15.3 s. Compiling SmolLM2's step was measured at 119-139 s on the 2-core CI machine with an empty
inductor cache and 46-73 s with a warm one, so it is opt-in (`LLM(..., compile=True)`, `--compile`;
CPU, with the "paged" kernel) and is paid when the engine starts, never by the first request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor


def compile_step(forward_step: Callable[..., Tensor], static_tensors: Iterable[Tensor]) -> Callable[..., Tensor]:
    for tensor in static_tensors:
        torch._dynamo.mark_static(tensor)
    # size_asserts off: inductor's per-call checks of every input's sizes and strides cost ~0.7 ms a step
    compiled = torch.compile(forward_step, dynamic=True, fullgraph=True, options={"size_asserts": False})

    def step(*args, **kwargs) -> Tensor:
        with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):
            return compiled(*args, **kwargs)

    return step
