"""Attention backends: time and *measured* peak extra memory, N = 512 ... 8192.

Each case runs in a fresh subprocess, so its memory is measured alone: the peak resident set
(VmHWM) is reset through /proc/self/clear_refs after the inputs exist, one call runs, and the rise
of the peak over the resident set before the call is the extra memory that call needed.

    python benchmarks/bench_attention.py            # all cases; writes results/attention.{json,md,png}
    python benchmarks/bench_attention.py --quick    # N up to 2048
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from minillm.bench.common import environment, median_seconds
from minillm.bench.report import heading, write_report

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, HEADS, HEAD_DIM = 1, 8, 64
BACKENDS = [("standard", None), ("flash", 64), ("flash", 128), ("flash", 256), ("sdpa", None)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def run_case(backend: str, seq_len: int, tile_size: int | None, runs: int) -> dict:
    from minillm.attention import flash_attention_with_kv_cache, sdpa_attention, standard_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, seq_len, HEAD_DIM) for _ in range(3))
    if backend == "flash":
        attention, kwargs = flash_attention_with_kv_cache, dict(causal=True, tile_size=tile_size)
    else:
        attention, kwargs = (sdpa_attention if backend == "sdpa" else standard_attention), dict(causal=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _rss_kib("VmRSS")
    attention(q, k, v, **kwargs)
    extra = (_rss_kib("VmHWM") - before) * 1024
    median, times = median_seconds(lambda: attention(q, k, v, **kwargs), warmup=1, runs=runs)
    return {"backend": backend, "tile_size": tile_size, "seq_len": seq_len,
            "median_s": median, "times_s": times, "peak_extra_bytes": extra}


def theoretical_extra_bytes(backend: str, seq_len: int, tile_size: int | None) -> int:
    """What the algorithm must hold beyond its inputs, float32."""
    if backend == "standard":  # scores and probabilities, N x N per head
        return 2 * BATCH * HEADS * seq_len * seq_len * 4
    if backend == "flash":  # one score tile + accumulators per query tile + the output
        tile = tile_size or 128
        return BATCH * HEADS * (2 * tile * tile + tile * (HEAD_DIM + 2)) * 4 + BATCH * HEADS * seq_len * HEAD_DIM * 4
    return BATCH * HEADS * seq_len * HEAD_DIM * 4  # SDPA: the output (plus small per-thread tiles)


def label(case: dict) -> str:
    return f"flash (tile {case['tile_size']})" if case["backend"] == "flash" else case["backend"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N up to 2048 only")
    parser.add_argument("--case", nargs=3, metavar=("BACKEND", "N", "BLOCK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        backend, n, block = args.case[0], int(args.case[1]), None if args.case[2] == "-" else int(args.case[2])
        print(json.dumps(run_case(backend, n, block, runs=3 if n >= 4096 else 5)))
        return

    lengths = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    cases = []
    for n in lengths:
        for backend, block in BACKENDS:
            cmd = [sys.executable, __file__, "--case", backend, str(n), "-" if block is None else str(block)]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            result["theoretical_extra_bytes"] = theoretical_extra_bytes(backend, n, block)
            cases.append(result)
            print(f"N={n:5d} {label(result):18s} {result['median_s'] * 1e3:10.2f} ms "
                  f"{result['peak_extra_bytes'] / 2**20:10.1f} MiB", flush=True)

    env = environment()
    meta = {"env": env, "shape": {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM},
            "dtype": "float32", "causal": True, "runs": "median of 5 (3 for N >= 4096) after 1 warm-up"}
    write_report(RESULTS, "attention", {"meta": meta, "cases": cases}, markdown(meta, cases, lengths),
                 lambda plt: plot(plt, cases, lengths))


def markdown(meta: dict, cases: list[dict], lengths: list[int]) -> list[str]:
    labels = list(dict.fromkeys(label(c) for c in cases))
    by = {(label(c), c["seq_len"]): c for c in cases}
    lines = [*heading("Attention benchmark", f"Causal prefill, B={BATCH}, H={HEADS}, D={HEAD_DIM}, float32; {meta['runs']}.",
                      meta["env"], "python benchmarks/bench_attention.py"),
             "## Time (ms, median)", "", "| N | " + " | ".join(labels) + " |",
             "|---|" + "---|" * len(labels)]
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(f"{by[(lab, n)]['median_s'] * 1e3:.1f}" for lab in labels) + " |")
    lines += ["", "## Peak extra memory (MiB, measured: VmHWM rise of a fresh process during one call)", "",
              "| N | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(f"{by[(lab, n)]['peak_extra_bytes'] / 2**20:.1f}" for lab in labels) + " |")
    lines += ["", "## Memory the algorithm must hold (MiB, computed, for comparison)", "",
              "| N | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(f"{by[(lab, n)]['theoretical_extra_bytes'] / 2**20:.1f}" for lab in labels) + " |")
    n = lengths[-1]
    std = by[("standard", n)]
    lines += ["", f"At N={n}: " + "; ".join(
        f"{lab} uses {by[(lab, n)]['peak_extra_bytes'] / std['peak_extra_bytes']:.2%} of standard's measured extra memory "
        f"and {by[(lab, n)]['median_s'] / std['median_s']:.2f}x its time" for lab in labels if lab != "standard") + "."]
    return lines


def plot(plt, cases: list[dict], lengths: list[int]):
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for lab in dict.fromkeys(label(c) for c in cases):
        rows = [c for c in cases if label(c) == lab]
        ax_t.plot([c["seq_len"] for c in rows], [c["median_s"] * 1e3 for c in rows], marker="o", label=lab)
        ax_m.plot([c["seq_len"] for c in rows], [max(c["peak_extra_bytes"], 1) / 2**20 for c in rows], marker="o", label=lab)
    for ax, title in ((ax_t, "time per call (ms, median)"), (ax_m, "measured peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("sequence length N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend()
    fig.suptitle(f"Causal attention, B={BATCH}, H={HEADS}, D={HEAD_DIM}, float32, CPU")
    return fig


if __name__ == "__main__":
    main()
