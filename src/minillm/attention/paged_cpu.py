"""Our C++ kernel for attention over the paged KV cache on CPU (csrc/paged_attention.cpp).

In PyTorch ops, paged attention is a gather of every sequence's pages into a padded copy and a
masked SDPA (or many tiny matmuls) over it: at 64 decoding sequences it cost more than all the
linear layers. The kernel reads each sequence's pages in place, for a packed batch of any mix of
decode rows and prefill chunks (the engine's step). It is compiled for this machine
on first use (about 40 s on the 2-core CI machine; cached by PyTorch under ~/.cache/torch_extensions) and registered as
a custom op, so a compiled step (torch.compile) calls it as one node.
Without a C++ compiler the engine keeps the PyTorch path (`available()` is False).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger("minillm")


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load

    source = Path(__file__).with_name("csrc") / "paged_attention.cpp"
    logger.info("building the paged attention kernel (first use on this machine)")
    # -march=native: it is built on the machine that runs it
    return load("minillm_paged_attention", [str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"])


_available: bool | None = None  # a plain global, so a compiled step reads it without tracing a build


def available() -> bool:
    """Whether the kernel builds and loads here (tried once per process)."""
    global _available
    if _available is None:
        try:
            _extension()
            _available = True
        except Exception as error:  # no compiler, no ninja, a build error: fall back, say why once
            logger.warning("paged attention kernel unavailable, using PyTorch ops instead: %s", str(error).splitlines()[0])
            _available = False
    return _available


@torch.library.custom_op("minillm::paged_attention", mutates_args=())
def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                    query_start: Tensor, scale: float) -> Tensor:
    """Packed queries q [N, Hq, D] over pools [num_blocks, page, Hkv, D]; returns [N, Hq, D].

    Sequence b's queries are rows query_start[b]:query_start[b + 1] and are its last keys (causal);
    it holds seqlens[b] keys in the blocks block_table[b]. float32 or bfloat16, CPU.
    """
    return _extension().paged_attention(q, k_pool, v_pool, block_table, seqlens, query_start, scale)


@paged_attention.register_fake
def _(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor, query_start: Tensor,
      scale: float) -> Tensor:
    return q.new_empty(q.shape)  # contiguous, as the kernel returns it (empty_like would copy q's strides)
