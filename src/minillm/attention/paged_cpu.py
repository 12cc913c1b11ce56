"""Our C++ kernel for decode attention over the paged KV cache on CPU (csrc/paged_decode.cpp).

Decode is where continuous batching spends its time, and in PyTorch ops paged decode attention is
a gather of every sequence's pages plus many tiny matmuls: at 64 sequences it cost more than all
the linear layers. The kernel reads each sequence's pages in place. It is compiled for this machine
on first use (about 35 s on the 2-core CI machine; cached by PyTorch under ~/.cache/torch_extensions) and registered as
a custom op, so a compiled decode step (torch.compile) calls it as one node.
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

    source = Path(__file__).with_name("csrc") / "paged_decode.cpp"
    logger.info("building the paged decode attention kernel (first use on this machine)")
    # -march=native: it is built on the machine that runs it
    return load("minillm_paged_decode", [str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
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
            logger.warning("paged decode kernel unavailable, using PyTorch ops instead: %s", str(error).splitlines()[0])
            _available = False
    return _available


@torch.library.custom_op("minillm::paged_decode", mutates_args=())
def paged_decode(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                 scale: float) -> Tensor:
    """q [B, Hq, D] over pools [num_blocks, page, Hkv, D] through block_table [B, pages] and
    seqlens [B] (keys per row); returns [B, Hq, D]. float32 or bfloat16, CPU."""
    return _extension().paged_decode(q, k_pool, v_pool, block_table, seqlens, scale)


@paged_decode.register_fake
def _(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor, scale: float) -> Tensor:
    return torch.empty_like(q)
