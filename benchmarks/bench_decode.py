"""Batch-1 decode latency on the bundled SmolLM2-135M: MiniLLM (float32, int8, int4) through the
engine, and HF transformers' `generate` (float32) on the same GGUF weights, in one run.

Each engine decodes NEW tokens after a 32-token prompt (ignore_eos, greedy), RUNS times after a
warm-up; the median per-token time is reported (prefill excluded: the first token's time is
subtracted using a 1-token run). Writes results/decode.{json,md}.

    python benchmarks/bench_decode.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from minillm import LLM, SamplingParams
from minillm.bench.common import environment
from minillm.bench.report import heading, table, write_report
from minillm.loading import default_model_path

RESULTS = Path(__file__).resolve().parent / "results"
NEW, RUNS = 64, 5
PROMPT = list(range(1000, 1032))


def per_token_ms(generate_n) -> float:
    """Median over RUNS of (time for NEW tokens - time for 1 token) / (NEW - 1)."""
    generate_n(1)
    generate_n(NEW)  # warm-up
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        generate_n(1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        generate_n(NEW)
        samples.append((time.perf_counter() - start - first) / (NEW - 1) * 1e3)
    return statistics.median(samples)


def main() -> None:
    rows = {}
    for name, quantization in (("MiniLLM float32", None), ("MiniLLM int8", "int8"), ("MiniLLM int4", "int4")):
        llm = LLM(quantization=quantization, progress=False)
        rows[name] = per_token_ms(lambda n: llm.generate(
            [PROMPT], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
        print(f"{name}: {rows[name]:.1f} ms/token", flush=True)

    from transformers import AutoModelForCausalLM

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])

    def hf_generate(n: int) -> None:
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)

    rows["HF transformers float32"] = per_token_ms(hf_generate)
    print(f"HF transformers float32: {rows['HF transformers float32']:.1f} ms/token", flush=True)

    env = environment()
    hf_ms = rows["HF transformers float32"]
    lines = [*heading("Batch-1 decode (bundled SmolLM2-135M-Instruct)",
                      f"32-token prompt, {NEW} new tokens, greedy, ignore_eos; median of {RUNS} runs after a warm-up; "
                      "per-token time excludes the prefill.", env, "python benchmarks/bench_decode.py"),
             *table(["engine", "ms / token", "tok/s", "vs HF float32"],
                    [[name, f"{ms:.1f}", f"{1e3 / ms:.1f}", f"{hf_ms / ms:.2f}x"] for name, ms in rows.items()])]
    write_report(RESULTS, "decode", {"env": env, "new_tokens": NEW, "runs": RUNS, "ms_per_token": rows}, lines)

if __name__ == "__main__":
    main()
