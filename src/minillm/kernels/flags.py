"""Our C++ extensions: sources (in csrc/) and compiler flags (read by setup.py and by first-use builds)."""

import platform

# paged attention's levels, best first, with their compiler flags (x86-64-v4: AVX-512 F/BW/DQ/VL; v3: AVX2, FMA, F16C)
PAGED_ATTENTION_LEVELS = ({"avx512": ["-march=x86-64-v4"], "avx2": ["-march=x86-64-v3"], "portable": []}
                          if platform.machine().lower() in ("x86_64", "amd64") else {"portable": []})

EXTENSIONS = {
    # plain x86-64: the matmul's vector paths carry their own target attributes, chosen at run time
    # (not -ffp-contract=off, which slows the matmuls: the SwiGLU's bits come from explicit fmas instead)
    "ggml": (["ggml_matmul.cpp", "layer_ops.cpp", "decoder_layer.cpp", "greedy.cpp"], ["-O3", "-fopenmp"]),
    # at::vec fixes its vector width at compile time: the paged attention kernel is built once per x86 level
    # (never for one machine alone), and the loader picks the level this CPU runs (PAGED_ATTENTION_LEVELS)
    **{f"paged_attention_{level}": ([f"paged_attention_{level}.cpp"], ["-O3", "-fopenmp", *march])
       for level, march in PAGED_ATTENTION_LEVELS.items()},
}
