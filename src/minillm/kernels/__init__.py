"""Our C++ CPU kernels, registered as `torch.ops.minillm.*` (one op each for eager and torch.compile).

- csrc/ggml_matmul.cpp: matmul on GGUF quantized blocks (`ggml_linear`), built for plain x86-64 with
  its AVX2 and AVX-512 VNNI paths picked at run time from the CPU's flags (`isa()`; MINILLM_ISA pins a
  lower one); csrc/layer_ops.cpp: fused RMSNorm and RoPE + KV-cache write; csrc/decoder_layer.cpp: every
  decoder layer on GGUF blocks as one op; csrc/greedy.cpp: greedy decoding's argmax (all four in one
  library, "ggml");
- csrc/paged_attention_kernel.h: attention over the paged KV cache, built once per x86 level
  (paged_attention_{portable,avx2,avx512}.cpp), of which the loader picks the one this CPU runs.

`pip install --no-build-isolation -e .` compiles them all (setup.py) into this folder. Without that (a
plain `pip install`, whose isolated build has no torch), the first use compiles the ones this CPU runs into
PyTorch's extension cache, once. Without a C++ compiler `load`
returns False after one warning, and callers keep their PyTorch paths.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .flags import EXTENSIONS, PAGED_ATTENTION_LEVELS

logger = logging.getLogger("minillm")

HERE = Path(__file__).parent


def sources(name: str) -> list[Path]:
    return [HERE / "csrc" / source for source in EXTENSIONS[name][0]]


_loaded: dict[str, bool] = {}  # a plain dict, so a compiled step reads it without tracing a load


def load(name: str) -> bool:
    """Load one extension (prebuilt at install, else compiled now); False, after one warning, if it cannot be."""
    if name not in _loaded:
        _loaded[name] = _load(name)
    return _loaded[name]


def _load(name: str) -> bool:
    newest_source = max(source.stat().st_mtime for source in [*sources(name), *(HERE / "csrc").glob("*.h")])
    built = [p for p in HERE.glob(f"_{name}.*.so") if p.stat().st_mtime >= newest_source]  # never a stale build
    try:
        if built:
            torch.ops.load_library(str(built[0]))
            _register_fakes(name)
            return True
        from torch.utils.cpp_extension import get_default_build_root

        # (torch builds under a folder named for the Python and CUDA versions, e.g. py311_cpu)
        if not any(Path(get_default_build_root()).glob(f"*/minillm_{name}/minillm_{name}.so")):
            logger.warning("compiling the %s kernel for this machine, once (`pip install --no-build-isolation -e .` "
                           "compiles it at install)", name)
        compile_extension(name)
        return True
    except Exception as error:  # no compiler, no ninja, a build error: say why in one line
        logger.warning("the %s kernel is unavailable, using PyTorch ops instead: %s", name,
                       (str(error).strip().splitlines() or [type(error).__name__])[0])
        return False


def compile_extension(name: str, extra_cflags: list[str] | None = None, library: str | None = None) -> None:
    """Compile extension `name` into PyTorch's extension cache and load it, as library `library` (default
    minillm_<name>) with its flags and `extra_cflags` (tests build variants so)."""
    from torch.utils.cpp_extension import load as build

    build(library or f"minillm_{name}", [str(source) for source in sources(name)],
          extra_cflags=[*EXTENSIONS[name][1], *(extra_cflags or [])], extra_ldflags=["-fopenmp"],
          is_python_module=False)
    _register_fakes(name)


def _register_fakes(name: str) -> None:
    """Output shapes of each op, for torch.compile (the kernels themselves come from the C++ library)."""
    if name.startswith("paged_attention"):
        # contiguous, as the kernel returns it (empty_like would copy q's strides)
        torch.library.register_fake("minillm::paged_attention", lambda q, *_: q.new_empty(q.shape))
        return

    @torch.library.register_fake("minillm::ggml_linear")
    def _(x, weights, fmts, in_features, bias, swiglu, gemm_from=-1, residual=None):
        return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights) // (2 if swiglu else 1)))

    @torch.library.register_fake("minillm::decoder_layers")
    def _(x, *_):
        return torch.empty_like(x)

    @torch.library.register_fake("minillm::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("minillm::rope_cache_write")
    def _(qkv, cos, sin, k_pool, v_pool, slots, num_heads, num_kv_heads):
        return qkv.new_empty((slots.numel(), num_heads, k_pool.shape[-1]))

    @torch.library.register_fake("minillm::ggml_dequantize_rows")
    def _(weight, fmt, in_features, ids, interleaved=True):
        return weight.new_empty((ids.numel(), in_features), dtype=torch.float32)


def paged_attention_level() -> str:
    """The paged attention build this CPU runs: the best of PAGED_ATTENTION_LEVELS its flags allow (as
    PyTorch detects them), or a lower one pinned by MINILLM_ISA ("portable", "avx2"), as for the GGUF kernels."""
    capability = torch.backends.cpu.get_cpu_capability()
    levels = list(PAGED_ATTENTION_LEVELS)
    best = next((level for level in levels if level.upper() in capability), "portable")
    pinned = os.environ.get("MINILLM_ISA", "")
    return max(best, pinned if pinned in levels else best, key=levels.index)  # the lower (levels run best first)


def paged_attention_available() -> bool:
    """Whether the paged attention kernel for this CPU is loaded (built and loaded on first call)."""
    return load(f"paged_attention_{paged_attention_level()}")


def ops_available() -> bool:
    """Whether the GGUF matmul kernels and fused layer ops are loaded (built and loaded on first call)."""
    return load("ggml")


def isa() -> str:
    """The vector path the GGUF kernels use: "avx512_vnni", "avx2" or "portable"."""
    return torch.ops.minillm.ggml_isa() if ops_available() else "unavailable"


def set_isa(name: str) -> None:
    """Pin the GGUF kernels' path for this process (the CPU must have it)."""
    ops_available()
    torch.ops.minillm.ggml_set_isa(name)


def best_isa() -> str:
    return torch.ops.minillm.ggml_best_isa() if ops_available() else "unavailable"
