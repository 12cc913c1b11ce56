"""The GGUF block matmul alone, per type: one linear layer of random valid blocks (benchmarks/make_gguf.py's),
timed at 1 to 512 tokens on 1 and 2 threads, median of several calls after a warm-up. Reports weight-tokens
per second (the multiply-adds: compute, where several tokens share each weight read) and GB/s of weights
(bytes read: memory, at one token). The 2-thread layer (32 MiB of weights at 4 bits) does not fit the
caches; the 1-thread one (4096 x 2048) sits in L3, so it shows the kernel's own speed.

    python benchmarks/bench_kernels.py [--types Q4_K Q6_K ...] [--out benchmarks/results/cpu_zen2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

from make_gguf import SCALES, random_blocks
from minillm import kernels
from minillm.bench.common import environment, median_seconds
from minillm.bench.report import heading, table, write_report
from minillm.kernels import ggml

TOKENS = (1, 4, 16, 64, 512)
SHAPES = {1: (4096, 2048), 2: (16384, 4096)}  # threads -> (rows, columns)
TYPES = [t.name for t in SCALES]  # the block types make_gguf writes (F16 / BF16 files: bench_real_gguf.py)


def measure(name: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    rows, cols = SHAPES[threads]
    kind = gguf.GGMLQuantizationType[name]
    raw = random_blocks(kind, rows, cols, np.random.default_rng(0))
    layer = ggml.GGMLLinear([(ggml.repack(torch.from_numpy(raw), int(kind)), int(kind))], cols)
    nbytes = layer.weights[0].nbytes
    result = {}
    for tokens in TOKENS:
        x = torch.randn(tokens, cols)
        seconds, _ = median_seconds(lambda: layer(x), warmup=3, runs=15 if tokens < 64 else 5)
        result[str(tokens)] = {"ms": seconds * 1e3, "g_weight_tokens": rows * cols * tokens / seconds / 1e9,
                               "gb_per_s": nbytes / seconds / 1e9}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu_zen2")
    args = parser.parse_args()
    if not kernels.ops_available():
        sys.exit("bench_kernels: the C++ kernels could not be built here")
    env = {**environment(), "kernel_isa": kernels.isa()}
    results = {f"{name}/{threads}": measure(name, threads) for threads in SHAPES for name in args.types}
    lines = heading("GGUF block matmul per type", __doc__.split("\n\n")[0].replace("\n", " ") + "\n", env,
                    "python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:]))
    for threads, (rows, cols) in SHAPES.items():
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}, {rows} x {cols}", "",
                  "G weight-tokens/s (GB/s of weights at 1 token)", ""]
        rows_out = []
        for name in args.types:
            r = results[f"{name}/{threads}"]
            rows_out.append([name, f"{r['1']['g_weight_tokens']:.1f} ({r['1']['gb_per_s']:.1f} GB/s)",
                             *(f"{r[str(t)]['g_weight_tokens']:.1f}" for t in TOKENS[1:])])
        lines += table(["type", *(f"{t} token{'s' if t > 1 else ''}" for t in TOKENS)], rows_out) + [""]
    write_report(args.out, "kernels", {"environment": env, "shapes": SHAPES, "results": results}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
