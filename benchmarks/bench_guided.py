"""What structured output costs: the grammar masks' time per step, and output tokens/s of JSON-schema
constrained requests against the same requests unconstrained (bundled SmolLM2, default setting).

Run: python benchmarks/bench_guided.py  ->  benchmarks/results/guided.{json,md}
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minillm import LLM, SamplingParams  # noqa: E402
from minillm.bench.common import environment  # noqa: E402
from minillm.bench.report import heading, table, write_report  # noqa: E402
from minillm.engine import model_runner  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4}},
    "required": ["name", "age", "skills"], "additionalProperties": False}
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    llm = LLM(progress=False)
    mask_times: list[float] = []
    original = model_runner.allowed_tokens

    def timed(matchers, vocab):
        start = time.perf_counter()
        out = original(matchers, vocab)
        if out is not None:
            mask_times.append(time.perf_counter() - start)
        return out

    model_runner.allowed_tokens = timed
    messages = [[{"role": "user", "content": f"Describe person number {i} as JSON."}] for i in range(16)]
    rows = []
    for batch in (1, 16):
        for guided in (False, True):
            params = [SamplingParams(max_tokens=64, temperature=0.8, seed=i, ignore_eos=not guided,
                                     guided_json=SCHEMA if guided else None) for i in range(batch)]
            llm.chat(messages[:batch], params)  # warm-up (and the grammar compiled once)
            mask_times.clear()
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                outs = llm.chat(messages[:batch], params)
                runs.append((sum(len(o.token_ids) for o in outs), time.perf_counter() - start))
            rows.append({"batch": batch, "guided": guided, "tok_s": statistics.median(t / s for t, s in runs),
                         "mask_ms_per_step": 1e3 * statistics.median(mask_times) if mask_times else 0.0})
            print(rows[-1], flush=True)
    results = {"env": environment(), "schema": SCHEMA, "rows": rows}
    lines = [*heading("Structured output: cost of the grammar masks",
                      "Bundled SmolLM2-135M-Instruct (default setting), chat prompts, up to 64 output tokens, "
                      "temperature 0.8; JSON-schema constrained (llguidance) vs unconstrained (ignore_eos, so both "
                      "run their full length); median of 3 runs after a warm-up. Mask time: llguidance's bitmask "
                      "for every constrained row of a step, plus its expansion to a [B, vocab] tensor.",
                      results["env"], "python benchmarks/bench_guided.py"),
             *table(["batch", "constrained", "output tok/s", "mask time per step (ms)"],
                    [[r["batch"], "yes" if r["guided"] else "no", f"{r['tok_s']:.1f}",
                      f"{r['mask_ms_per_step']:.2f}" if r["guided"] else "—"] for r in rows])]
    write_report(RESULTS, "guided", results, lines)


if __name__ == "__main__":
    main()
