"""Load time and peak memory of `LLM(model)`, each run in a fresh process (import excluded), median of
several runs after a warm-up: `python benchmarks/bench_load.py [--model FILE] [--runs 3]`."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import minillm
start = time.perf_counter()
llm = minillm.LLM(sys.argv[1] or None, progress=False)
seconds = time.perf_counter() - start
text = llm.generate(["The capital of France is"], minillm.SamplingParams(max_tokens=8, temperature=0))[0].text
print(json.dumps({"load_s": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "text": text}))
"""


def one_run(model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="", help="a GGUF file or HF folder (default: the bundled model)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    one_run(args.model)  # warm-up: kernels built, file in the page cache
    runs = [one_run(args.model) for _ in range(args.runs)]
    print(json.dumps({"load_s": [round(r["load_s"], 2) for r in runs],
                      "load_s_median": round(statistics.median(r["load_s"] for r in runs), 2),
                      "peak_rss_mib": [round(r["peak_rss_mib"]) for r in runs], "text": runs[0]["text"]}))


if __name__ == "__main__":
    main()
