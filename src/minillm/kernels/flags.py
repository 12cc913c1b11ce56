"""Compiler flags of each C++ extension (read by setup.py and by first-use builds; no imports here)."""

EXTENSIONS = {
    "ggml_matmul": ["-O3", "-fopenmp"],  # plain x86-64: its vector paths carry their own target attributes
    "paged_attention": ["-O3", "-march=native", "-fopenmp"],  # built on the machine that runs it
}
