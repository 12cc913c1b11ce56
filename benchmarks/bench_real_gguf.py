"""MiniLLM's default setting against llama.cpp on GGUF files of real shapes (benchmarks/make_gguf.py, or any
file): load time and peak RSS (fresh processes), weight bytes, batch-1 decode (the engines alternating,
round after round, with the machine's streaming bandwidth measured in each round), prefill of 512 tokens,
and our batch-16 decode. Same thread count for both. Writes OUT.json and OUT.md.

    python benchmarks/bench_real_gguf.py FILE.gguf [FILE.gguf ...] --out benchmarks/results/cpu_zen2/real_gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from minillm.bench.common import environment
from minillm.bench.load import load_figures
from minillm.bench.report import table
from minillm.bench.speed import bandwidth_probe, llama_cpp_runner, load_engine, minillm_runner

PROMPT, PREFILL = 16, 512


def rate(run, batch: int, length: int, new: int) -> float:
    """Decode tokens/s of run(batch, length, new), its prefill (a 1-token run) subtracted."""
    start = time.perf_counter()
    run(batch, length, 1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    run(batch, length, new)
    return batch * (new - 1) / max(time.perf_counter() - start - first, 1e-9)


def prefill_rate(run) -> float:
    start = time.perf_counter()
    run(1, PREFILL, 1)
    return PREFILL / (time.perf_counter() - start)


def measure(path: Path, rounds: int, tokens: int) -> dict:
    figures = {"file_mb": path.stat().st_size / 1e6, "load": load_figures(["minillm", "llama.cpp"], path, 1)}
    llm = load_engine(path, "default", set())
    engines = {"minillm": minillm_runner(llm), "llama.cpp": llama_cpp_runner(path, torch.get_num_threads())}
    bandwidth = bandwidth_probe()
    for run in engines.values():  # warm-up
        run(1, PREFILL, 2)
    b1: dict[str, list[float]] = {name: [] for name in [*engines, "machine_gb_s"]}
    prefill: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            b1[name].append(rate(run, 1, PROMPT, tokens))
            prefill[name].append(prefill_rate(run))
        b1["machine_gb_s"].append(bandwidth() / 1e9)
    step_bytes = path.stat().st_size  # a decode step reads every weight (an untied embedding: one row; ~0 here)
    figures.update(
        b1=b1, prefill=prefill, b16_minillm=rate(engines["minillm"], 16, PROMPT, tokens),
        b1_ratio=statistics.median(a / b for a, b in zip(b1["minillm"], b1["llama.cpp"])),
        prefill_ratio=statistics.median(a / b for a, b in zip(prefill["minillm"], prefill["llama.cpp"])),
        bandwidth_share=statistics.median(t * step_bytes / 1e9 / m for t, m in zip(b1["minillm"], b1["machine_gb_s"])),
        weights_mb=sum(t.nbytes for t in {id(t): t for t in llm.model.buffers()}.values()) / 1e6)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per measured run")
    parser.add_argument("--out", default="benchmarks/results/real_gguf")
    args = parser.parse_args()
    results = {"env": environment(), "rounds": args.rounds, "tokens": args.tokens,
               "files": {Path(f).name: measure(Path(f), args.rounds, args.tokens) for f in args.files}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(results, indent=1) + "\n")
    rows = []
    for name, f in results["files"].items():
        ours, theirs = f["load"]["minillm"], f["load"]["llama.cpp"]
        rows.append([name, f"{f['file_mb']:.0f}", f"{f['weights_mb']:.0f}",
                     f"{ours['load_s']:.2f} / {theirs['load_s']:.2f}",
                     f"{ours['peak_rss_mib']:.0f} / {theirs['peak_rss_mib']:.0f}",
                     f"{statistics.median(f['b1']['minillm']):.1f} / {statistics.median(f['b1']['llama.cpp']):.1f}",
                     f"**{f['b1_ratio']:.2f}x**", f"{f['bandwidth_share']:.0%}",
                     f"{statistics.median(f['prefill']['minillm']):.0f} / {statistics.median(f['prefill']['llama.cpp']):.0f}",
                     f"**{f['prefill_ratio']:.2f}x**", f"{f['b16_minillm']:.0f} ({f['b16_minillm'] / statistics.median(f['b1']['minillm']):.1f}x b1)"])
    env = results["env"]
    lines = ["# MiniLLM default vs llama.cpp on GGUF files", "",
             f"CPU: {env['cpu']} ({env['cpu_flags']}; our kernels' path: {env['kernel_isa']}), {env['threads']} threads "
             f"for both engines; torch {env['torch']}, llama-cpp-python 0.3.36 built with GGML_NATIVE; {env['date']}.",
             f"Batch-1 decode: {args.tokens} tokens after a {PROMPT}-token prompt, the engines in turn, {args.rounds} "
             "rounds (median of the per-round ratio); the machine's streaming bandwidth (a 1 GiB float32 sum) measured "
             "in each round, and our bytes read per token (the file) x tokens/s as a share of it. Prefill: a 512-token "
             "prompt, same rounds. Load and peak RSS: each in a fresh process, the file in the page cache "
             "(MiniLLM's RSS includes its KV cache pool as far as touched; llama.cpp's its 2048-token context).", "",
             *table(["file", "file MB", "our weights MB", "load s (ours / llama.cpp)", "peak RSS MiB",
                     "b1 tok/s", "b1 ratio", "b1 share of bandwidth", "prefill 512 tok/s", "prefill ratio",
                     "our b16 tok/s"], rows)]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
