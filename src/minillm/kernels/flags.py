"""Our C++ extensions: sources (in csrc/) and compiler flags (read by setup.py and by first-use builds)."""

EXTENSIONS = {
    # plain x86-64: the matmul's vector paths carry their own target attributes, chosen at run time
    # (not -ffp-contract=off, which slows the matmuls: the SwiGLU's bits come from explicit fmas instead)
    "ggml": (["ggml_matmul.cpp", "layer_ops.cpp", "decoder_layer.cpp", "greedy.cpp"], ["-O3", "-fopenmp"]),
    "paged_attention": (["paged_attention.cpp"], ["-O3", "-march=native", "-fopenmp"]),  # built where it runs
}
